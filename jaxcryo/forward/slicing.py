"""Central slices of a half (rfftn) Fourier volume, and their adjoint (back-projection).

Volumes here are real "pair" arrays: shape ``(N, N, N//2+1, C)`` with ``C = 2 * channels``,
channel pairs holding (real, imaginary) parts. Keeping the parameters real is what lets every
stock optax optimizer work unchanged (JAX's gradient with respect to a complex array is the
conjugate of the descent direction; with respect to its real and imaginary parts, it is not).

An image is the set of its half-plane Fourier pixels inside the disk ``|k| <= r_max``
(:class:`FourierGrid`), shape ``(P, C)``. Nearest and trilinear slicing share one mechanism:
each pixel reads ``K`` voxels (1 or 8) with weights, mirrored through ``V(-k) = conj V(k)``
where a voxel falls in the half that is not stored. They are pure JAX (CPU, GPU, TPU). The
``nufft`` path evaluates the exact trigonometric interpolant with jax-finufft's type-2
transform; it runs where jax-finufft runs (its PyPI wheel is CPU-only).
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

INTERPOLATIONS = ("nearest", "trilinear", "nufft")


@dataclasses.dataclass(frozen=True)
class FourierGrid:
    """Static description of the Fourier pixels an image contributes (hashable, jit-static).

    Attributes:
      box: image and volume edge N in pixels.
      r_max: largest Fourier radius used, in Fourier pixels (default N//2 - 1, which keeps
        every trilinear corner inside the grid).
    """

    box: int
    r_max: int | None = None

    @property
    def radius(self) -> int:
        return self.box // 2 - 1 if self.r_max is None else int(self.r_max)

    @functools.cached_property
    def _pixels(self):
        ky = np.fft.fftfreq(self.box, 1.0 / self.box)
        kx = np.arange(self.box // 2 + 1, dtype=np.float64)
        kxx, kyy = np.meshgrid(kx, ky, indexing="xy")
        inside = (kxx ** 2 + kyy ** 2) <= self.radius ** 2
        flat = np.flatnonzero(inside.ravel())
        mult = np.where((kxx == 0) | ((self.box % 2 == 0) & (kxx == self.box // 2)), 1.0, 2.0)
        return (np.stack([kxx.ravel()[flat], kyy.ravel()[flat]], -1), flat, mult.ravel()[flat])

    @property
    def freqs(self) -> np.ndarray:
        """(P, 2) integer frequencies (kx, ky) of the pixels, in Fourier pixels."""
        return self._pixels[0]

    @property
    def flat_index(self) -> np.ndarray:
        """(P,) index of each pixel in a raveled rfft2 image of shape (N, N//2+1)."""
        return self._pixels[1]

    @property
    def multiplicity(self) -> np.ndarray:
        """(P,) how often each pixel appears in the full Hermitian spectrum (1 or 2)."""
        return self._pixels[2]

    @property
    def n_pixels(self) -> int:
        return int(self._pixels[1].size)

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return (self.box, self.box, self.box // 2 + 1)

    def pack(self, image_ft):
        """(..., N, N//2+1) complex rfft2 images -> (..., P, 2) real pairs inside the disk."""
        flat = image_ft.reshape(image_ft.shape[:-2] + (-1,))[..., self.flat_index]
        return jnp.stack([flat.real, flat.imag], axis=-1)

    def unpack(self, pairs):
        """(..., P, 2) pairs -> (..., N, N//2+1) complex rfft2 images (zero outside the disk)."""
        vals = pairs[..., 0] + 1j * pairs[..., 1]
        out = jnp.zeros(pairs.shape[:-2] + (self.box * (self.box // 2 + 1),), vals.dtype)
        out = out.at[..., self.flat_index].set(vals)
        return out.reshape(pairs.shape[:-2] + (self.box, self.box // 2 + 1))


def slice_coords(rotation, grid: FourierGrid):
    """3-D sampling points (P, 3) as (x, y, z) of the image pixels at pose ``rotation`` (A.T k)."""
    k2 = jnp.asarray(grid.freqs, dtype=rotation.dtype)
    return k2 @ rotation[:2, :]


def slice_stencil(rotation, grid: FourierGrid, interpolation: str):
    """Voxels each pixel reads, for nearest or trilinear slicing.

    Returns:
      index: (P, K) int32 flat indices into the (N, N, N//2+1) half volume.
      weight: (P, K) interpolation weights (zero for a corner outside the grid).
      sign: (P, K) +1, or -1 where the voxel is the conjugate mate (imaginary part flips).
    """
    p = slice_coords(rotation, grid)
    if interpolation == "nearest":
        corners = jnp.round(p)[:, None, :]
        weight = jnp.ones(corners.shape[:2], p.dtype)
    elif interpolation == "trilinear":
        base = jnp.floor(p)
        frac = p - base
        offs = jnp.asarray(np.stack(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"), -1)
                           .reshape(8, 3), p.dtype)
        corners = base[:, None, :] + offs[None]
        weight = jnp.prod(jnp.where(offs[None] > 0, frac[:, None, :], 1 - frac[:, None, :]), -1)
    else:
        raise ValueError(f"interpolation must be 'nearest' or 'trilinear' here, got {interpolation!r}")
    return _fold(corners.astype(jnp.int32), weight, grid.box)


def _fold(q, weight, box):
    """Map integer frequencies (x, y, z) to stored half-volume voxels via V(-k) = conj V(k)."""
    mirror = q[..., 0] < 0
    q = jnp.where(mirror[..., None], -q, q)
    half = box // 2
    inside = jnp.all(jnp.abs(q) <= half, axis=-1) & (q[..., 0] <= half)
    n_x = half + 1
    index = (q[..., 2] % box) * (box * n_x) + (q[..., 1] % box) * n_x + q[..., 0]
    index = jnp.where(inside, index, 0)
    sign = jnp.where(mirror, -1.0, 1.0).astype(weight.dtype)
    return index, jnp.where(inside, weight, 0.0), sign


def gather(volume, stencil):
    """Slice: read the stencil's voxels from a pair volume (N, N, N//2+1, C) -> (P, C)."""
    index, weight, sign = stencil
    rows = jnp.asarray(volume).reshape(-1, volume.shape[-1])[index]  # (P, K, C); numpy input too
    parity = jnp.asarray([1.0, 0.0] * (volume.shape[-1] // 2), volume.dtype)
    factor = parity + (1 - parity) * sign[..., None]  # flips imaginary parts of mirrored voxels
    return jnp.einsum("pk,pkc->pc", weight, rows * factor)


def scatter(values, stencil, volume_shape):
    """Back-projection, the exact adjoint of :func:`gather`: (P, C) -> (N, N, N//2+1, C)."""
    index, weight, sign = stencil
    c = values.shape[-1]
    parity = jnp.asarray([1.0, 0.0] * (c // 2), values.dtype)
    factor = parity + (1 - parity) * sign[..., None]
    contrib = weight[..., None] * factor * values[:, None, :]  # (P, K, C)
    n_vox = int(np.prod(volume_shape))
    out = jnp.zeros((n_vox, c), values.dtype).at[index.reshape(-1)].add(contrib.reshape(-1, c))
    return out.reshape(tuple(volume_shape) + (c,))


def project(volume, rotation, grid: FourierGrid, interpolation: str = "trilinear"):
    """Central slice of a pair volume at one pose: (N, N, N//2+1, C) -> (P, C).

    ``rotation`` is RELION's matrix A (see :mod:`jaxcryo.geometry`). For ``nufft`` use
    :func:`project_nufft`, which takes a whole batch of poses at once.
    """
    if interpolation == "nufft":
        return project_nufft(volume, rotation[None], grid)[0]
    return gather(volume, slice_stencil(rotation, grid, interpolation))


def backproject(images, rotation, grid: FourierGrid, interpolation: str = "trilinear"):
    """Adjoint of :func:`project` for nearest/trilinear: (P, C) -> (N, N, N//2+1, C)."""
    return scatter(images, slice_stencil(rotation, grid, interpolation), grid.volume_shape)


def project_nufft(volume, rotations, grid: FourierGrid, eps: float = 1e-6):
    """Exact (band-limited) slices of a pair volume at B poses with one type-2 NUFFT.

    The half volume is completed to the real-space map, whose transform is then evaluated at
    every pixel's 3-D frequency. Returns (B, P, C). CPU only with the PyPI jax-finufft wheel.
    """
    from jax_finufft import nufft2  # optional backend: imported only on this path

    n = grid.box
    c = volume.shape[-1]
    vft = volume[..., 0::2] + 1j * volume[..., 1::2]  # (N, N, H, ch)
    vft = jnp.moveaxis(vft, -1, 0)
    real = jnp.fft.irfftn(hermitian_symmetrize(vft) * n, s=(n, n, n), axes=(-3, -2, -1))
    # Modes are real-space offsets from the centre voxel N//2, ordered -N/2 .. N/2-1.
    src = jnp.fft.fftshift(real, axes=(-3, -2, -1)).astype(jnp.complex128 if volume.dtype == jnp.float64 else jnp.complex64)
    pts = jnp.einsum("pi,bij->bpj", jnp.asarray(grid.freqs, rotations.dtype), rotations[:, :2, :])
    pts = (2 * jnp.pi / n) * pts.reshape(-1, 3)
    out = nufft2(src, pts[:, 2], pts[:, 1], pts[:, 0], iflag=-1, eps=eps) / n  # (ch, B*P)
    out = out.reshape(out.shape[0], rotations.shape[0], -1)
    pairs = jnp.stack([out.real, out.imag], -1)  # (ch, B, P, 2)
    return jnp.moveaxis(pairs, 0, 2).reshape(rotations.shape[0], -1, c).astype(volume.dtype)


def hermitian_symmetrize(vft):
    """Make the self-mated planes kx = 0 (and kx = N/2) of a half volume Hermitian.

    The half-volume parametrisation stores V(0, ky, kz) and V(0, -ky, -kz) separately; the real
    map they describe uses their Hermitian mean. vft: complex (..., N, N, N//2+1).
    """
    n = vft.shape[-3]
    planes = [0] + ([n // 2] if n % 2 == 0 else [])
    for x in planes:
        plane = vft[..., :, :, x]
        mate = jnp.conj(jnp.roll(jnp.flip(plane, (-2, -1)), 1, axis=(-2, -1)))
        vft = vft.at[..., :, :, x].set(0.5 * (plane + mate))
    return vft
