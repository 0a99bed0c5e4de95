"""One image's forward model and the conversions between real space and jaxcryo's Fourier pairs.

Normalisation: a volume's parameters are ``rfftn(ifftshift(vol)) / N`` as (real, imag) pairs,
and an image's are ``rfft2(ifftshift(img)) / N`` restricted to the grid's disk. With these,
the central slice of the volume's parameters is exactly the image parameters of its
projection (sum along z), and white real-space noise of variance s^2 has Fourier variance s^2.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward.ctf import CTFParams, complex_multiply, conj_multiply, ctf, shift_phase
from jaxcryo.forward.slicing import FourierGrid, hermitian_symmetrize, project, project_nufft


class Particles(NamedTuple):
    """A particle set in Fourier space, ready for the loss (a pytree; shard along axis 0).

    Attributes:
      data: (n, P, 2) image pixels inside the grid's disk, already shifted back to the centre
        (the in-plane shift is applied once, when the data are prepared, not in every step).
      rotations: (n, 3, 3) RELION matrices A.
      ctf: CTFParams with (n,) fields, or None for no CTF.
      weight: (n,) 1 for a real particle, 0 for padding.
      noise_group: (n,) int32 index of each image's noise spectrum (its optics group,
        0 .. G-1) in ``Problem.shell_weights``, or None: every image in group 0.
    """

    data: jnp.ndarray
    rotations: jnp.ndarray
    ctf: CTFParams | None
    weight: jnp.ndarray
    noise_group: jnp.ndarray | None = None


def gridding_weight(box: int, interpolation: str | None):
    """Real-space apodisation (N, N, N) of a slicing kernel: what interpolating Fourier
    coefficients multiplies the map by (trilinear: prod sinc^2(x_i / N); nearest: prod sinc;
    nufft or None: ones). Exact slices of a map are the interpolated slices of map / weight.
    """
    c = (np.arange(box) - box // 2) / box
    power = {"trilinear": 2, "nearest": 1}.get(interpolation, 0)
    w1 = np.sinc(c) ** power
    return (w1[:, None, None] * w1[None, :, None] * w1[None, None, :]).astype(np.float32)


def volume_to_ft(volume, interpolation: str | None = None):
    """Real (N, N, N) map -> (N, N, N//2+1, 2) Fourier pairs.

    With ``interpolation`` the map is first divided by :func:`gridding_weight`, so that the
    interpolated slices are the map's projections (gridding pre-compensation).
    """
    n = volume.shape[-1]
    if interpolation is not None:
        volume = volume / gridding_weight(n, interpolation)
    vft = jnp.fft.rfftn(jnp.fft.ifftshift(volume, axes=(-3, -2, -1)), axes=(-3, -2, -1)) / n
    return jnp.stack([vft.real, vft.imag], -1).astype(volume.dtype)


def ft_to_volume(pairs, interpolation: str | None = None):
    """(N, N, N//2+1, 2) Fourier pairs -> real (N, N, N) map (the Hermitian part).

    With ``interpolation`` the map is multiplied by :func:`gridding_weight`: parameters fitted
    with an interpolating slice describe map / weight (the gridding correction).
    """
    n = pairs.shape[-4]
    vft = hermitian_symmetrize(pairs[..., 0] + 1j * pairs[..., 1])
    vol = jnp.fft.fftshift(jnp.fft.irfftn(vft * n, s=(n, n, n), axes=(-3, -2, -1)), axes=(-3, -2, -1))
    if interpolation is not None:
        vol = vol * gridding_weight(n, interpolation)
    return vol.astype(pairs.dtype)


def images_to_ft(images, grid: FourierGrid):
    """Real (..., N, N) images -> (..., P, 2) pairs inside the disk."""
    n = images.shape[-1]
    ift = jnp.fft.rfft2(jnp.fft.ifftshift(images, axes=(-2, -1))) / n
    return grid.pack(ift).astype(images.dtype)


def ft_to_images(pairs, grid: FourierGrid):
    """(..., P, 2) pairs -> real (..., N, N) images (band-limited to the disk)."""
    n = grid.box
    img = jnp.fft.irfft2(grid.unpack(pairs) * n, s=(n, n))
    return jnp.fft.fftshift(img, axes=(-2, -1)).astype(pairs.dtype)


def ctf_batch(ctf_params: CTFParams | None, grid: FourierGrid, n: int, dtype):
    """(n, P) CTF values for a batch (ones when there is no CTF)."""
    if ctf_params is None:
        return jnp.ones((n, grid.n_pixels), dtype)
    return jax.vmap(lambda c: ctf(grid.freqs, c, grid.box))(ctf_params).astype(dtype)


def slices(volume, rotations, grid: FourierGrid, interpolation: str):
    """Slices of a pair volume (N, N, H, C) at B poses -> (B, P, C), any interpolation."""
    if interpolation == "nufft":
        return project_nufft(volume, rotations, grid)
    return jax.vmap(lambda r: project(volume, r, grid, interpolation))(rotations)


def render(volume_pairs, rotations, shifts_px, ctf_params: CTFParams | None, grid: FourierGrid,
           interpolation: str = "trilinear"):
    """Noise-free particle images (B, N, N): slice, CTF, then the in-plane shift.

    shifts_px: (B, 2) shifts in pixels (rlnOriginXAngst / pixel size, same for Y).
    """
    s = slices(volume_pairs, rotations, grid, interpolation)
    s = s * ctf_batch(ctf_params, grid, rotations.shape[0], s.dtype)[..., None]
    ramp = jax.vmap(lambda t: shift_phase(grid.freqs, t, grid.box))(shifts_px.astype(s.dtype))
    return ft_to_images(complex_multiply(s, ramp), grid)


def prepare_particles(images, rotations, shifts_px, ctf_params: CTFParams | None,
                      grid: FourierGrid, weight=None, noise_group=None) -> Particles:
    """Real images (n, N, N) and their poses -> :class:`Particles` (shift undone once here).

    ``noise_group``: optional (n,) integer noise group (optics group index 0 .. G-1) per image.
    """
    data = images_to_ft(jnp.asarray(images), grid)
    ramp = jax.vmap(lambda t: shift_phase(grid.freqs, t, grid.box))(jnp.asarray(shifts_px, data.dtype))
    data = conj_multiply(ramp, data)
    weight = jnp.ones(data.shape[0], data.dtype) if weight is None else jnp.asarray(weight, data.dtype)
    if noise_group is not None:
        noise_group = jnp.asarray(noise_group, jnp.int32)
    return Particles(data=data, rotations=jnp.asarray(rotations, data.dtype), ctf=ctf_params,
                     weight=weight, noise_group=noise_group)
