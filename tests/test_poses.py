"""The pose stage: grids, dense-product scores against their brute-force twin, recovery of
known poses and shifts from noise-free projections, CTF and noise weights, posteriors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo import poses
from jaxcryo.forward import FourierGrid, make_ctf_params, prepare_particles, render, volume_to_ft
from jaxcryo.forward.model import ctf_batch
from jaxcryo.geometry import random_rotations
from jaxcryo.loss import Problem, per_image_loss
from jaxcryo.simulate import synthetic_molecule

PIXEL_SIZE = 4.0
_STATIC = ("grid", "r_limit", "interpolation", "chunk", "precision")
# jitted once per shape for the whole file (eager lax.map would compile its body on every call)
score_poses = jax.jit(poses.score_poses, static_argnames=_STATIC)
score_local = jax.jit(poses.score_local, static_argnames=_STATIC)
_render = jax.jit(render, static_argnames=("grid", "interpolation"))
_prepare = jax.jit(prepare_particles, static_argnames=("grid",))
_ctf_batch = jax.jit(ctf_batch, static_argnums=(1, 2, 3))


def _ctf_values(ctf_params, grid, n):
    return _ctf_batch(ctf_params, grid, n, jnp.float32)


@functools.lru_cache(maxsize=None)
def _volume(box):
    return volume_to_ft(jnp.asarray(synthetic_molecule(box, pixel_size_angstrom=PIXEL_SIZE, seed=3)), "trilinear")


def _ctf(rng, n, defocus=None):
    du = rng.uniform(10000, 20000, n) if defocus is None else np.broadcast_to(defocus, (n,))
    return jax.tree.map(jnp.asarray, make_ctf_params(n, pixel_size_angstrom=PIXEL_SIZE, defocus_u_angstrom=du,
                                                     defocus_v_angstrom=du - 300.0, defocus_angle_deg=30.0))


def _particles(grid, rotations, shifts_px, ctf_params, prepared_shift_px=None):
    """Noise-free images rendered at the true poses, prepared with ``prepared_shift_px``."""
    vol = _volume(grid.box)
    b = rotations.shape[0]
    images = _render(vol, jnp.asarray(rotations), jnp.asarray(shifts_px, jnp.float32), ctf_params, grid)
    t0 = np.zeros((b, 2), np.float32) if prepared_shift_px is None else prepared_shift_px
    return _prepare(images, jnp.asarray(rotations), jnp.asarray(t0), ctf_params, grid)


# ----------------------------------------------------------------------------- grids

@pytest.mark.parametrize("order", [0, 1, 2])
def test_so3_grid_count_and_matrices(order):
    g = poses.so3_grid(order)
    nside = 2 ** order
    assert g.shape == (12 * nside ** 2 * 6 * nside, 3, 3)
    assert poses.angular_step_deg(order) == pytest.approx(360.0 / (6 * nside))
    np.testing.assert_allclose(np.einsum("mji,mjk->mik", g, g), np.broadcast_to(np.eye(3), g.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-5)
    theta, phi = poses.healpix_directions(nside)
    # the viewing direction (third row of A) is the HEALPix pixel centre, each with 6 nside psi
    dirs = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    np.testing.assert_allclose(g[:, 2, :], np.repeat(dirs, 6 * nside, axis=0), atol=1e-5)
    # 4 nside - 1 iso-latitude rings; equal-area pixels integrate z^2 to 1/3 (uniform sphere)
    assert np.unique(np.round(np.cos(theta), 9)).size == 4 * nside - 1
    assert np.mean(dirs[:, 2] ** 2) == pytest.approx(1 / 3, abs=0.04 / nside ** 2)
    assert np.linalg.norm(dirs.mean(0)) < 1e-9


@pytest.mark.parametrize("order", [1, 2])
def test_so3_grid_near_uniform(order):
    g = poses.so3_grid(order)
    step = poses.angular_step_deg(order)
    d = poses.geodesic_distance_deg(g[:, None], g[None])
    np.fill_diagonal(d, np.inf)
    nn = d.min(1)
    assert nn.min() > 0.85 * step and nn.max() < 1.01 * step
    probes = np.asarray(random_rotations(jax.random.PRNGKey(0), 300))
    covering = poses.geodesic_distance_deg(probes[:, None], g[None]).min(1)
    assert covering.max() < step  # every rotation lies within one step of the grid


@pytest.mark.parametrize("symbol", ["C4", "D3", "I"])
def test_asymmetric_unit_covers_the_orbits_as_the_full_grid_covers_so3(symbol):
    """A symmetric map's projections at A and A g are equal, so a global search needs one pose per
    orbit: the reduced grid (with its orbits) is as close to any rotation as the full grid, and
    holds about 1/G of it (plus the band along the domain's boundary)."""
    from jaxcryo.symmetry import symmetry_matrices

    order = 2
    grid = poses.so3_grid(order).astype(np.float64)
    step = poses.angular_step_deg(order)
    group = symmetry_matrices(symbol)
    keep = poses.asymmetric_unit(grid, symbol, 1.8 * step)
    orbits = (grid[keep][:, None] @ group[None]).reshape(-1, 3, 3)
    probes = np.asarray(random_rotations(jax.random.PRNGKey(1), 500), np.float64)
    # each probe's orbit representative in the domain (its element nearest the identity) has a
    # nearest full-grid point; the reduced grid's orbits come at least that close to the probe
    orbit = probes[:, None] @ group[None]  # (n, G, 3, 3)
    rep = orbit[np.arange(len(probes)), poses.geodesic_distance_deg(orbit, np.eye(3)).argmin(1)]
    full = poses.geodesic_distance_deg(rep[:, None], grid[None]).min(1)
    reduced = poses.geodesic_distance_deg(probes[:, None], orbits[None]).min(1)
    assert np.all(reduced <= full + 1e-3), np.max(reduced - full)
    assert full.max() < step
    g = group.shape[0]
    assert len(grid) / g <= len(keep) < 0.6 * len(grid), (len(keep), len(grid), g)
    if g == 60:
        assert len(keep) < len(grid) / 6  # high symmetry: a tenth of the search or less
    np.testing.assert_array_equal(poses.asymmetric_unit(grid, "C1", step), np.arange(len(grid)))


def test_shift_grid():
    s = poses.shift_grid(2.0, 1.0)
    assert s.shape == (13, 2)
    np.testing.assert_array_equal(s[0], [0, 0])
    assert np.all(np.hypot(s[:, 0], s[:, 1]) <= 2.0 + 1e-6)
    assert len({tuple(x) for x in s}) == 13
    np.testing.assert_allclose(s / 1.0, np.round(s))
    assert poses.shift_grid(0.0, 1.0).shape == (1, 2)
    lattice = np.meshgrid(np.arange(-6, 7), np.arange(-6, 7))
    assert poses.shift_grid(3.0, 0.5).shape[0] == np.sum(np.hypot(*lattice) <= 6)


def test_local_candidates_around_center():
    centers = np.asarray(random_rotations(jax.random.PRNGKey(1), 4))
    for n in (1, 2):
        step = 2.5
        cand = np.asarray(poses.local_rotations(jnp.asarray(centers), step, n))
        assert cand.shape == (4, (2 * n + 1) ** 3, 3, 3)
        d = poses.geodesic_distance_deg(centers[:, None], cand)
        assert d.max() <= np.sqrt(3) * n * step + 1e-3
        np.testing.assert_allclose(d[:, cand.shape[1] // 2], 0.0, atol=0.05)
        assert np.sort(d[0])[1] == pytest.approx(step, rel=1e-3)  # nearest neighbours one step away
        pair = poses.geodesic_distance_deg(cand[0][:, None], cand[0][None])
        np.fill_diagonal(pair, np.inf)
        assert pair.min() > 0.9 * step  # all distinct
    # the steps may be traced: one compiled function for every step
    traced = jax.jit(lambda c, st: poses.local_rotations(c, st, 1))
    for step in (2.5, 1.25):
        np.testing.assert_allclose(np.asarray(traced(jnp.asarray(centers), step)),
                                   np.asarray(poses.local_rotations(jnp.asarray(centers), step, 1)), atol=1e-6)
    ts = np.asarray(jax.jit(lambda c, st: poses.local_shifts(c, st, 1))(jnp.asarray([[0.5, -1.0]]), 0.25))
    assert ts.shape == (1, 9, 2)
    np.testing.assert_allclose(ts[0, 4], [0.5, -1.0])
    assert np.abs(ts[0] - [0.5, -1.0]).max() == pytest.approx(0.25)


# ----------------------------------------------------------------------------- scores vs loops

@pytest.mark.parametrize("interpolation", ["trilinear", "nearest", "nufft"])
def test_dense_scores_equal_brute_force(rng, interpolation):
    if interpolation == "nufft":
        pytest.importorskip("jax_finufft")
    grid = FourierGrid(12)
    vol = _volume(12)
    b = 3
    data = jnp.asarray(rng.standard_normal((b, grid.n_pixels, 2)) * 0.3, jnp.float32)
    ctf = _ctf_values(_ctf(rng, b), grid, b)
    rot = jnp.asarray(poses.so3_grid(1)[::37])  # 16 rotations, chunks of 5 (padding path)
    sh = jnp.asarray(poses.shift_grid(1.5, 0.75))
    w = jnp.asarray(rng.uniform(0.5, 2.0, (b, grid.n_pixels)), jnp.float32)
    dense = np.asarray(score_poses(vol, data, ctf, rot, sh, grid, pixel_weights=w, r_limit=4.5,
                                   interpolation=interpolation, chunk=5))
    loop = poses.brute_force_scores(vol, data, ctf, rot, sh, grid, pixel_weights=w, r_limit=4.5,
                                    interpolation=interpolation)
    assert dense.shape == (b, rot.shape[0], sh.shape[0])
    np.testing.assert_allclose(dense, loop, rtol=1e-4, atol=1e-4 * np.abs(loop).max())
    # no CTF, default weights (the multiplicity), all pixels
    dense = np.asarray(score_poses(vol, data, None, rot, sh, grid, interpolation=interpolation))
    loop = poses.brute_force_scores(vol, data, None, rot, sh, grid, interpolation=interpolation)
    np.testing.assert_allclose(dense, loop, rtol=1e-4, atol=1e-4 * np.abs(loop).max())


def test_local_scores_equal_brute_force(rng):
    grid = FourierGrid(12)
    vol = _volume(12)
    b = 5
    data = jnp.asarray(rng.standard_normal((b, grid.n_pixels, 2)) * 0.3, jnp.float32)
    ctf = _ctf_values(_ctf(rng, b), grid, b)
    centers = random_rotations(jax.random.PRNGKey(2), b)
    rot = poses.local_rotations(centers, 6.0, 1)  # (5, 27, 3, 3); chunk 60 -> 2 images a step, padded
    sh = poses.local_shifts(jnp.asarray(rng.uniform(-1, 1, (b, 2)), jnp.float32), 0.5, 1)
    w = jnp.asarray(rng.uniform(0.5, 2.0, grid.n_pixels), jnp.float32)
    local = np.asarray(score_local(vol, data, ctf, rot, sh, grid, pixel_weights=w, r_limit=5.0, chunk=60))
    loop = poses.brute_force_scores(vol, data, ctf, rot, sh, grid, pixel_weights=w, r_limit=5.0)
    assert local.shape == (b, 27, 9)
    np.testing.assert_allclose(local, loop, rtol=1e-4, atol=1e-4 * np.abs(loop).max())
    shared = poses.shift_grid(1.0, 1.0)
    local = np.asarray(score_local(vol, data, ctf, rot, jnp.asarray(shared), grid, r_limit=5.0))
    loop = poses.brute_force_scores(vol, data, ctf, rot, shared, grid, r_limit=5.0)
    np.testing.assert_allclose(local, loop, rtol=1e-4, atol=1e-4 * np.abs(loop).max())


def test_score_is_minus_half_the_loss(rng):
    """At a particle's own pose and zero extra shift, the score is -per_image_loss / 2."""
    grid = FourierGrid(12)
    vol = _volume(12)
    b = 4
    shells = tuple(rng.uniform(0.5, 2.0, 8))
    problem = Problem(grid=grid, shell_weights=shells)
    cp = _ctf(rng, b)
    rot = random_rotations(jax.random.PRNGKey(3), b)
    parts = _prepare(jnp.asarray(rng.standard_normal((b, 12, 12)), jnp.float32), rot, jnp.zeros((b, 2)), cp, grid)
    ctf = _ctf_values(cp, grid, b)
    scores = score_local(vol, parts.data, ctf, rot[:, None], jnp.zeros((1, 2)), grid,
                               pixel_weights=problem.pixel_weights)
    loss = jax.jit(per_image_loss, static_argnums=2)(vol, parts, problem)
    np.testing.assert_allclose(np.asarray(scores[:, 0, 0]), -0.5 * np.asarray(loss), rtol=1e-5)


# ----------------------------------------------------------------------------- recovery

def test_grid_poses_and_shifts_found_exactly(rng):
    """Noise-free projections at grid rotations and grid shifts: the argmax is the truth, and
    the particle's origin is the prepared shift plus the found one."""
    grid = FourierGrid(16)
    vol = _volume(16)
    rot_grid = poses.so3_grid(1)
    sh_grid = poses.shift_grid(2.0, 1.0)
    b = 6
    true_r = rng.choice(rot_grid.shape[0], b, replace=False)
    true_s = rng.choice(sh_grid.shape[0], b)
    t0 = rng.uniform(-1.5, 1.5, (b, 2)).astype(np.float32)  # a prepared (prior) shift
    cp = _ctf(rng, b)
    parts = _particles(grid, rot_grid[true_r], t0 + sh_grid[true_s], cp, prepared_shift_px=t0)
    scores = score_poses(vol, parts.data, _ctf_values(cp, grid, b), jnp.asarray(rot_grid),
                               jnp.asarray(sh_grid), grid, r_limit=6.0, chunk=256)
    ir, is_, w, max_prob = poses.top_k(scores, 3)
    np.testing.assert_array_equal(np.asarray(ir[:, 0]), true_r)
    np.testing.assert_array_equal(np.asarray(is_[:, 0]), true_s)
    # the truth explains the data exactly: its residual is ~0 (the score is -0)
    best = np.asarray(scores)[np.arange(b), true_r, true_s]
    np.testing.assert_allclose(best, 0.0, atol=1e-4 * np.abs(np.asarray(scores)).max())


def test_off_grid_poses_within_grid_spacing_then_local_refinement(rng):
    """Random rotations and shifts, searched over the 15-degree grid at |k| <= 5 (where 15
    degrees moves the outermost pixel by about one Fourier pixel): the best grid pose is a grid
    neighbour of the truth for nearly every image (at box 16 an image's most similar grid
    projection is not always its geodesically nearest one), with the shift within one shift
    step. Two rounds of local search around it (7.5, then 3.75 degrees) bring the median error
    below the last step."""
    grid = FourierGrid(16)
    vol = _volume(16)
    order, shift_step = 2, 0.5
    rot_grid = poses.so3_grid(order)
    sh_grid = poses.shift_grid(2.5, shift_step)
    b = 12
    true_rot = np.asarray(random_rotations(jax.random.PRNGKey(5), b))
    true_sh = rng.uniform(-2.0, 2.0, (b, 2)).astype(np.float32)
    cp = _ctf(rng, b)
    ctf = _ctf_values(cp, grid, b)
    parts = _particles(grid, true_rot, true_sh, cp)
    scores = score_poses(vol, parts.data, ctf, jnp.asarray(rot_grid), jnp.asarray(sh_grid), grid, r_limit=5.0,
                         chunk=1536)
    ir, is_, _, _ = poses.top_k(scores, 1)
    err = poses.geodesic_distance_deg(rot_grid[np.asarray(ir[:, 0])], true_rot)
    step = poses.angular_step_deg(order)
    assert np.mean(err < step) >= 0.75 and err.max() < 1.5 * step and np.median(err) < 0.75 * step
    shift_err = np.linalg.norm(sh_grid[np.asarray(is_[:, 0])] - true_sh, axis=1)
    assert shift_err.max() <= shift_step

    rot, sh = jnp.asarray(rot_grid)[ir[:, 0]], jnp.asarray(sh_grid)[is_[:, 0]]
    for local_step, local_shift, r_limit in ((step / 2, shift_step / 2, 6.0), (step / 4, shift_step / 4, 7.0)):
        cand_r, cand_s = poses.local_rotations(rot, local_step, 1), poses.local_shifts(sh, local_shift, 1)
        scores = score_local(vol, parts.data, ctf, cand_r, cand_s, grid, r_limit=r_limit)
        ir, is_, _, _ = poses.top_k(scores, 1)
        rot, sh = cand_r[jnp.arange(b), ir[:, 0]], cand_s[jnp.arange(b), is_[:, 0]]
    local_err = poses.geodesic_distance_deg(np.asarray(rot), true_rot)
    assert np.median(local_err) < step / 4 < np.median(err)
    assert np.median(np.linalg.norm(np.asarray(sh) - true_sh, axis=1)) < shift_step / 4


def test_local_search_finds_pose_near_prior(rng):
    """The truth is one local candidate (rotation and shift) around a perturbed prior: found."""
    grid = FourierGrid(16)
    vol = _volume(16)
    b, step, n = 4, 3.0, 1
    offsets = poses.local_offsets(step, n)
    pick_r = rng.choice(offsets.shape[0], b)
    true_rot = np.asarray(random_rotations(jax.random.PRNGKey(7), b), np.float64)
    centers = np.einsum("bij,bkj->bik", true_rot, offsets[pick_r])  # truth = centre @ dR
    t_center = rng.uniform(-1, 1, (b, 2)).astype(np.float32)
    pick_s = rng.choice(9, b)
    cand_s = np.asarray(poses.local_shifts(jnp.asarray(t_center), 0.5, 1))
    true_sh = cand_s[np.arange(b), pick_s]
    cp = _ctf(rng, b)
    parts = _particles(grid, true_rot.astype(np.float32), true_sh, cp, prepared_shift_px=t_center)
    cand_r = poses.local_rotations(jnp.asarray(centers, jnp.float32), step, n)
    # the data are prepared with t_center, so the candidates are relative shifts around 0
    scores = score_local(vol, parts.data, _ctf_values(cp, grid, b), cand_r,
                               jnp.asarray(cand_s - t_center[:, None]), grid, r_limit=7.0)
    ir, is_, _, _ = poses.top_k(scores, 1)
    np.testing.assert_array_equal(np.asarray(ir[:, 0]), pick_r)
    np.testing.assert_array_equal(np.asarray(is_[:, 0]), pick_s)


# ----------------------------------------------------------------------------- CTF and noise weights

def test_ctf_and_noise_weights_change_scores(rng):
    grid = FourierGrid(16)
    vol = _volume(16)
    b = 3
    rot = np.asarray(random_rotations(jax.random.PRNGKey(9), b))
    cp = _ctf(rng, b, defocus=15000.0)
    parts = _particles(grid, rot, np.zeros((b, 2), np.float32), cp)
    true_ctf = _ctf_values(cp, grid, b)
    wrong_ctf = _ctf_values(_ctf(rng, b, defocus=25000.0), grid, b)
    score = functools.partial(score_local, vol, parts.data, rotations=jnp.asarray(rot)[:, None],
                              shifts=jnp.zeros((1, 2)), grid=grid, r_limit=7.0)
    right = np.asarray(score(true_ctf))[:, 0, 0]
    without = np.asarray(score(None))[:, 0, 0]
    np.testing.assert_allclose(right, 0.0, atol=1e-5 * np.abs(without).max())
    assert np.all(np.asarray(score(wrong_ctf))[:, 0, 0] < right - 1e-3)
    assert np.all(without < right - 1e-3)

    # a zero weight on a shell removes its pixels: perturbing them leaves the score unchanged
    radius = np.linalg.norm(grid.freqs, axis=-1)
    shell = np.rint(radius) == 3
    kick = jnp.asarray(np.where(shell[None, :, None], rng.standard_normal(parts.data.shape), 0.0), jnp.float32)
    w = np.where(shell, 0.0, grid.multiplicity).astype(np.float32)
    rot_grid = jnp.asarray(poses.so3_grid(0))
    sh = jnp.asarray(poses.shift_grid(1.0, 1.0))
    full = functools.partial(score_poses, ctf=true_ctf, rotations=rot_grid, shifts=sh, grid=grid, r_limit=7.0)
    base = np.asarray(full(vol, parts.data, pixel_weights=w))
    np.testing.assert_allclose(np.asarray(full(vol, parts.data + kick, pixel_weights=w)), base, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(full(vol, parts.data + kick)) - np.asarray(full(vol, parts.data))).min() > 1e-3
    # weights are linear in the score, and r_limit is the same as zero weights beyond it
    np.testing.assert_allclose(np.asarray(full(vol, parts.data, pixel_weights=2 * w)), 2 * base, rtol=1e-5, atol=1e-5)
    mask = np.where(radius <= 4.0, grid.multiplicity, 0.0)
    np.testing.assert_allclose(np.asarray(score_poses(vol, parts.data, true_ctf, rot_grid, sh, grid, r_limit=4.0)),
                               np.asarray(full(vol, parts.data, pixel_weights=mask)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- posteriors

def test_posterior_and_top_k(rng):
    scores = jnp.asarray(rng.standard_normal((3, 7, 5)) * 4.0, jnp.float32)
    for temp in (1.0, 2.5):
        post = np.asarray(poses.posterior(scores, temp))
        flat = np.asarray(scores, np.float64).reshape(3, -1) / temp
        ref = np.exp(flat - flat.max(1, keepdims=True))
        ref /= ref.sum(1, keepdims=True)
        np.testing.assert_allclose(post.reshape(3, -1), ref, rtol=1e-5, atol=1e-7)
        ir, is_, w, max_prob = (np.asarray(x) for x in poses.top_k(scores, 4, temp))
        order = np.argsort(-flat, axis=1)[:, :4]
        np.testing.assert_array_equal(ir * 5 + is_, order)
        kept = np.take_along_axis(ref, order, 1)
        np.testing.assert_allclose(w, kept / kept.sum(1, keepdims=True), rtol=1e-5)
        np.testing.assert_allclose(max_prob, ref.max(1), rtol=1e-5)


@pytest.mark.parametrize("interpolation", ["trilinear", "nearest"])
def test_pose_stage_slices_equal_forward_slices(rng, interpolation):
    """The pose stage's own slicing (a centred full cube, no fold) equals forward.model.slices,
    up to the grid's edge and on a half volume whose kx = 0 plane is not Hermitian."""
    from jaxcryo.forward.model import slices

    grid = FourierGrid(10)
    vol = jnp.asarray(rng.standard_normal(grid.volume_shape + (2,)), jnp.float32)
    rot = random_rotations(jax.random.PRNGKey(4), 7)
    for r_limit in (None, 3.2):
        idx = poses.score_pixels(grid, r_limit)
        pix = poses._PixelSet(grid.box, grid.freqs[idx])
        ours = jax.jit(lambda v, r: poses._projector(v, pix, interpolation)(r))(vol, rot)
        ref = jax.jit(slices, static_argnums=(2, 3))(vol, rot, grid, interpolation)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref)[:, idx],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("local", [False, True])
def test_memory_estimate_bounds_compiled_memory(local):
    """poses.memory_bytes (the docstring's formula) is an upper bound, within 3x, of what XLA
    allocates for scratch and outputs of the compiled search."""
    sd, f32 = jax.ShapeDtypeStruct, jnp.float32
    grid = FourierGrid(32)
    b, m, s, chunk = (16, 27, 9, 200) if local else (16, 576, 13, 256)
    rot = sd((b, m, 3, 3) if local else (m, 3, 3), f32)
    sh = sd((b, s, 2) if local else (s, 2), f32)
    fn = poses.score_local if local else poses.score_poses
    shapes = (sd(grid.volume_shape + (2,), f32), sd((b, grid.n_pixels, 2), f32), sd((b, grid.n_pixels), f32), rot, sh)
    compiled = jax.jit(functools.partial(fn, grid=grid, r_limit=8.0, chunk=chunk)).lower(*shapes).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    used = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    estimate = poses.memory_bytes(b, m, s, grid, r_limit=8.0, chunk=chunk, local=local)
    assert used <= estimate <= 3 * used


def test_search_top_k_equals_top_k_of_all_scores_in_bounded_memory(rng):
    grid = FourierGrid(12)
    vol = _volume(12)
    b = 3
    data = jnp.asarray(rng.standard_normal((b, grid.n_pixels, 2)) * 0.3, jnp.float32)
    ctf = _ctf_values(_ctf(rng, b), grid, b)
    rot = jnp.asarray(poses.so3_grid(1)[::5])  # 116 rotations: chunks of 17 leave padding
    sh = jnp.asarray(poses.shift_grid(1.5, 0.75))
    search = jax.jit(poses.search_top_k, static_argnames=_STATIC + ("k",))
    for chunk, k, temperature in ((17, 5, 1.0), (7, 40, 2.5)):
        ref = poses.top_k(score_poses(vol, data, ctf, rot, sh, grid, r_limit=4.5, chunk=chunk), k, temperature)
        got = search(vol, data, ctf, rot, sh, grid, k=k, temperature=temperature, r_limit=4.5, chunk=chunk)
        for r, g in zip(ref[:2], got[:2]):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
        for r, g in zip(ref[2:], got[2:]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)
    # memory: a 36864-rotation search holds one chunk, not the B x M x S scores
    sd, f32 = jax.ShapeDtypeStruct, jnp.float32
    b, m, s = 64, 36864, 13
    shapes = (sd(grid.volume_shape + (2,), f32), sd((b, grid.n_pixels, 2), f32), sd((b, grid.n_pixels), f32),
              sd((m, 3, 3), f32), sd((s, 2), f32))
    compiled = jax.jit(functools.partial(poses.search_top_k, grid=grid, k=4, chunk=512)).lower(*shapes).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
        assert analysis.temp_size_in_bytes < 0.1 * 4 * b * m * s


def test_dense_scores_equal_brute_force_float64(rng):
    """In float64 the dense products and the loop agree to rounding (1e-12), for a random
    half volume (non-Hermitian kx = 0 plane), random CTF values and weights."""
    with jax.enable_x64(True):
        grid = FourierGrid(10)
        vol = jnp.asarray(rng.standard_normal(grid.volume_shape + (2,)))
        data = jnp.asarray(rng.standard_normal((2, grid.n_pixels, 2)))
        ctf = jnp.asarray(rng.standard_normal((2, grid.n_pixels)))
        w = jnp.asarray(rng.uniform(0, 2, grid.n_pixels))
        rot = jnp.asarray(poses.so3_grid(0, dtype=np.float64)[::4])
        sh = jnp.asarray(poses.shift_grid(1.0, 0.5, dtype=np.float64))
        dense = poses.score_poses(vol, data, ctf, rot, sh, grid, pixel_weights=w, r_limit=3.5, chunk=10)
        loop = poses.brute_force_scores(vol, data, ctf, rot, sh, grid, pixel_weights=w, r_limit=3.5)
        assert dense.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(dense), loop, rtol=1e-12, atol=1e-12 * np.abs(loop).max())


def test_bad_shapes_are_named():
    grid = FourierGrid(8)
    vol = jnp.zeros(grid.volume_shape + (2,))
    data = jnp.zeros((2, grid.n_pixels, 2))
    rot = jnp.asarray(poses.so3_grid(0)[:3])
    sh = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="rotations must be"):
        poses.score_poses(vol, data, None, rot[:, :2], sh, grid)
    with pytest.raises(ValueError, match="shifts must be"):
        poses.score_poses(vol, data, None, rot, jnp.zeros((1, 3)), grid)
    with pytest.raises(ValueError, match="data must be"):
        poses.score_poses(vol, data[:, :-1], None, rot, sh, grid)
    with pytest.raises(ValueError, match="volume has shape"):
        poses.score_poses(vol[:-1], data, None, rot, sh, grid)
    with pytest.raises(ValueError, match="rotations must be"):
        poses.score_local(vol, data, None, rot[None].repeat(3, 0), sh, grid)  # B = 3 rows for 2 images
    with pytest.raises(ValueError, match="pixel_weights"):
        poses.score_poses(vol, data, None, rot, sh, grid, pixel_weights=jnp.ones(3))
    with pytest.raises(ValueError, match="k must be"):
        poses.search_top_k(vol, data, None, rot, sh, grid, k=4)
