"""Synthetic molecules and particle stacks (for the demo, tests and benchmarks)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward.ctf import CTFParams, make_ctf_params
from jaxcryo.forward.model import render, volume_to_ft
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.geometry import matrix_to_euler, random_rotations


def synthetic_molecule(box: int = 64, *, pixel_size_angstrom: float = 2.0, n_atoms: int | None = None,
                       atom_sigma_angstrom: float = 1.5, seed: int = 0) -> np.ndarray:
    """A protein-like density: pseudo-atoms on a self-avoiding-ish chain, as a (N, N, N) map.

    Atoms follow a persistent random walk with the 3.8 A C-alpha spacing inside a sphere of
    radius 0.3 N pixels, each a Gaussian blob of ``atom_sigma_angstrom`` (a protein-like
    spectrum: strong low-resolution envelope, secondary-structure-scale texture). The map is
    centred on voxel N//2, float32, normalised to unit maximum.
    """
    rng = np.random.default_rng(seed)
    radius = 0.3 * box * pixel_size_angstrom
    if n_atoms is None:
        # about one residue per 130 A^3 of a third of the sphere's volume
        n_atoms = int(max(50, (4 / 3) * np.pi * radius ** 3 / 130.0 / 3))
    step = 3.8
    pos = np.zeros((n_atoms, 3))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    for i in range(1, n_atoms):
        for _ in range(50):
            trial_dir = direction + 0.9 * rng.normal(size=3)
            trial_dir /= np.linalg.norm(trial_dir)
            trial = pos[i - 1] + step * trial_dir
            if np.linalg.norm(trial) < radius:
                break
            direction = -pos[i - 1] / (np.linalg.norm(pos[i - 1]) + 1e-9)
        pos[i], direction = trial, trial_dir
    coords = (np.arange(box) - box // 2) * pixel_size_angstrom
    vol = np.zeros((box, box, box))
    g = lambda c: np.exp(-0.5 * ((coords[None, :] - c[:, None]) / atom_sigma_angstrom) ** 2)  # noqa: E731
    gx, gy, gz = g(pos[:, 0]), g(pos[:, 1]), g(pos[:, 2])
    for start in range(0, n_atoms, 64):
        sl = slice(start, start + 64)
        vol += np.einsum("az,ay,ax->zyx", gz[sl], gy[sl], gx[sl])
    return (vol / vol.max()).astype(np.float32)


def gaussian_blob(box: int, sigma_px: float, center_px=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A 3-D Gaussian exp(-|x - c|^2 / 2 sigma^2) on the grid centred at N//2; c as (x, y, z)."""
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    cx, cy, cz = center_px
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_px ** 2)).astype(np.float32)


class SimulatedParticles(NamedTuple):
    """Particle images and their ground truth (numpy arrays).

    images: (n, N, N) float32; euler_deg: (n, 3) RELION angles; rotations: (n, 3, 3);
    shifts_angstrom: (n, 2) rlnOriginX/YAngst; ctf: CTFParams (n,) or None;
    noise_sigma: real-space noise standard deviation that was added.
    noise_power: with a ``noise_spectrum``, the noise power E|n_k|^2 of each Fourier shell
      round(|k|) in jaxcryo's normalisation ((S,) or (n, S), like the spectrum), else None.
    """

    images: np.ndarray
    euler_deg: np.ndarray
    rotations: np.ndarray
    shifts_angstrom: np.ndarray
    ctf: CTFParams | None
    noise_sigma: float
    noise_power: np.ndarray | None = None


def simulate_particles(volume, n_images: int, *, pixel_size_angstrom: float, snr: float = 0.1,
                       seed: int = 0, with_ctf: bool = True, defocus_range_angstrom=(10000.0, 25000.0),
                       astigmatism_angstrom: float = 500.0, max_shift_px: float = 3.0,
                       interpolation: str | None = None, chunk: int = 256,
                       noise_spectrum=None) -> SimulatedParticles:
    """Project ``volume`` at uniformly random poses, apply CTF and shifts, add noise.

    SNR is the ratio of the clean images' variance to the noise variance (real space, whole
    box). ``interpolation`` defaults to 'nufft' (exact band-limited slices) on CPU and to
    'trilinear' elsewhere, where jax-finufft's wheel does not run.

    ``noise_spectrum``: coloured noise. Relative noise power per Fourier shell round(|k|) of
    the image, (S,) for every image or (n_images, S) per image (e.g. one spectrum per optics
    group); shells past S take the last value. It is scaled so that the noise variance,
    averaged over the images, is the one ``snr`` sets; the absolute power per shell is
    returned as ``noise_power``. None (default): white noise.
    """
    volume = np.asarray(volume, np.float32)
    box = volume.shape[-1]
    if interpolation is None:
        interpolation = "nufft" if jax.default_backend() == "cpu" else "trilinear"
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    rotations = np.asarray(random_rotations(key, n_images, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32))
    euler = np.asarray(matrix_to_euler(rotations), np.float64)
    shifts_px = rng.uniform(-max_shift_px, max_shift_px, (n_images, 2))
    ctf = None
    if with_ctf:
        du = rng.uniform(*defocus_range_angstrom, n_images)
        ctf = make_ctf_params(n_images, pixel_size_angstrom=pixel_size_angstrom, defocus_u_angstrom=du,
                              defocus_v_angstrom=du - astigmatism_angstrom * rng.uniform(0, 1, n_images),
                              defocus_angle_deg=rng.uniform(0, 180, n_images), amplitude_contrast=0.1)
    grid = FourierGrid(box, box // 2)
    vft = volume_to_ft(jnp.asarray(volume), interpolation)
    draw = jax.jit(lambda r, s, c: render(vft, r, s, c, grid, interpolation))
    clean = np.empty((n_images, box, box), np.float32)
    for start in range(0, n_images, chunk):
        sl = slice(start, start + chunk)
        c = None if ctf is None else CTFParams(*(f[sl] for f in ctf))
        clean[sl] = np.asarray(draw(jnp.asarray(rotations[sl], jnp.float32),
                                    jnp.asarray(shifts_px[sl], jnp.float32), c))
    signal_var = float(clean.var())
    sigma = float(np.sqrt(signal_var / snr)) if snr > 0 else 0.0
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    power = None
    if noise_spectrum is not None:
        spectrum = np.asarray(noise_spectrum, np.float64)
        if spectrum.ndim not in (1, 2) or (spectrum.ndim == 2 and spectrum.shape[0] != n_images):
            raise ValueError(f"noise_spectrum must be (S,) or ({n_images}, S), got {spectrum.shape}")
        k = np.fft.fftfreq(box, 1.0 / box)
        shells = np.rint(np.hypot(k[:, None], k[None, :])).astype(int)  # full (N, N) spectrum
        per_pixel = np.take(spectrum, np.minimum(shells, spectrum.shape[-1] - 1), axis=-1)  # (N, N) or (n, N, N)
        power = sigma ** 2 * spectrum / float(np.mean(per_pixel))
        amplitude = np.sqrt(sigma ** 2 * per_pixel / float(np.mean(per_pixel)))
        for start in range(0, n_images, chunk):
            sl = slice(start, start + chunk)
            a = amplitude if amplitude.ndim == 2 else amplitude[sl]
            noise[sl] = np.real(np.fft.ifft2(np.fft.fft2(noise[sl]) * a)).astype(np.float32)
    else:
        noise *= sigma
    images = clean + noise
    return SimulatedParticles(images=images, euler_deg=euler, rotations=rotations.astype(np.float32),
                              shifts_angstrom=shifts_px * pixel_size_angstrom, ctf=ctf, noise_sigma=sigma,
                              noise_power=power)


def oracle_shell_lam(volume_ft, noise_sigma: float, n_images: float) -> tuple:
    """The MAP (Wiener) prior of a simulation whose signal spectrum and noise are known.

    With noise of variance sigma^2 per Fourier pixel and a Gaussian prior of variance
    tau_k^2 = mean |V_k|^2 over the map's shell k, the posterior objective in jaxcryo's units
    (data term averaged over n images; prior (1/2) sum_full lam_k |v_k|^2, see
    :meth:`jaxcryo.loss.Problem.regularizer`) has lam_k = 2 sigma^2 / (n tau_k^2). A prior
    shared by every method: its optimum is the minimum-MSE map, so the methods can be compared
    on one objective (used by ``jaxcryo demo``). Returns per-shell weights (shell 0 undamped).

    Args:
      volume_ft: (N, N, N//2+1, 2) Fourier pairs of the true map.
      noise_sigma: the noise standard deviation added (real space = Fourier, per pixel).
      n_images: images per reconstruction (per half-set when there are two).
    """
    from jaxcryo.geometry import shell_index, volume_radius

    v = np.asarray(volume_ft, np.float64)
    box = v.shape[0]
    power = (v ** 2).sum(-1).ravel()
    shells = shell_index(volume_radius(box)).ravel()
    tau2 = np.bincount(shells, power) / np.maximum(np.bincount(shells), 1)
    lam = 2.0 * float(noise_sigma) ** 2 / (float(n_images) * np.maximum(tau2, 1e-30 * tau2.max()))
    lam[0] = 0.0
    return tuple(float(x) for x in lam)
