"""Ab initio reconstruction: poses found from nothing agree with the truth up to one global
rotation (either hand), the hand flip is exact, the adaptive temperature hits its target,
seeded runs repeat, resume continues exactly, and the CLI writes what refine reads."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import mrcfile
import numpy as np
import pytest
import starfile

import jaxcryo as jc
from jaxcryo import cli, poses
from jaxcryo.abinitio import (abinitio, adaptive_temperature, flip_hand, flip_rotations, global_alignment,
                              pose_errors_deg, recentre, schedule)
from jaxcryo.forward import FourierGrid
from jaxcryo.forward.model import render, slices, volume_to_ft

BOX, PX, N = 16, 6.0, 240
# 30 deg grid throughout (order 1), one static level (the limit marches inside it): one
# compilation, shared by every run here.
RUN = dict(box=BOX, pixel_size_angstrom=PX, epochs=10, batch_size=24, max_batch_size=24, fine_from=2.0,
           start_resolution_angstrom=35.0, final_resolution_angstrom=14.0, max_shift_px=1.0,
           refine_epochs=0)  # the SGD stage alone; test_refine_stage_* adds the refine stage


def _settings(epochs=RUN["epochs"], local_epochs=2):
    return schedule(epochs=epochs, box=BOX, pixel_size_angstrom=PX, start_resolution_angstrom=35.0,
                    final_resolution_angstrom=14.0, batch_size=24, max_batch_size=24, n_particles=N,
                    fine_from=2.0, max_shift_px=1.0, levels=1, local_epochs=local_epochs, cycles=1)


@pytest.fixture(scope="module")
def simulated():
    truth = jc.synthetic_molecule(BOX, pixel_size_angstrom=PX, seed=3)
    sim = jc.simulate_particles(truth, N, pixel_size_angstrom=PX, snr=3.0, seed=4, max_shift_px=0.5,
                                interpolation="trilinear")
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (N, 3, 3))
    particles = jc.prepare_particles(sim.images, eye, np.zeros((N, 2), np.float32), sim.ctf, FourierGrid(BOX))
    return truth, sim, particles


@pytest.fixture(scope="module")
def run(simulated):
    _, _, particles = simulated
    states = []
    result = abinitio(particles, seed=0, settings=_settings(), callback=states.append, **RUN)
    return result, states


def test_poses_agree_with_the_truth_up_to_a_global_rotation(simulated, run):
    _, sim, _ = simulated
    result, _ = run
    err, _ = pose_errors_deg(result.rotations, sim.rotations)
    h = result.history
    assert h["angular_step_deg"] == [30.0] * 10 + [15.0, 7.5]  # global grid, then two polishing epochs
    # well within the global grid step for most particles (a map that refine can finish from) ...
    assert np.median(err) < 12.0, np.median(err)  # measured 18-19 deg without the polishing epochs
    assert np.mean(err < 15.0) > 0.6
    # ... while the start's poses (random) are nowhere near after the same global fit
    random = np.asarray(jc.random_rotations(jax.random.PRNGKey(9), N))
    assert np.median(pose_errors_deg(random, sim.rotations)[0]) > 60.0
    assert h["epoch"] == list(range(1, 13))
    assert h["resolution_angstrom"][0] == pytest.approx(35.0) and h["resolution_angstrom"][-1] == pytest.approx(14.0)
    assert min(h["temperature"]) >= 1.0 and h["batch_size"] == [24] * 12


def test_schedule_marches_then_polishes_and_cycles():
    plan = schedule(epochs=3, box=32, pixel_size_angstrom=5.0, local_epochs=3, cycles=2, n_particles=100,
                    min_local_step_deg=2.0)
    assert [s["mode"] for s in plan] == ["global"] * 3 + ["local"] * 3 + ["global"] + ["local"] * 3
    assert [s["step_deg"] for s in plan] == [30.0] * 3 + [15.0, 7.5, 3.75] + [30.0, 15.0, 7.5, 3.75]
    assert plan[6] == plan[2] and plan[3:6] == plan[7:10]
    # polishing at the final limit and minibatch; shift steps halve from half the global one to 1/4 px
    assert {s["r_limit"] for s in plan[2:]} == {plan[2]["r_limit"]} == {32 * 5.0 / 12.5}
    assert [s["shift_step_px"] for s in plan[3:6]] == [0.5 * plan[2]["shift_step_px"], 0.25, 0.25]
    assert {s["target_fraction"] for s in plan if s["mode"] == "local"} == {0.0}
    assert plan[0]["target_fraction"] == pytest.approx(0.01) and plan[2]["target_fraction"] == pytest.approx(0.001)
    # the default shift radius: a tenth of the box, within 3 px .. box / 6
    radius = {b: schedule(epochs=1, box=b, pixel_size_angstrom=4.0)[0]["max_shift_px"] for b in (16, 24, 64, 128)}
    assert radius == pytest.approx({16: 16 / 6, 24: 3.0, 64: 6.4, 128: 12.8})


def test_global_alignment_recovers_a_rotation_and_the_mirror():
    rot = np.asarray(jc.random_rotations(jax.random.PRNGKey(0), 40), np.float64)
    g_true = np.asarray(jc.random_rotations(jax.random.PRNGKey(1), 1), np.float64)[0]
    g, err = global_alignment(rot @ g_true, rot)
    np.testing.assert_allclose(g, g_true, atol=1e-5)
    assert err.max() < 0.1  # arccos near 1 of float32 rotations
    err, flipped = pose_errors_deg(flip_rotations(rot @ g_true), rot)
    assert flipped and err.max() < 0.1


def test_flipped_map_at_mirrored_poses_gives_the_same_projections():
    """flip_hand(v) seen at M A M (M = diag(1, 1, -1)) projects exactly as v at A."""
    for box in (16,):
        v = jc.synthetic_molecule(box, pixel_size_angstrom=PX, seed=5)
        grid = FourierGrid(box)
        rot = np.asarray(jc.random_rotations(jax.random.PRNGKey(2), 6))
        a = slices(volume_to_ft(jnp.asarray(v), "trilinear"), jnp.asarray(rot), grid, "trilinear")
        b = slices(volume_to_ft(jnp.asarray(flip_hand(v)), "trilinear"), jnp.asarray(flip_rotations(rot)), grid,
                   "trilinear")
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4 * float(jnp.abs(a).max()))
        # and the flip is not the identity: the molecule is chiral
        c = slices(volume_to_ft(jnp.asarray(flip_hand(v)), "trilinear"), jnp.asarray(rot), grid, "trilinear")
        assert float(jnp.abs(c - a).max()) > 0.1 * float(jnp.abs(a).max())
        np.testing.assert_array_equal(flip_hand(flip_hand(v)), v)
    for box in (16, 15):  # the centre voxel N//2 stays in place, even or odd box
        dot = np.zeros((box,) * 3)
        dot[box // 2, box // 2, box // 2] = 1.0
        dot[box // 2 + 2, box // 2, box // 2 + 1] = 2.0
        flipped = flip_hand(dot)
        assert flipped[box // 2, box // 2, box // 2] == 1.0 and flipped[box // 2 - 2, box // 2, box // 2 + 1] == 2.0


def test_recentred_map_with_its_shifts_renders_the_same_images():
    v = np.roll(jc.synthetic_molecule(BOX, pixel_size_angstrom=PX, seed=5), (1, -2, 2), axis=(0, 1, 2))
    rot = np.asarray(jc.random_rotations(jax.random.PRNGKey(2), 4))
    shifts = np.array([[0.5, -1.0]] * 4, np.float32)
    moved, new = recentre(v, rot, shifts)
    grid = FourierGrid(BOX)
    a = render(volume_to_ft(jnp.asarray(v), "trilinear"), jnp.asarray(rot), jnp.asarray(shifts), None, grid)
    b = render(volume_to_ft(jnp.asarray(moved), "trilinear"), jnp.asarray(rot), jnp.asarray(new), None, grid)
    assert float(jnp.abs(b - a).max()) < 0.08 * float(jnp.abs(a).max())  # trilinear, sub-voxel shifts
    assert not np.allclose(new, shifts)
    w = np.clip(moved, 0, None)
    c = np.arange(BOX) - BOX // 2
    assert abs(float((w.sum(axis=(0, 1)) * c).sum() / w.sum())) <= 0.5  # x centre of mass at N//2


def test_adaptive_temperature_hits_the_perplexity_target():
    scores = 40.0 * jax.random.normal(jax.random.PRNGKey(3), (5, 2000))
    weight = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])  # the padding row does not count
    for frac in (0.01, 0.05):
        t = adaptive_temperature(scores, weight, frac)
        logp = jax.nn.log_softmax(scores / t, axis=-1)
        perplexity = jnp.exp(-jnp.sum(jnp.exp(logp) * logp, -1))
        assert float(jnp.mean(jnp.log(perplexity[:4]))) == pytest.approx(np.log(frac * 2000), abs=1e-3)
    # already broad enough at T = 1: the temperature stays at its floor of 1
    assert float(adaptive_temperature(1e-3 * scores, weight, 0.01)) == pytest.approx(1.0, abs=1e-5)


def test_seeded_runs_repeat_and_resume_continues_exactly(simulated, run):
    _, _, particles = simulated
    result, states = run
    again = abinitio(particles, seed=0, settings=_settings(), **RUN)
    np.testing.assert_array_equal(again.volume, result.volume)
    np.testing.assert_array_equal(again.rotations, result.rotations)
    resumed = abinitio(particles, seed=0, settings=_settings(), resume=states[4], **RUN)
    np.testing.assert_allclose(resumed.volume, result.volume, rtol=0, atol=1e-6 * np.abs(result.volume).max())
    np.testing.assert_array_equal(resumed.rotations, result.rotations)
    assert resumed.history["epoch"] == list(range(1, 13))
    other = abinitio(particles, seed=1, settings=_settings(2), **RUN)
    assert not np.allclose(other.volume, np.asarray(jc.ft_to_volume(states[1].params, "trilinear")), atol=1e-3)


def _rotated(volume, matrix):
    """v'(x) = v(matrix @ x) about the centre voxel N//2 (cubic splines), axes (z, y, x) <-> (x, y, z)."""
    from scipy.ndimage import affine_transform

    n = volume.shape[0]
    flip = np.eye(3)[::-1]  # array axes (z, y, x) from (x, y, z)
    m = flip @ np.asarray(matrix, np.float64) @ flip
    c = np.full(3, n // 2, np.float64)
    return affine_transform(np.asarray(volume, np.float64), m, offset=c - m @ c, order=3, mode="constant")


def _translated(volume, t):
    """v'(x) = v(x - t) for t (3,) voxels along the array axes (Fourier phase ramp)."""
    k = np.fft.fftfreq(volume.shape[0])
    ramp = np.exp(-2j * np.pi * (k[:, None, None] * t[0] + k[None, :, None] * t[1] + k[None, None, :] * t[2]))
    return np.real(np.fft.ifftn(np.fft.fftn(volume) * ramp))


def _aligned_fsc(volume, rotations, truth, truth_rotations, shells):
    """Mean FSC to the truth over ``shells`` of a map from another frame: hand and global
    rotation from the poses (the rotation or its transpose, whichever fits), then the
    translation (whole voxels from the cross-correlation peak, then a quarter-voxel search)."""
    _, flipped = pose_errors_deg(rotations, truth_rotations)
    if flipped:
        volume, rotations = flip_hand(volume), flip_rotations(rotations)
    g, _ = global_alignment(rotations, truth_rotations)
    best = 0.0
    for m in (g, g.T):
        w = _rotated(volume, m)
        cc = np.real(np.fft.ifftn(np.fft.fftn(truth) * np.conj(np.fft.fftn(w))))
        t = np.array(np.unravel_index(np.argmax(cc), cc.shape), np.float64)
        t = np.where(t > truth.shape[0] // 2, t - truth.shape[0], t)
        steps = np.stack(np.meshgrid(*[np.linspace(-0.5, 0.5, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
        best = max([best] + [float(jc.fsc(_translated(w, t + d), truth)[shells].mean()) for d in steps])
    return best


def test_refine_finishes_from_the_abinitio_map(simulated, run):
    """Refine started from ab initio's map and poses (local searches, as `jaxcryo refine
    INIT_particles.star --reference INIT.mrc --local`) reaches the FSC to the truth of refine
    started from the 40 A low-pass of the truth (global search first), once its map is put in
    the truth's frame (hand and global rotation from the poses)."""
    from jaxcryo.refine import refine

    truth, sim, particles = simulated
    result, _ = run
    grid = FourierGrid(BOX)
    common = dict(box=BOX, pixel_size_angstrom=PX, batch_size=48, seed=0)
    from_truth = refine(particles, truth, epochs=6, global_order=1, initial_lowpass_angstrom=40.0, **common)
    ab = jc.prepare_particles(sim.images, result.rotations, result.shifts_px, sim.ctf, grid)
    from_ab = refine(ab, result.volume, local=True, epochs=4, local_step_deg=7.5, initial_lowpass_angstrom=20.0,
                     **common)
    shells = slice(1, BOX // 2 - 1)
    f_ab = _aligned_fsc(from_ab.reconstruction.volume, from_ab.rotations, truth, sim.rotations, shells)
    f_truth = float(jc.fsc(from_truth.reconstruction.volume, truth)[shells].mean())
    err, _ = pose_errors_deg(from_ab.rotations, sim.rotations)
    err_truth = poses.geodesic_distance_deg(from_truth.rotations, sim.rotations)
    # measured: FSC 0.98 from ab initio, 0.94 from the low-passed truth; median pose errors 6 and 18 deg
    assert f_ab > f_truth - 0.03, (f_ab, f_truth, np.median(err), np.median(err_truth))
    assert np.median(err) < np.median(err_truth) + 2.0, (np.median(err), np.median(err_truth))
    # and the alignment is no free lunch: the map from the low-passed truth, mirrored, scores far lower
    assert _aligned_fsc(flip_hand(from_truth.reconstruction.volume), from_truth.rotations, truth, sim.rotations,
                        shells) < f_truth - 0.1


def test_refine_stage_places_what_the_sgd_left_and_sharpens_the_map(simulated, run):
    """abinitio's refine stage (resumed after the SGD epochs, so only the stage runs): the poses
    and the map are refine's from the SGD map (low-passed to 1.5 x its 14 A limit: 40 A would
    leave 2 shells at this box), closer to the truth than the SGD's, and its history is kept;
    the SGD state is the one resumed from."""
    truth, sim, particles = simulated
    result, states = run
    rstates = []
    def keep(state):  # a copy, as a checkpoint on disk is (the run donates its buffers to the next epoch)
        rstates.append(jax.tree.map(lambda x: np.array(x) if isinstance(x, jax.Array) else x, state))
    refined = abinitio(particles, seed=0, settings=_settings(), resume=states[-1], refine_callback=keep,
                       **{**RUN, "refine_epochs": 6})
    sgd_err, _ = pose_errors_deg(result.rotations, sim.rotations)
    err, _ = pose_errors_deg(refined.rotations, sim.rotations)
    shells = slice(1, BOX // 2 - 1)
    f_sgd = _aligned_fsc(result.volume, result.rotations, truth, sim.rotations, shells)
    f_ref = _aligned_fsc(refined.volume, refined.rotations, truth, sim.rotations, shells)
    # measured: median 7.2 -> 5.3 deg, within 15 deg 75% -> 83%, FSC to the truth 0.977 -> 0.987
    assert np.median(err) < np.median(sgd_err) - 1.0, (np.median(err), np.median(sgd_err))
    assert np.mean(err < 15.0) > np.mean(sgd_err < 15.0), (np.mean(err < 15.0), np.mean(sgd_err < 15.0))
    assert f_ref > f_sgd + 0.004, (f_ref, f_sgd)
    r = refined.history["refine"]
    assert r["initial_lowpass_angstrom"] == pytest.approx(21.0) and r["mode"][0] == "global"
    assert 1 <= len(r["epoch"]) <= 6 and r["final_resolution_angstrom"] > 0
    assert refined.state.epoch == states[-1].epoch == 12 and refined.history["epoch"] == list(range(1, 13))
    # the stage resumed from its own checkpoint (after its second epoch) ends where it ended
    again = abinitio(particles, seed=0, settings=_settings(), resume=states[-1], refine_resume=rstates[1],
                     **{**RUN, "refine_epochs": 6})
    np.testing.assert_array_equal(again.rotations, refined.rotations)
    np.testing.assert_allclose(again.volume, refined.volume, rtol=0, atol=1e-5 * np.abs(refined.volume).max())
    assert again.history["refine"]["epoch"] == r["epoch"]


def test_classes_not_yet(simulated):
    _, _, particles = simulated
    with pytest.raises(NotImplementedError, match="classes"):
        abinitio(particles, classes=2, **RUN)


def _half_turn(volume):
    """The map turned by 180 degrees about z (array axis 0), about the centre voxel N//2
    (RELION's origin): two quarter turns, each rolled to keep voxel N//2 in place."""
    v = np.asarray(volume, np.float64)
    for _ in range(2):
        v = np.roll(np.rot90(v, axes=(1, 2)), 1, axis=1)
    return v


def test_symmetric_ab_initio_finds_poses_up_to_the_group():
    """A C2 molecule: with symmetry C2 the map comes out C2-symmetric about z, and the poses
    agree with the truth up to one global rotation and, per particle, one of its 2 equivalent
    poses (pose_errors_deg with the symmetry); the same poses scored as if C1 are far off
    (each particle's pose is free to be either of its two)."""
    base = jc.synthetic_molecule(BOX, pixel_size_angstrom=PX, seed=5)
    truth = ((base + _half_turn(base)) / 2).astype(np.float32)
    sim = jc.simulate_particles(truth, N, pixel_size_angstrom=PX, snr=3.0, seed=6, max_shift_px=0.5,
                                interpolation="trilinear")
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (N, 3, 3))
    particles = jc.prepare_particles(sim.images, eye, np.zeros((N, 2), np.float32), sim.ctf, FourierGrid(BOX))
    result = abinitio(particles, seed=0, settings=_settings(), symmetry="C2", **RUN)
    vol = np.asarray(result.volume)
    assert np.abs(_half_turn(vol) - vol).max() < 0.02 * np.abs(vol).max()
    err, _ = pose_errors_deg(result.rotations, sim.rotations, symmetry="C2")
    assert np.median(err) < 12.0 and np.mean(err < 15.0) > 0.7, (np.median(err), np.mean(err < 15.0))  # 5.4, 0.91
    plain, _ = pose_errors_deg(result.rotations, sim.rotations)
    assert np.median(plain) > 3 * np.median(err), (np.median(plain), np.median(err))  # 95 deg


def test_cli_abinitio_writes_map_star_history_and_resumes(tmp_path, capsys):
    sim = tmp_path / "sim"
    assert cli.main(["simulate", "--out", str(sim), "--n-images", "120", "--box", str(BOX), "--pixel-size", str(PX),
                     "--snr", "1", "--quiet"]) == 0
    out = tmp_path / "ab" / "init.mrc"  # the folder is created by abinitio
    argv = ["abinitio", str(sim / "particles.star"), "--out", str(out), "--epochs", "1", "--local-epochs", "1",
            "--cycles", "1", "--refine-epochs", "2",
            "--batch-size", "32", "--max-batch-size", "32", "--quiet", "--keep-checkpoint"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "hand" in text and "--flip-hand" in text
    with mrcfile.open(out) as m:
        assert m.data.shape == (BOX,) * 3
        assert float(m.voxel_size.x) == pytest.approx(PX)
        first = np.array(m.data)
    star = starfile.read(tmp_path / "ab" / "init_particles.star", always_dict=True)["particles"]
    assert len(star) == 120 and {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"} <= set(star)
    hist = json.loads((tmp_path / "ab" / "history.json").read_text())
    assert hist["epoch"] == [1, 2] and hist["resolution_angstrom"] == [35.0, 35.0] and hist["flip_hand"] is False
    assert hist["angular_step_deg"] == [30.0, 15.0]  # one global epoch, one polishing epoch
    assert hist["refine"]["mode"] == ["global", "global"] and hist["settings"]["refine_epochs"] == 2
    assert "2 refine epochs" in text
    assert (tmp_path / "ab" / "init.ckpt.npz").exists() and (tmp_path / "ab" / "init.refine.ckpt.npz").exists()
    # resume: both checkpoints are at their last epoch, so nothing is redone (the refine stage
    # only makes its final solve again) and the map is the same
    capsys.readouterr()
    assert cli.main(argv + ["--resume"]) == 0
    assert "resuming the refine stage" in capsys.readouterr().err
    with mrcfile.open(out) as m:
        np.testing.assert_array_equal(m.data, first)
    # --flip-hand writes the mirror image; without --keep-checkpoint the checkpoint is removed
    assert cli.main(argv[:-1] + ["--flip-hand"]) == 0
    with mrcfile.open(out) as m:
        np.testing.assert_allclose(m.data, flip_hand(first), atol=1e-6)
    assert not (tmp_path / "ab" / "init.ckpt.npz").exists() and not (tmp_path / "ab" / "init.refine.ckpt.npz").exists()
    # not yet: several classes, a clear error and exit status 2
    capsys.readouterr()
    assert cli.main(argv + ["--classes", "2"]) == 2
    assert "not implemented yet" in capsys.readouterr().err
