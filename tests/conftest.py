"""Tiny shared fixtures for the numerical tests (nothing global: no x64, no device settings).

Builders are plain functions so that a test can call them inside ``jax.enable_x64(True)``
and get float64 data; the fixtures wrap them at float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.forward import FourierGrid, Particles, make_ctf_params
from jaxcryo.geometry import euler_to_matrix
from jaxcryo.loss import Problem


def random_euler(rng, n):
    """(n, 3) RELION angles (rot, tilt, psi) in degrees, tilt uniform in cos."""
    rot = rng.uniform(-180, 180, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, n)))
    psi = rng.uniform(-180, 180, n)
    return np.stack([rot, tilt, psi], -1)


def random_pairs(rng, shape, dtype=np.float32):
    """Standard normal real array of ``shape`` (a pair volume or pair image)."""
    return jnp.asarray(rng.standard_normal(shape), dtype)


def make_particles(rng, problem: Problem, n: int, *, dtype=np.float32, with_ctf=True, pad=0):
    """n random particles (data, poses, CTF) for ``problem``, plus ``pad`` zero-weight rows."""
    grid = problem.grid
    total = n + pad
    rotations = jnp.asarray(euler_to_matrix(random_euler(rng, total)), dtype)
    data = random_pairs(rng, (total, grid.n_pixels, 2), dtype)
    ctf = None
    if with_ctf:
        du = rng.uniform(8000, 20000, total)
        ctf = make_ctf_params(total, pixel_size_angstrom=3.0, defocus_u_angstrom=du,
                              defocus_v_angstrom=du - 500.0, defocus_angle_deg=rng.uniform(0, 180, total),
                              dtype=dtype)
        ctf = jax.tree.map(jnp.asarray, ctf)
    weight = jnp.asarray(np.r_[np.ones(n), np.zeros(pad)], dtype)
    return Particles(data=data, rotations=rotations, ctf=ctf, weight=weight)


def make_problem(box=6, interpolation="trilinear", lam=0.0, shell_weights=None):
    """A Problem on a box-``box`` grid with the default disk."""
    return Problem(grid=FourierGrid(box), interpolation=interpolation, lam=lam, shell_weights=shell_weights)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
