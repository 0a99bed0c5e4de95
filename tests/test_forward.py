"""The forward model against exact references: adjoints, DFTs, analytic and brute-force projections,
shifts and the CTF."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_euler, random_pairs
from jaxcryo.forward import (FourierGrid, backproject, ctf, electron_wavelength_angstrom, ft_to_images,
                             ft_to_volume, gather, images_to_ft, make_ctf_params, prepare_particles, project,
                             project_nufft, render, scatter, slice_stencil, volume_to_ft)
from jaxcryo.geometry import euler_to_matrix
from jaxcryo.simulate import gaussian_blob


def _corr(a, b):
    a = np.ravel(a) - np.mean(a)
    b = np.ravel(b) - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# One compile per configuration instead of one per primitive (eager dispatch is slow on CPU).
_render = jax.jit(render, static_argnames=("grid", "interpolation"))
_ctf = jax.jit(ctf, static_argnames=("box",))


@functools.partial(jax.jit, static_argnames=("grid", "interpolation"))
def _adjoint_sides(x, y, rotation, grid, interpolation):
    stencil = slice_stencil(rotation, grid, interpolation)
    ax = gather(x, stencil)
    return jnp.vdot(ax, y), jnp.vdot(x, scatter(y, stencil, grid.volume_shape)), jnp.linalg.norm(ax)


def _rotation(rng):
    return jnp.asarray(euler_to_matrix(random_euler(rng, 1))[0], jnp.float32)


# ---------------------------------------------------------------- adjoint identity


@pytest.mark.parametrize("interpolation", ["nearest", "trilinear"])
@pytest.mark.parametrize("box", [8, 9, 12])
@pytest.mark.parametrize("channels", [2, 4])
def test_gather_scatter_adjoint(rng, interpolation, box, channels):
    """<A x, y> = <x, A* y> in the real inner product over pairs, for random x, y and pose."""
    grid = FourierGrid(box)
    for _ in range(3):
        x = random_pairs(rng, grid.volume_shape + (channels,))
        y = random_pairs(rng, (grid.n_pixels, channels))
        lhs, rhs, norm_ax = map(float, _adjoint_sides(x, y, _rotation(rng), grid, interpolation))
        assert abs(lhs - rhs) <= 1e-5 * norm_ax * float(jnp.linalg.norm(y)), (lhs, rhs)


@pytest.mark.parametrize("interpolation", ["nearest", "trilinear"])
def test_project_backproject_are_adjoint_and_agree_with_vjp(rng, interpolation):
    grid = FourierGrid(10)
    rotation = _rotation(rng)
    x = random_pairs(rng, grid.volume_shape + (2,))
    y = random_pairs(rng, (grid.n_pixels, 2))
    _, vjp = jax.vjp(lambda v: project(v, rotation, grid, interpolation), x)
    np.testing.assert_allclose(vjp(y)[0], backproject(y, rotation, grid, interpolation), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- exact slices


def _direct_dft(volume, points):
    """jaxcryo's parameters of a real (N, N, N) map at arbitrary 3-D frequencies (x, y, z), brute force."""
    n = volume.shape[0]
    u = np.arange(n) - n // 2
    uz, uy, ux = np.meshgrid(u, u, u, indexing="ij")
    phase = np.exp(-2j * np.pi * (points[:, 0, None] * ux.ravel() + points[:, 1, None] * uy.ravel()
                                  + points[:, 2, None] * uz.ravel()) / n)
    return phase @ volume.ravel().astype(np.float64) / n


@pytest.mark.parametrize("interpolation", ["nearest", "trilinear", "nufft"])
@pytest.mark.parametrize("box", [8, 9])
def test_identity_slice_is_the_projection(rng, interpolation, box):
    """The central slice at A = I is exactly the transform of the sum along z (image normalisation)."""
    if interpolation == "nufft":
        pytest.importorskip("jax_finufft")
    grid = FourierGrid(box)
    volume = rng.standard_normal((box,) * 3).astype(np.float32)
    vft = volume_to_ft(jnp.asarray(volume))
    got = project(vft, jnp.eye(3), grid, interpolation)
    want = images_to_ft(jnp.asarray(volume.sum(0)), grid)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("box", [8, 9])
def test_nufft_equals_direct_dft(rng, box):
    """project_nufft at a random pose is the exact trigonometric interpolant (direct sum)."""
    pytest.importorskip("jax_finufft")
    grid = FourierGrid(box)
    volume = rng.standard_normal((box,) * 3).astype(np.float32)
    rotations = jnp.asarray(euler_to_matrix(random_euler(rng, 2)), jnp.float32)
    got = np.asarray(project_nufft(volume_to_ft(jnp.asarray(volume)), rotations, grid))
    for b in range(2):
        points = grid.freqs @ np.asarray(rotations[b], np.float64)[:2, :]
        want = _direct_dft(volume, points)
        np.testing.assert_allclose(got[b, :, 0] + 1j * got[b, :, 1], want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("interpolation", ["nearest", "trilinear"])
def test_integer_pose_slices_are_exact(rng, interpolation):
    """A 90-degree pose maps pixels to voxels, where nearest, trilinear and NUFFT all agree exactly."""
    pytest.importorskip("jax_finufft")
    box = 10
    grid = FourierGrid(box)
    vft = volume_to_ft(jnp.asarray(rng.standard_normal((box,) * 3).astype(np.float32)))
    rotations = jnp.asarray(euler_to_matrix(np.array([[90.0, 90.0, 0.0], [0.0, 90.0, -90.0], [180.0, 90, 90]])),
                            jnp.float32)
    exact = project_nufft(vft, rotations, grid)
    for b in range(rotations.shape[0]):
        np.testing.assert_allclose(project(vft, rotations[b], grid, interpolation), exact[b], atol=2e-4)


def test_nufft_close_to_trilinear_on_smooth_volume(rng):
    """A compact, nearly centred map has a smooth transform: trilinear is within 4 %, nearest 20 %."""
    pytest.importorskip("jax_finufft")
    box = 24
    grid = FourierGrid(box)
    vft = volume_to_ft(jnp.asarray(gaussian_blob(box, 1.0, (0.5, -1.0, 0.5))))
    rotations = jnp.asarray(euler_to_matrix(random_euler(rng, 3)), jnp.float32)
    exact = np.asarray(project_nufft(vft, rotations, grid))
    errors = {}
    for interpolation in ("trilinear", "nearest"):
        approx = np.asarray(jax.vmap(lambda r: project(vft, r, grid, interpolation))(rotations))
        errors[interpolation] = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert errors["trilinear"] < 0.04 and errors["nearest"] < 0.2, errors
    assert errors["trilinear"] < 0.5 * errors["nearest"], errors


# ---------------------------------------------------------------- Fourier slice theorem


@pytest.mark.parametrize("interpolation", ["nufft", "trilinear"])
def test_gaussian_blob_projects_to_analytic_gaussian(rng, interpolation):
    """An off-centre 3-D Gaussian projects to sigma sqrt(2 pi) exp(-|x - (A c)_xy|^2 / 2 sigma^2).

    NUFFT slices are exact (max error 1e-4 of the peak); unpadded trilinear slicing attenuates
    the blob's phase ramp (about 10 % peak error here), so it is held to correlation > 0.995.
    """
    if interpolation == "nufft":
        pytest.importorskip("jax_finufft")
    box, sigma = 32, 2.0
    center = np.array([3.0, -2.0, 4.0])
    vft = volume_to_ft(jnp.asarray(gaussian_blob(box, sigma, center)))
    grid = FourierGrid(box)
    euler = np.r_[[[90.0, 0.0, 0.0], [0.0, 90.0, 0.0], [30.0, 60.0, -45.0]], random_euler(rng, 2)]
    rotations = np.asarray(euler_to_matrix(euler), np.float64)
    images = np.asarray(_render(vft, jnp.asarray(rotations, jnp.float32), jnp.zeros((len(euler), 2)), None,
                               grid, interpolation))
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    for image, a in zip(images, rotations):
        cx, cy, _ = a @ center
        want = sigma * np.sqrt(2 * np.pi) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))
        if interpolation == "nufft":
            assert np.abs(image - want).max() <= 1e-4 * want.max()
        assert _corr(image, want) > 0.995


def _trilinear_sample(volume, points):
    """Real-space trilinear interpolation of a [z, y, x] volume at centred (x, y, z) points; 0 outside."""
    n = volume.shape[0]
    p = points + n // 2
    base = np.floor(p).astype(int)
    frac = p - base
    out = np.zeros(len(points))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                q = base + np.array([dx, dy, dz])
                w = np.prod(np.where(np.array([dx, dy, dz]) > 0, frac, 1 - frac), axis=1)
                ok = np.all((q >= 0) & (q < n), axis=1)
                qc = np.clip(q, 0, n - 1)
                out += np.where(ok, w * volume[qc[:, 2], qc[:, 1], qc[:, 0]], 0.0)
    return out


@pytest.mark.parametrize("interpolation", ["nufft", "trilinear"])
def test_fourier_slice_matches_real_space_rotate_and_sum(rng, interpolation):
    """Brute force: image(x, y) = sum_z V(A.T (x, y, z)) (RELION: a point c lands at (A c)_xy).

    Correlation > 0.995 for NUFFT; unpadded trilinear slicing at box 16 reaches about 0.985, so it is
    held to 0.98. Sampling with A instead of A.T must do clearly worse.
    """
    if interpolation == "nufft":
        pytest.importorskip("jax_finufft")
    box = 16
    volume = (gaussian_blob(box, 1.5, (2, -1, 1)) + 0.7 * gaussian_blob(box, 1.8, (-3, 2, -2))
              + 0.5 * gaussian_blob(box, 1.5, (0, 3, -3)))
    vft = volume_to_ft(jnp.asarray(volume))
    grid = FourierGrid(box, box // 2)
    euler = random_euler(rng, 3)
    rotations = np.asarray(euler_to_matrix(euler), np.float64)
    images = np.asarray(_render(vft, jnp.asarray(rotations, jnp.float32), jnp.zeros((3, 2)), None, grid,
                               interpolation))
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x.ravel(), y.ravel(), z.ravel()], -1).astype(np.float64)
    for image, a in zip(images, rotations):
        brute = _trilinear_sample(volume, pts @ a).reshape(box, box, box).sum(0)
        assert _corr(image, brute) > (0.995 if interpolation == "nufft" else 0.98)
        transposed = _trilinear_sample(volume, pts @ a.T).reshape(box, box, box).sum(0)
        assert _corr(image, transposed) < 0.9


# ---------------------------------------------------------------- round trips and shifts


@pytest.mark.parametrize("box", [8, 9])
def test_volume_round_trip(rng, box):
    volume = rng.standard_normal((box,) * 3).astype(np.float32)
    np.testing.assert_allclose(ft_to_volume(volume_to_ft(jnp.asarray(volume))), volume, atol=1e-5)


def test_white_noise_has_unit_fourier_variance(rng):
    box = 32
    pairs = images_to_ft(jnp.asarray(rng.standard_normal((64, box, box)), jnp.float32), FourierGrid(box))
    power = np.asarray(pairs[..., 0] ** 2 + pairs[..., 1] ** 2)[:, FourierGrid(box).freqs[:, 0] > 0]
    assert abs(power.mean() - 1.0) < 0.02


@pytest.mark.parametrize("shift", [(2, 0), (0, 3), (-3, 1)])
def test_integer_shift_is_a_roll_by_minus_origin(rng, shift):
    """RELION's origin (rlnOriginX/YAngst / pixel size) centres the particle: the rendered image is
    the centred projection rolled by -origin, i.e. np.roll(image, (-dy, -dx))."""
    box = 12
    grid = FourierGrid(box)
    vft = volume_to_ft(jnp.asarray(rng.standard_normal((box,) * 3).astype(np.float32)))
    rotations = jnp.asarray(euler_to_matrix(random_euler(rng, 2)), jnp.float32)
    ctf_params = make_ctf_params(2, pixel_size_angstrom=2.0)
    zero = np.asarray(_render(vft, rotations, jnp.zeros((2, 2)), ctf_params, grid))
    shifted = np.asarray(_render(vft, rotations, jnp.asarray([shift, shift], jnp.float32), ctf_params, grid))
    dx, dy = shift
    np.testing.assert_allclose(shifted, np.roll(zero, (-dy, -dx), axis=(-2, -1)), atol=1e-5)


def test_prepare_particles_undoes_the_shift(rng):
    box = 12
    grid = FourierGrid(box)
    vft = volume_to_ft(jnp.asarray(rng.standard_normal((box,) * 3).astype(np.float32)))
    rotations = jnp.asarray(euler_to_matrix(random_euler(rng, 3)), jnp.float32)
    shifts = jnp.asarray(rng.uniform(-3, 3, (3, 2)), jnp.float32)
    images = _render(vft, rotations, shifts, None, grid)
    particles = prepare_particles(images, rotations, shifts, None, grid)
    centred = images_to_ft(_render(vft, rotations, jnp.zeros((3, 2)), None, grid), grid)
    np.testing.assert_allclose(particles.data, centred, atol=1e-5)
    np.testing.assert_allclose(ft_to_images(particles.data, grid), _render(vft, rotations, jnp.zeros((3, 2)),
                                                                          None, grid), atol=1e-5)
    assert particles.weight.shape == (3,) and float(particles.weight.min()) == 1.0


# ---------------------------------------------------------------- CTF


def _one(params):
    return jax.tree.map(lambda f: jnp.asarray(f[0]), params)


def test_electron_wavelength():
    assert float(electron_wavelength_angstrom(300.0)) == pytest.approx(0.019687, abs=2e-6)
    assert float(electron_wavelength_angstrom(200.0)) == pytest.approx(0.025079, abs=2e-6)


@pytest.mark.parametrize("q", [0.07, 0.1, 0.2])
def test_ctf_at_zero_frequency_is_amplitude_contrast(q):
    params = _one(make_ctf_params(1, pixel_size_angstrom=1.5, amplitude_contrast=q))
    value = float(_ctf(np.zeros((1, 2)), params, 64)[0])
    assert value == pytest.approx(np.sin(np.arctan(q / np.sqrt(1 - q * q))), rel=1e-5)
    assert value == pytest.approx(q, rel=1e-5)


def test_ctf_first_zero_for_cs_zero():
    """Cs = 0, Q = 0: CTF = sin(pi lambda dz u^2), first zero at u = 1 / sqrt(lambda dz), positive before."""
    box, apix, defocus = 128, 1.0, 20000.0
    params = _one(make_ctf_params(1, pixel_size_angstrom=apix, defocus_u_angstrom=defocus, cs_mm=0.0,
                                  amplitude_contrast=0.0, dtype=np.float64))
    k = np.linspace(0.05, 30.0, 6000)
    values = np.asarray(_ctf(np.stack([k, np.zeros_like(k)], -1), params, box), np.float64)
    first = np.nonzero(np.diff(np.sign(values)) != 0)[0][0]
    u_zero = k[first] / (box * apix)
    expected = 1.0 / np.sqrt(float(electron_wavelength_angstrom(300.0)) * defocus)
    assert u_zero == pytest.approx(expected, rel=2e-3)
    assert values[: first - 1].min() > 0


def test_ctf_astigmatism_angle_rotates_the_pattern(rng):
    box = 64
    base = dict(pixel_size_angstrom=1.2, defocus_u_angstrom=15000.0, defocus_v_angstrom=11000.0)
    theta = 37.0
    p0 = _one(make_ctf_params(1, defocus_angle_deg=0.0, **base))
    p1 = _one(make_ctf_params(1, defocus_angle_deg=theta, **base))
    k = rng.uniform(-20, 20, (200, 2))
    c, s = np.cos(np.deg2rad(theta)), np.sin(np.deg2rad(theta))
    rotated = k @ np.array([[c, s], [-s, c]])  # k rotated by +theta
    np.testing.assert_allclose(_ctf(rotated, p1, box), _ctf(k, p0, box), atol=2e-4)
    assert np.abs(np.asarray(_ctf(k, p1, box) - _ctf(k, p0, box))).max() > 0.1
    # defocus U lies along the angle: the phase grows fastest along it
    along = np.array([[10 * c, 10 * s]])
    across = np.array([[-10 * s, 10 * c]])
    pu = _one(make_ctf_params(1, defocus_angle_deg=theta, cs_mm=0.0, amplitude_contrast=0.0,
                              pixel_size_angstrom=1.2, defocus_u_angstrom=15000.0, defocus_v_angstrom=15000.0))
    np.testing.assert_allclose(_ctf(along, p1, box), _ctf(along, pu._replace(cs_mm=p1.cs_mm,
                               amplitude_contrast=p1.amplitude_contrast), box), atol=1e-5)
    assert not np.allclose(_ctf(across, p1, box), _ctf(across, pu._replace(cs_mm=p1.cs_mm,
                           amplitude_contrast=p1.amplitude_contrast), box), atol=1e-3)


def test_ctf_bfactor_envelope(rng):
    box, apix, b = 64, 1.5, 80.0
    k = rng.uniform(-30, 30, (50, 2))
    p = make_ctf_params(1, pixel_size_angstrom=apix)
    u2 = (k ** 2).sum(-1) / (box * apix) ** 2
    np.testing.assert_allclose(_ctf(k, _one(p._replace(bfactor_angstrom2=np.array([b], np.float32))), box),
                               np.asarray(_ctf(k, _one(p), box)) * np.exp(-b * u2 / 4), atol=1e-5)
