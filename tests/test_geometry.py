"""RELION Euler angles, Fourier grids and shells, and the FSC."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import random_euler
from jaxcryo.forward import FourierGrid
from jaxcryo.fsc import fsc, fsc_ft, resolution, shell_frequencies
from jaxcryo.geometry import (default_alpha, euler_to_matrix, half_image_weights, image_freqs, matrix_to_euler,
                              random_rotations, shell_counts, volume_freqs)


def _relion_zyz(rot, tilt, psi):
    """RELION's Euler_angles2matrix written out: A = Rz(psi) Ry(tilt) Rz(rot), passive rotations."""
    def rz(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    return rz(psi) @ ry(tilt) @ rz(rot)


def test_euler_matrices_are_rotations(rng):
    a = np.asarray(euler_to_matrix(random_euler(rng, 200)), np.float64)
    np.testing.assert_allclose(a @ a.transpose(0, 2, 1), np.broadcast_to(np.eye(3), a.shape), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(a), 1.0, atol=1e-6)


@pytest.mark.parametrize("euler", [(90, 0, 0), (0, 90, 0), (0, 0, 90), (30, 45, -60), (-120, 170, 10),
                                   (200, 30, 400)])
def test_euler_matches_relion_formula(euler):
    np.testing.assert_allclose(euler_to_matrix(np.array(euler, np.float32)), _relion_zyz(*euler), atol=1e-6)


def test_known_relion_matrices():
    np.testing.assert_allclose(euler_to_matrix(np.array([90.0, 0, 0])), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]],
                               atol=1e-6)
    np.testing.assert_allclose(euler_to_matrix(np.array([0.0, 90, 0])), [[0, 0, -1], [0, 1, 0], [1, 0, 0]],
                               atol=1e-6)


def test_matrix_to_euler_round_trip(rng):
    """Matrices (not angles) must survive the round trip, including tilt at and near 0 and 180."""
    euler = random_euler(rng, 100)
    special = np.array([[30, 0, 40], [30, 180, 40], [-70, 1e-3, 20], [10, 180 - 1e-3, -50], [0, 0, 0],
                        [123, 90, -45], [-179.9, 0.5, 179.9], [45, 179.5, 45]])
    euler = np.r_[euler, special]
    with jax.enable_x64(True):
        a = np.asarray(euler_to_matrix(euler))
        back = np.asarray(matrix_to_euler(a))
        np.testing.assert_allclose(euler_to_matrix(back), a, atol=1e-9)
    assert np.all((back[:, 1] >= 0) & (back[:, 1] <= 180))
    a32 = euler_to_matrix(euler.astype(np.float32))
    np.testing.assert_allclose(euler_to_matrix(matrix_to_euler(a32)), a32, atol=2e-5)


def test_random_rotations_are_uniform_ish():
    r = np.asarray(random_rotations(jax.random.PRNGKey(0), 4000), np.float64)
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
    # E[R] = 0 for Haar measure; each entry has variance 1/3, so the sample mean has sd 0.009
    assert np.abs(r.mean(0)).max() < 0.05
    # and the viewing direction (third row) is uniform on the sphere: E[z^2] = 1/3
    np.testing.assert_allclose((r[:, 2, :] ** 2).mean(0), 1 / 3, atol=0.03)


# ---------------------------------------------------------------- grids and shells


@pytest.mark.parametrize("box", [8, 9])
def test_grid_layouts_match_numpy_fft(box, rng):
    img = rng.standard_normal((box, box))
    ft = np.fft.rfft2(img)
    freqs = image_freqs(box)
    assert freqs.shape == ft.shape + (2,)
    # the rfft2 pixel (iy, ix) is the frequency (kx, ky) = freqs[iy, ix]: check with one plane wave
    kx, ky = 2, -3
    c = np.arange(box)
    wave = np.exp(2j * np.pi * (kx * c[None, :] + ky * c[:, None]) / box).real
    peak = np.unravel_index(np.abs(np.fft.rfft2(wave)).argmax(), ft.shape)
    np.testing.assert_array_equal(freqs[peak], [kx, ky])
    vf = volume_freqs(box)
    assert vf.shape == (box, box, box // 2 + 1, 3)
    np.testing.assert_array_equal(vf[1, 2, 3], [3, 2, 1])


@pytest.mark.parametrize("box", [8, 9])
def test_fourier_grid_pack_unpack_and_multiplicity(box, rng):
    grid = FourierGrid(box)
    ft = np.fft.rfft2(rng.standard_normal((2, box, box)))
    pairs = grid.pack(ft)
    assert pairs.shape == (2, grid.n_pixels, 2)
    back = np.asarray(grid.unpack(pairs))
    inside = np.linalg.norm(image_freqs(box), axis=-1) <= grid.radius
    np.testing.assert_allclose(back[:, inside], ft[:, inside], rtol=1e-5, atol=1e-5)
    assert np.all(back[:, ~inside] == 0)
    np.testing.assert_array_equal(grid.multiplicity, half_image_weights(box).ravel()[grid.flat_index])
    # weighted half-plane power = full-spectrum power (Parseval over the disk)
    full = np.fft.fft2(rng.standard_normal((box, box)))
    half = np.fft.rfft2(np.fft.ifft2(full).real)
    k = np.fft.fftfreq(box, 1.0 / box)
    disk = np.hypot(k[:, None], k[None, :]) <= grid.radius
    full_power = np.sum(np.abs(np.fft.fft2(np.fft.ifft2(full).real))[disk] ** 2)
    half_power = np.sum(grid.multiplicity * np.abs(half.ravel()[grid.flat_index]) ** 2)
    np.testing.assert_allclose(half_power, full_power, rtol=1e-10)


def test_shell_counts_and_default_alpha():
    counts = shell_counts(16)
    assert counts.sum() == 16 ** 3 and counts[0] == 1 and counts[1] == 6 + 12  # round(|k|) = 1: |k| < 1.5
    assert default_alpha(16) == pytest.approx(1.0 / counts[:9].max())


# ---------------------------------------------------------------- FSC


def test_fsc_identical_maps_is_one(rng):
    vol = rng.standard_normal((16, 16, 16))
    curve = fsc(vol, 3.0 * vol)
    assert curve.shape == (9,)
    np.testing.assert_allclose(curve, 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(vol, -vol), -1.0, atol=1e-12)


def test_fsc_of_independent_noise_is_near_zero(rng):
    box = 32
    curve = fsc(rng.standard_normal((box,) * 3), rng.standard_normal((box,) * 3))
    # shell s holds ~ 4 pi s^2 independent complex voxels: sd of the FSC ~ 1 / sqrt(2 pi s^2)
    high = curve[8:]
    assert np.abs(high).max() < 0.1
    assert abs(high.mean()) < 0.02


def test_fsc_ft_matches_fsc(rng):
    from jaxcryo.forward import volume_to_ft
    a, b = rng.standard_normal((2, 12, 12, 12)).astype(np.float32)
    b = a + 0.5 * b
    np.testing.assert_allclose(fsc_ft(volume_to_ft(a), volume_to_ft(b)), fsc(a, b), atol=1e-5)


def test_resolution_interpolates_the_crossing():
    box, apix = 32, 1.5
    freqs = shell_frequencies(box, apix)
    # a line from 1 at shell 0 to 0 at shell 16: crosses 0.143 at shell 16 (1 - 0.143)
    curve = 1.0 - np.arange(17) / 16.0
    expected = 1.0 / (16 * (1 - 0.143) / (box * apix))
    assert resolution(curve, apix) == pytest.approx(expected, rel=1e-9)
    assert resolution(curve, apix, threshold=0.5) == pytest.approx(1.0 / freqs[8], rel=1e-9)
    assert resolution(np.ones(17), apix) == pytest.approx(2 * apix)
    # only the first crossing counts
    bumpy = np.r_[1.0, 0.9, 0.1, 0.9, np.zeros(13)]
    assert resolution(bumpy, apix, threshold=0.5) == pytest.approx(box * apix / 1.5, rel=1e-9)  # shell 1.5
