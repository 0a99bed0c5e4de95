"""The contrast transfer function with RELION's parameters and sign, and in-plane shifts."""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class CTFParams(NamedTuple):
    """Per-image optics, each field an array of shape (n,) (or scalar for one image).

    Field names follow RELION's columns: rlnDefocusU/V (Angstrom), rlnDefocusAngle (degrees),
    rlnVoltage (kV), rlnSphericalAberration (mm), rlnAmplitudeContrast, rlnPhaseShift (degrees),
    rlnCtfBfactor (Angstrom^2), and the image pixel size (Angstrom).
    """

    defocus_u_angstrom: jnp.ndarray
    defocus_v_angstrom: jnp.ndarray
    defocus_angle_deg: jnp.ndarray
    voltage_kv: jnp.ndarray
    cs_mm: jnp.ndarray
    amplitude_contrast: jnp.ndarray
    phase_shift_deg: jnp.ndarray
    bfactor_angstrom2: jnp.ndarray
    pixel_size_angstrom: jnp.ndarray


def make_ctf_params(n, *, pixel_size_angstrom, defocus_u_angstrom=15000.0, defocus_v_angstrom=None,
                    defocus_angle_deg=0.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1,
                    phase_shift_deg=0.0, bfactor_angstrom2=0.0, dtype=np.float32) -> CTFParams:
    """CTFParams for n images, broadcasting scalars. DefocusV defaults to DefocusU."""
    defocus_v_angstrom = defocus_u_angstrom if defocus_v_angstrom is None else defocus_v_angstrom
    vals = dict(defocus_u_angstrom=defocus_u_angstrom, defocus_v_angstrom=defocus_v_angstrom,
                defocus_angle_deg=defocus_angle_deg, voltage_kv=voltage_kv, cs_mm=cs_mm,
                amplitude_contrast=amplitude_contrast, phase_shift_deg=phase_shift_deg,
                bfactor_angstrom2=bfactor_angstrom2, pixel_size_angstrom=pixel_size_angstrom)
    return CTFParams(**{k: np.broadcast_to(np.asarray(v, dtype), (n,)).copy() for k, v in vals.items()})


def electron_wavelength_angstrom(voltage_kv):
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643247 / jnp.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf(freqs, params: CTFParams, box: int):
    """CTF values at integer Fourier-pixel frequencies for one image.

    Args:
      freqs: (P, 2) frequencies (kx, ky) in Fourier pixels.
      params: CTFParams of one image (scalar fields).
      box: image edge N, so that spatial frequency = k / (N * pixel size) in 1/Angstrom.
    Returns:
      (P,) real CTF, RELION's convention: -sin(pi lambda dz u^2 + pi/2 Cs lambda^3 u^4 - phase
      - atan(Q/sqrt(1-Q^2))) times exp(-B u^2 / 4), dz = -(defocus along the pixel's azimuth).
    """
    freqs = jnp.asarray(freqs, dtype=jnp.result_type(params.pixel_size_angstrom, jnp.float32))
    sx = freqs[:, 0] / (box * params.pixel_size_angstrom)
    sy = freqs[:, 1] / (box * params.pixel_size_angstrom)
    u2 = sx * sx + sy * sy
    lam = electron_wavelength_angstrom(params.voltage_kv)
    azimuth = jnp.deg2rad(params.defocus_angle_deg)
    angle = jnp.arctan2(sy, sx) - azimuth
    mean = -(params.defocus_u_angstrom + params.defocus_v_angstrom) * 0.5
    dev = -(params.defocus_u_angstrom - params.defocus_v_angstrom) * 0.5
    deltaf = mean + dev * jnp.cos(2.0 * angle)
    q = params.amplitude_contrast
    k3 = jnp.arctan(q / jnp.sqrt(1.0 - q * q))
    k5 = jnp.deg2rad(params.phase_shift_deg)
    cs = params.cs_mm * 1e7
    arg = jnp.pi * lam * deltaf * u2 + 0.5 * jnp.pi * cs * lam ** 3 * u2 * u2 - k5 - k3
    return -jnp.sin(arg) * jnp.exp(-0.25 * params.bfactor_angstrom2 * u2)


def shift_phase(freqs, shift_px, box: int):
    """Phase ramp that translates an image by ``-shift_px``, shift_px = (dx, dy) pixels: (P, 2).

    RELION's rlnOriginX/YAngst (divided by the pixel size) is the translation that centres the
    particle, so the particle is the centred projection translated by -origin (checked against
    relion_project 3.1): the model image is the projection times exp(+2 pi i k.s / N).
    """
    freqs = jnp.asarray(freqs, dtype=shift_px.dtype)
    phase = 2.0 * jnp.pi * (freqs @ shift_px) / box
    return jnp.stack([jnp.cos(phase), jnp.sin(phase)], axis=-1)


def complex_multiply(a, b):
    """Product of pair arrays (..., 2) x (..., 2)."""
    return jnp.stack([a[..., 0] * b[..., 0] - a[..., 1] * b[..., 1],
                      a[..., 0] * b[..., 1] + a[..., 1] * b[..., 0]], axis=-1)


def conj_multiply(a, b):
    """conj(a) * b for pair arrays."""
    return jnp.stack([a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1],
                      a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]], axis=-1)
