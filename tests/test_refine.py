"""Refinement with unknown poses: the pose-stage slot of the one driver, the refine schedule,
refined STAR files, resume."""
from __future__ import annotations

import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo import poses
from jaxcryo.forward import FourierGrid
from jaxcryo.forward.model import ctf_batch, render, slices
from jaxcryo.loss import Problem
from jaxcryo.reconstruct import _stack_groups, group_functions, half_sets, make_optimizer
from jaxcryo.refine import (PoseSearch, PoseState, local_candidates, lowpass, make_pose_stage, refine,
                            resample_map, rotation_angle_deg)

BOX, PX = 24, 8.0


@pytest.fixture(scope="module")
def simulated():
    truth = jc.synthetic_molecule(BOX, pixel_size_angstrom=PX, seed=0)
    sim = jc.simulate_particles(truth, 240, pixel_size_angstrom=PX, snr=1.0, seed=1, max_shift_px=1.5)
    return truth, sim


def _unposed(sim, grid):
    n = sim.images.shape[0]
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3))
    return jc.prepare_particles(sim.images, eye, np.zeros((n, 2), np.float32), sim.ctf, grid)


def test_identity_pose_stage_is_the_known_pose_epoch(rng):
    """The slot with a pose stage that returns the batch unchanged gives the known-pose epoch."""
    from tests.conftest import make_particles, make_problem

    problem = make_problem(8, lam=1e-3)
    parts = make_particles(rng, problem, 40)
    groups = half_sets(40, seed=3)
    stacked = _stack_groups(parts, groups)
    tx = make_optimizer("sgd", box=8)
    params = jnp.zeros((2,) + problem.grid.volume_shape + (2,))
    opt = jax.vmap(tx.init)(params)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    plain, _ = group_functions(problem, tx, batch_size=8, n_probes=0, exact=False)
    ident = lambda p, b, rows, key, args: (b, rows)  # noqa: E731
    slot, _ = group_functions(problem, tx, batch_size=8, n_probes=0, exact=False, pose_stage=ident)
    state = PoseState(stacked.rotations, jnp.zeros(stacked.rotations.shape[:2] + (2,)),
                      jnp.zeros(stacked.rotations.shape[:2]))
    a = jax.jit(plain)(params, opt, keys, stacked, None, 0.0)
    b = jax.jit(slot)(params, opt, keys, stacked, None, 0.0, state, {})
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(b[4].rotations), np.asarray(stacked.rotations))


def test_local_candidates_match_the_pose_module(rng):
    centers = jnp.asarray(jc.random_rotations(jax.random.PRNGKey(1), 3))
    shifts = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    rot, sh = local_candidates(centers, shifts, 2.5, 0.5, 1, 1)
    np.testing.assert_allclose(np.asarray(rot), np.asarray(poses.local_rotations(centers, 2.5, 1)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sh), np.asarray(poses.local_shifts(shifts, 0.5, 1)), atol=1e-6)


def test_pose_stage_finds_grid_poses_and_expands_the_batch(simulated):
    """Noise-free images at grid rotations and grid shifts: the stage's best pose is the truth,
    and the expanded rows are (candidate rotation, image shifted back, weight x posterior)."""
    truth, sim = simulated
    grid = FourierGrid(BOX)
    vft = jc.volume_to_ft(jnp.asarray(truth), "trilinear")
    rots = poses.so3_grid(0)
    pick = np.random.default_rng(0).choice(len(rots), 6, replace=False)
    shift_grid = poses.shift_grid(2.0, 1.0)
    t = shift_grid[np.arange(6) % len(shift_grid)]
    ctf = jax.tree.map(lambda x: x[:6], sim.ctf)
    images = render(vft, jnp.asarray(rots[pick]), jnp.asarray(t), ctf, grid)
    parts = _unposed(type(sim)(np.asarray(images), None, None, None, ctf, 0.0), grid)
    stage = make_pose_stage(PoseSearch(order=0, max_shift_px=2.0, shift_step_px=1.0, top_k=3), grid)
    rows = PoseState(parts.rotations, jnp.zeros((6, 2)), jnp.zeros(6))
    weights = jnp.asarray(grid.multiplicity / 1e-4, jnp.float32)  # sharp: noise-free
    expanded, new = stage(vft, parts, rows, None, {"pixel_weights": weights})
    assert rotation_angle_deg(new.rotations, rots[pick]).max() < 0.1  # float32 arccos
    np.testing.assert_allclose(np.asarray(new.shifts_px), t, atol=1e-6)
    assert np.all(np.asarray(new.max_prob) > 0.99)
    assert expanded.data.shape == (18, grid.n_pixels, 2)
    np.testing.assert_allclose(np.asarray(expanded.weight).reshape(6, 3).sum(1), 1.0, rtol=1e-5)
    # The best row of each image, shifted back, is the centred CTF-modulated projection.
    model = slices(vft, jnp.asarray(rots[pick]), grid, "trilinear") * ctf_batch(ctf, grid, 6, jnp.float32)[..., None]
    best = np.asarray(expanded.data).reshape(6, 3, grid.n_pixels, 2)[:, 0]
    np.testing.assert_allclose(best, np.asarray(model), atol=2e-3 * float(np.abs(model).max()))


def test_resample_map_keeps_the_physical_map():
    """A Gaussian blob of 6 A sigma on a 32-px 2 A grid, resampled to 4 A and a 20-px box, is the
    same blob sampled there."""
    def blob(box, px, sigma_a=6.0):
        c = (np.arange(box) - box // 2) * px
        r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
        return np.exp(-r2 / (2 * sigma_a ** 2))
    out = resample_map(blob(32, 2.0), 2.0, 20, 4.0)
    np.testing.assert_allclose(out, blob(20, 4.0), atol=2e-3)
    with pytest.raises(ValueError, match="resample"):
        resample_map(blob(32, 2.0), 2.0, 20, 2.9)


def _known_pose_fsc(sim, truth, grid):
    parts = jc.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / PX, sim.ctf, grid)
    rec = jc.reconstruct(parts, box=BOX, pixel_size_angstrom=PX, epochs=6, wiener_after=2, batch_size=64)
    return rec


def test_refine_from_a_40A_lowpass_reaches_known_pose_quality(simulated):
    truth, sim = simulated
    grid = FourierGrid(BOX)
    out = refine(_unposed(sim, grid), truth, box=BOX, pixel_size_angstrom=PX, epochs=6, global_order=1,
                 batch_size=64)
    h = out.reconstruction.history
    err = rotation_angle_deg(out.rotations, sim.rotations)
    final_step = h["angular_step_deg"][-1]
    assert np.median(err) <= final_step, (np.median(err), final_step)
    known = _known_pose_fsc(sim, truth, grid)
    shells = slice(1, BOX // 2 - 1)
    f_ref = jc.fsc(out.reconstruction.volume, truth)[shells].mean()
    f_known = jc.fsc(known.volume, truth)[shells].mean()
    assert f_ref > f_known - 0.05, (f_ref, f_known)
    assert set(np.unique(out.half_set)) == {1, 2}
    assert h["resolution_angstrom"][-1] < h["resolution_angstrom"][0]
