"""Refinement with unknown poses: the pose-stage slot of the one driver, the refine schedule,
refined STAR files, resume."""
from __future__ import annotations

import copy
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
from jaxcryo.reconstruct import _stack_groups, group_functions, half_sets, make_optimizer
from jaxcryo.refine import (PoseSearch, PoseState, RefineState, local_candidates, make_pose_stage, refine,
                            resample_map, rotation_angle_deg)

BOX, PX = 24, 8.0


@pytest.fixture(scope="module")
def simulated():
    truth = jc.synthetic_molecule(BOX, pixel_size_angstrom=PX, seed=0)
    sim = jc.simulate_particles(truth, 300, pixel_size_angstrom=PX, snr=1.0, seed=1, max_shift_px=1.5)
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


def test_pose_stage_scores_each_image_with_its_noise_groups_weights(simulated):
    """The noise model feeds the pose search: with weights per noise group (G, P), each image is
    scored with its own group's row (the same posteriors as scoring it alone with that row).
    The spectra per group come from jaxcryo.noise (tested in test_noise)."""
    truth, sim = simulated
    grid = FourierGrid(BOX)
    vft = jc.volume_to_ft(jnp.asarray(truth), "trilinear")
    parts = _unposed(type(sim)(sim.images[:4], None, None, None, jax.tree.map(lambda x: x[:4], sim.ctf), 0.0), grid)
    parts = parts._replace(noise_group=jnp.asarray([0, 1, 0, 1], jnp.int32))
    base = np.asarray(grid.multiplicity, np.float32) * 0.05
    weights = jnp.asarray(np.stack([base, 8 * base]))
    stage = make_pose_stage(PoseSearch(order=0, max_shift_px=1.0, top_k=3), grid)
    rows = PoseState(parts.rotations, jnp.zeros((4, 2)), jnp.zeros(4))
    both, new = stage(vft, parts, rows, None, {"pixel_weights": weights})
    for g in (0, 1):
        idx = np.flatnonzero(np.asarray(parts.noise_group) == g)
        one = jax.tree.map(lambda x: x[idx], parts)
        alone, new_alone = stage(vft, one, jax.tree.map(lambda x: x[idx], rows), None,
                                 {"pixel_weights": weights[g]})
        np.testing.assert_allclose(np.asarray(new.max_prob)[idx], np.asarray(new_alone.max_prob), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(both.weight).reshape(4, 3)[idx],
                                   np.asarray(alone.weight).reshape(-1, 3), rtol=1e-4, atol=1e-6)
    # The sharper group's posteriors are more peaked (the weights really differ per image).
    assert np.asarray(new.max_prob)[1::2].mean() > np.asarray(new.max_prob)[0::2].mean()


def test_global_search_with_a_shift_window_around_the_current_shift(simulated):
    """Global rotations x shifts within 1 px of each particle's current shift: true shifts up to
    2.8 px away from zero are found from a current shift 1 px off, though the window's grid
    about zero would not reach them, and the result is kept within max_shift_px."""
    truth, sim = simulated
    grid = FourierGrid(BOX)
    vft = jc.volume_to_ft(jnp.asarray(truth), "trilinear")
    rots = poses.so3_grid(0)
    pick = np.random.default_rng(1).choice(len(rots), 4, replace=False)
    t = np.array([[2.0, 0.0], [-2.0, 2.0], [0.0, -1.0], [1.0, 1.0]], np.float32)
    current = t - np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]], np.float32)
    ctf = jax.tree.map(lambda x: x[:4], sim.ctf)
    images = render(vft, jnp.asarray(rots[pick]), jnp.asarray(t), ctf, grid)
    parts = _unposed(type(sim)(np.asarray(images), None, None, None, ctf, 0.0), grid)
    weights = jnp.asarray(grid.multiplicity / 1e-4, jnp.float32)
    rows = PoseState(parts.rotations, jnp.asarray(current), jnp.zeros(4))
    stage = make_pose_stage(PoseSearch(order=0, max_shift_px=3.0, shift_window_px=1.0, top_k=2), grid)
    _, new = stage(vft, parts, rows, None, {"pixel_weights": weights})
    assert rotation_angle_deg(new.rotations, rots[pick]).max() < 0.1
    np.testing.assert_allclose(np.asarray(new.shifts_px), t, atol=1e-6)
    # A window that cannot reach the truth for the second image (current 1 px off, window 0)
    # keeps its current shift: the window really is around the current shift, not zero.
    stage0 = make_pose_stage(PoseSearch(order=0, max_shift_px=3.0, shift_window_px=1e-3, top_k=1), grid)
    _, stuck = stage0(vft, parts, rows, None, {"pixel_weights": weights})
    np.testing.assert_allclose(np.asarray(stuck.shifts_px), current, atol=1e-6)


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
        resample_map(blob(32, 2.0), 2.0, 20, 2.7)


def _known_pose_fsc(sim, truth, grid):
    parts = jc.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / PX, sim.ctf, grid)
    rec = jc.reconstruct(parts, box=BOX, pixel_size_angstrom=PX, epochs=6, wiener_after=2, batch_size=64)
    return rec


@pytest.mark.slow
def test_refine_from_a_40A_lowpass_reaches_known_pose_quality(simulated):
    truth, sim = simulated
    grid = FourierGrid(BOX)
    # step_fraction 0.5: the sampling stops at half the angular accuracy the resolution allows,
    # so that "median error within the final step" is a fair test at this tiny size (the default,
    # 0.25, samples finer still: 2.3 deg median error here, with a final step of 1.9 deg).
    out = refine(_unposed(sim, grid), truth, box=BOX, pixel_size_angstrom=PX, epochs=10, global_order=1,
                 batch_size=64, step_fraction=0.5)
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
    # It stopped by itself (before the cap of 10 epochs) once the poses settled at the finest step.
    assert len(h["epoch"]) < 10 and h["angular_step_deg"][-1] == h["angular_step_deg"][-2], h
    assert h["next"][-1]["stop"], h["next"][-1]
    assert h["mode"][:2] == ["global", "global"] and h["mode"][-1] == "local"


def _quarter_turn(volume):
    """The map turned by 90 degrees about z (array axis 0), about voxel N//2 (RELION's origin)."""
    return np.roll(np.rot90(np.asarray(volume, np.float64), axes=(1, 2)), 1, axis=1)


def test_symmetric_refine_searches_an_asymmetric_unit():
    """A C4 molecule refined with symmetry C4: the global searches score about a quarter of the
    grid (one pose per orbit), every particle's pose is found up to its 4 equivalents, and the map
    is C4-symmetric."""
    from jaxcryo.symmetry import symmetry_matrices

    turns = [jc.synthetic_molecule(BOX, pixel_size_angstrom=PX, seed=0)]
    for _ in range(3):
        turns.append(_quarter_turn(turns[-1]))
    truth = np.mean(turns, axis=0).astype(np.float32)
    assert np.abs(_quarter_turn(truth) - truth).max() < 1e-5 * np.abs(truth).max()
    sim = jc.simulate_particles(truth, 300, pixel_size_angstrom=PX, snr=1.0, seed=1, max_shift_px=1.5)
    out = refine(_unposed(sim, FourierGrid(BOX)), truth, box=BOX, pixel_size_angstrom=PX, epochs=6, global_order=1,
                 batch_size=64, step_fraction=0.5, symmetry="C4")
    h = out.reconstruction.history
    assert 576 / 4 <= h["global_rotations"] < 576 * 0.8, h["global_rotations"]  # 432 of the 576 at order 1
    ops = symmetry_matrices("C4").astype(np.float32)
    err = np.min([rotation_angle_deg(out.rotations, sim.rotations @ g) for g in ops], axis=0)
    assert np.median(err) <= h["angular_step_deg"][-1], (np.median(err), h["angular_step_deg"])  # 3.1 <= 3.75
    vol = np.asarray(out.reconstruction.volume)
    assert np.abs(_quarter_turn(vol) - vol).max() < 0.01 * np.abs(vol).max()  # 7e-4


def test_stop_rule_stops_when_resolution_and_poses_settle():
    """The per-epoch figures of a box-64 run (RELION-simulated, SNR 0.1): local steps 7.5 ->
    0.94 deg, then 0.94 deg until the cap. The rule stops after epoch 8, the first epoch at the
    finest step that improved neither the resolution nor the pose changes."""
    from jaxcryo.refine import stop_rule

    steps = [7.5, 3.75, 1.875, 0.9375, 0.9375, 0.9375, 0.9375]  # epochs 3..9
    res = [19.2, 16.8, 16.1, 16.4, 16.3, 16.4, 16.3]
    change = [7.67, 4.00, 1.97, 0.987, 0.443, 0.457, 0.381]
    plan, stopped = {"best_res": 20.6, "best_change": None}, None
    for epoch, (a, r, c) in enumerate(zip(steps, res, change), start=3):
        settled_sampling = a == steps[-1]
        plan = {**plan, "step_deg": a}
        plan.update(stop_rule(plan, resolution_angstrom=r, mean_change_deg=c, settled_sampling=settled_sampling))
        if plan["stop"]:
            stopped = epoch
            break
    assert stopped == 8
    base = {"best_res": 16.1, "best_change": 0.443, "step_deg": 0.9375}
    # Still improving: a resolution gain of over 1%, or pose changes 10% under the best so far
    # and over a quarter of the step; or the sampling is not final yet; or too early.
    assert not stop_rule(base, resolution_angstrom=15.8, mean_change_deg=0.5, settled_sampling=True)["stop"]
    assert not stop_rule(base, resolution_angstrom=16.2, mean_change_deg=0.39, settled_sampling=True)["stop"]
    assert not stop_rule(base, resolution_angstrom=16.2, mean_change_deg=0.41, settled_sampling=False)["stop"]
    assert not stop_rule(base, resolution_angstrom=16.2, mean_change_deg=0.41, settled_sampling=True,
                         may_stop=False)["stop"]
    # Settled: pose changes no longer falling, or under a quarter of the step.
    assert stop_rule(base, resolution_angstrom=16.2, mean_change_deg=0.41, settled_sampling=True)["stop"]
    assert stop_rule(base, resolution_angstrom=16.2, mean_change_deg=0.2, settled_sampling=True)["stop"]


def test_resume_gives_the_same_map(simulated):
    truth, sim = simulated
    grid = FourierGrid(BOX)
    parts = _unposed(type(sim)(sim.images[:96], None, None, None, jax.tree.map(lambda x: x[:96], sim.ctf), 0.0),
                     grid)
    kw = dict(box=BOX, pixel_size_angstrom=PX, global_order=0, global_epochs=1, batch_size=32, min_epochs=3)
    saved = []

    def snapshot(state):  # what a checkpoint holds: arrays and a JSON-able history, copied now
        recon = state.recon
        saved.append(RefineState(recon._replace(params=np.array(recon.params), key=np.array(recon.key),
                                                opt_state=jax.tree.map(np.array, recon.opt_state),
                                                history=copy.deepcopy(recon.history)),
                                 PoseState(*(np.array(x) for x in state.poses))))

    full = refine(parts, truth, epochs=3, callback=snapshot, **kw)
    again = refine(parts, truth, epochs=3, resume=saved[1], **kw)
    np.testing.assert_allclose(again.reconstruction.params, full.reconstruction.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again.rotations, full.rotations)
    assert again.reconstruction.history["epoch"] == [1, 2, 3]


@pytest.mark.slow
def test_cli_refine_writes_a_star_that_relion_reads(tmp_path):
    from jaxcryo.cli import main
    from jaxcryo.io import read_map, read_particles

    sim_dir = tmp_path / "sim"
    assert main(["simulate", "--out", str(sim_dir), "--n-images", "160", "--box", str(BOX), "--pixel-size",
                 str(PX), "--snr", "1", "--quiet"]) == 0
    out = tmp_path / "out" / "map.mrc"  # the folder is created by refine
    args = ["refine", str(sim_dir / "particles.star"), "--reference", str(sim_dir / "truth.mrc"), "--out", str(out),
            "--epochs", "3", "--global-order", "0", "--batch-size", "40", "--quiet", "--keep-checkpoint"]
    assert main(args) == 0
    for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc", "map_fsc.png", "history.json", "map_particles.star",
                 "map.ckpt.npz"):
        assert (out.parent / name).exists(), name
    import json
    history = json.loads((out.parent / "history.json").read_text())
    assert len(history["epoch"]) == 3 and len(history["mean_pose_change_deg"]) == 3
    assert len(history["resolution_angstrom"]) == 3 and history["final_resolution_angstrom"] >= 2 * PX
    table = read_particles(str(out.parent / "map_particles.star"))
    assert len(table) == 160
    import starfile
    df = starfile.read(str(out.parent / "map_particles.star"), always_dict=True)["particles"]
    assert set(df["rlnRandomSubset"]) == {1, 2}
    assert df["rlnMaxValueProbDistribution"].between(0, 1).all()
    ours, _ = read_map(str(out))
    # A second run with the same command resumes from the checkpoint at epoch 3: nothing to do, same map;
    # without --keep-checkpoint the checkpoint is removed at the end.
    assert main(args[:-1]) == 0
    np.testing.assert_allclose(read_map(str(out))[0], ours, atol=1e-5)
    assert not (out.parent / "map.ckpt.npz").exists()

    if shutil.which("relion_reconstruct") is None:
        pytest.skip("relion_reconstruct not installed")
    rel = tmp_path / "out" / "relion.mrc"
    subprocess.run(["relion_reconstruct", "--i", str(out.parent / "map_particles.star"), "--o", str(rel), "--ctf"],
                   check=True, capture_output=True, cwd=str(out.parent))
    theirs, _ = read_map(str(rel))
    curve = jc.fsc(theirs, ours)
    assert curve[1:BOX // 4].min() > 0.8, curve


def test_local_refinement_improves_perturbed_priors(simulated):
    """--local: start from the true poses rotated by 6 degrees about random axes and shifted by
    0.7 px; local searches bring them back well inside the first step."""
    truth, sim = simulated
    grid = FourierGrid(BOX)
    n = sim.images.shape[0]
    rng = np.random.default_rng(5)
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    tilt = poses.axis_angle_to_matrix(np.deg2rad(6.0) * axis)
    priors = np.einsum("nij,njk->nik", sim.rotations, tilt).astype(np.float32)
    t = sim.shifts_angstrom / PX + 0.5 * rng.choice([-1.0, 1.0], size=(n, 2))
    parts = jc.prepare_particles(sim.images, priors, t, sim.ctf, grid)
    out = refine(parts, truth, box=BOX, pixel_size_angstrom=PX, local=True, epochs=4, local_step_deg=3.75,
                 initial_lowpass_angstrom=20.0, batch_size=64)
    err = rotation_angle_deg(out.rotations, sim.rotations)
    assert np.median(rotation_angle_deg(priors, sim.rotations)) > 5.9
    assert np.median(err) < 3.5, np.median(err)
    shift_err = np.linalg.norm(t + out.shifts_px - sim.shifts_angstrom / PX, axis=1)
    assert np.median(shift_err) < 0.5, np.median(shift_err)
    assert out.reconstruction.history["mode"] == ["local"] * len(out.reconstruction.history["epoch"])


def test_cli_refine_refuses_bad_references_and_masks(tmp_path, capsys):
    from jaxcryo.cli import main
    from jaxcryo.io import write_map

    sim_dir = tmp_path / "sim"
    assert main(["simulate", "--out", str(sim_dir), "--n-images", "8", "--box", "16", "--pixel-size", "2",
                 "--quiet"]) == 0
    star = str(sim_dir / "particles.star")
    odd = tmp_path / "odd.mrc"
    write_map(str(odd), np.zeros((21, 21, 21), np.float32), voxel_size_angstrom=2.7)  # 56.7 A: 28.35 px
    out = tmp_path / "map.mrc"
    assert main(["refine", star, "--reference", str(odd), "--out", str(out), "--quiet"]) == 2
    assert "odd.mrc" in capsys.readouterr().err
    mask = tmp_path / "mask.mrc"
    write_map(str(mask), np.ones((12, 12, 12), np.float32), voxel_size_angstrom=2.0)
    assert main(["refine", star, "--reference", str(sim_dir / "truth.mrc"), "--mask", str(mask), "--out", str(out),
                 "--quiet"]) == 2
    assert "mask.mrc" in capsys.readouterr().err
    assert main(["refine", star, "--reference", str(tmp_path / "missing.mrc"), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()
