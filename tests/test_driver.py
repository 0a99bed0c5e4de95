"""One driver: streamed blocks of particles run the in-memory epoch, settings and result."""
from __future__ import annotations

import os

import numpy as np
import pytest

import jaxcryo as jc
from jaxcryo import cli
from jaxcryo.forward import FourierGrid
from jaxcryo.fsc import fsc
from jaxcryo.pipeline import load_particles, open_particles, reconstruct_streaming
from jaxcryo.reconstruct import BlockLayout

BOX, N, PX = 16, 150, 3.0
SETTINGS = dict(box=BOX, pixel_size_angstrom=PX, epochs=2, batch_size=32, wiener_after=1, seed=0)


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    folder = tmp_path_factory.mktemp("driver")
    assert cli.main(["simulate", "--out", str(folder), "--n-images", str(N), "--box", str(BOX),
                     "--pixel-size", str(PX), "--snr", "1", "--quiet"]) == 0
    return str(folder / "particles.star")


@pytest.fixture(scope="module")
def in_memory(star):
    table, stack = open_particles(star)
    with stack:
        particles = load_particles(table, stack, FourierGrid(BOX))
    return jc.reconstruct(particles, **SETTINGS)


def test_block_layout_covers_every_row_once():

    from jaxcryo.reconstruct import half_sets
    groups = half_sets(101, seed=4)  # (2, 51), the second half padded once
    one = BlockLayout(groups, None)
    assert one.n_blocks == 1 and one.rows == 51
    np.testing.assert_array_equal(one.fixed()[0], groups)
    layout = BlockLayout(groups, 40)  # 20 rows per half-set and block -> 3 blocks of 17
    assert layout.n_blocks == 3 and layout.rows == 17
    for blocks in (layout.fixed(), layout.shuffled(0, 1), layout.shuffled(0, 2)):
        rows = np.concatenate([b for b in blocks], axis=1)
        for h in range(2):  # each half-set's particles, each once, and nothing of the other half
            np.testing.assert_array_equal(np.sort(rows[h][rows[h] >= 0]), np.sort(groups[h][groups[h] >= 0]))
    a, b = layout.shuffled(0, 1), layout.shuffled(0, 2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))  # a fresh order every epoch
    assert all(np.array_equal(x, y) for x, y in zip(a, layout.shuffled(0, 1)))  # and the same on resume


def test_one_streamed_chunk_is_the_in_memory_run(star, in_memory):
    """Streaming with one chunk holding everything: the in-memory map, losses and noise model
    (same exact-diagonal start, Wiener prior, noise estimate), up to the FFT's batch rounding."""
    table, stack = open_particles(star)
    with stack:
        seen = []
        rec = reconstruct_streaming(table, stack, chunk_size=N, progress=seen.append, **SETTINGS)
    assert sum(seen) == 2 * N
    ref = in_memory
    np.testing.assert_allclose(rec.volume, ref.volume, atol=1e-5 * np.abs(ref.volume).max())
    np.testing.assert_allclose(rec.half_maps, ref.half_maps, atol=1e-5 * np.abs(ref.half_maps).max())
    np.testing.assert_allclose(rec.history["loss"], ref.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(rec.history["shell_lam"], ref.history["shell_lam"], rtol=1e-4)
    np.testing.assert_allclose(rec.history["noise_weights"], ref.history["noise_weights"], rtol=1e-4)
    assert "init_seconds" in rec.history  # the Hutchinson estimate started from the exact diagonal


def test_several_chunks_give_nearly_the_in_memory_map(star, in_memory):
    """Three blocks per epoch: only the minibatches differ (drawn within blocks)."""
    table, stack = open_particles(star)
    with stack:
        rec = reconstruct_streaming(table, stack, chunk_size=N // 3, **SETTINGS)
    ref = in_memory
    assert np.all(np.diff(rec.history["loss"]) < 0)
    np.testing.assert_allclose(rec.history["loss"], ref.history["loss"], rtol=0.01)
    curve = fsc(rec.volume, ref.volume)
    assert curve[1:BOX // 2].min() > 0.95, curve
    assert rec.history["shell_lam"] and rec.history["noise_weights"]


def test_normal_equations_sum_over_streamed_blocks(star):
    """reconstruct_normal over a ParticleBlocks source: the equations are sums over particles, so
    three streamed blocks give the in-memory maps (white noise model: the same equations), and one
    block holding everything gives them with the noise estimate too (the same sample)."""
    from jaxcryo.pipeline import StreamedBlocks
    from jaxcryo.reconstruct import reconstruct_normal

    table, stack = open_particles(star)
    grid = FourierGrid(BOX)
    with stack:
        particles = load_particles(table, stack, grid)
        for chunk, noise in ((N // 3, "white"), (N, "estimate")):
            ref = reconstruct_normal(particles, box=BOX, pixel_size_angstrom=PX, noise_model=noise)
            rec = reconstruct_normal(StreamedBlocks(table, stack, grid, chunk_size=chunk), box=BOX,
                                     pixel_size_angstrom=PX, noise_model=noise)
            scale = np.abs(ref.volume).max()
            np.testing.assert_allclose(rec.volume, ref.volume, atol=1e-4 * scale, err_msg=str(chunk))
            np.testing.assert_allclose(rec.half_maps, ref.half_maps, atol=1e-4 * scale, err_msg=str(chunk))
            np.testing.assert_allclose(rec.history["shell_lam"], ref.history["shell_lam"], rtol=1e-3)
    assert "noise_sigma2" in rec.history
    np.testing.assert_allclose(rec.history["noise_sigma2"], ref.history["noise_sigma2"], rtol=1e-4)


# ------------------------------------------------------------------ memory of a streamed run

MEASURE = """
import resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "jaxcryo.cli", *sys.argv[1:]], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
sys.stdout.write(proc.stdout)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _noise_set(folder, n, box=32, px=4.0):
    from jaxcryo.io import make_table, write_particles, write_stack
    rng = np.random.default_rng(0)
    stack = str(folder / "p.mrcs")
    write_stack(stack, rng.standard_normal((n, box, box)).astype(np.float32), pixel_size_angstrom=px)
    table = make_table(stack_paths=stack, stack_indices=np.arange(n), pixel_size_angstrom=px,
                       euler_deg=rng.uniform(-180, 180, (n, 3)), defocus_u_angstrom=rng.uniform(1e4, 2e4, n),
                       box_size=box)
    write_particles(str(folder / "p.star"), table)
    return str(folder / "p.star")


def _planned_and_peak(proc):
    import re
    out, err = proc.communicate(timeout=300)
    code, peak = out.split()[-2:]
    assert code == "0", err[-3000:]
    number, unit = re.search(r"memory needed ([0-9.]+) (MiB|GiB)", out).groups()
    return float(number) * 1024 ** (2 if unit == "MiB" else 3), int(peak), out


def test_streamed_memory_is_the_plan_and_flat(tmp_path):
    """A real streamed run (subprocess) peaks under its printed plan, and 15x the images do not
    raise the peak by the stack (the stack is read, not mapped; same blocks)."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXCRYO_CACHE_DIR="",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = []
    small, large, box = 2000, 30000, 32
    for n in (small, large):
        folder = tmp_path / str(n)
        folder.mkdir()
        star = _noise_set(folder, n, box=box)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", MEASURE, "reconstruct", star, "--out", str(folder / "map.mrc"), "--stream",
             "--chunk-size", "1024", "--epochs", "1", "--method", "psgd", "--wiener-after", "0",
             "--noise-model", "white", "--max-memory-gb", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (plan_n, peak_n, err), (plan_15n, peak_15n, _) = (_planned_and_peak(p) for p in procs)
    assert "runtime" in err and "blocks in flight" in err, err
    mib = 1024 ** 2
    # The same blocks: the plan grows only by the STAR table held (measured with the runtime, ~2 KB a row).
    assert abs(plan_15n - plan_n) < (large - small) * 3 * 1024, (plan_n, plan_15n)
    print(f"planned {plan_n / mib:.0f} / {plan_15n / mib:.0f} MiB, peak {peak_n / mib:.0f} / {peak_15n / mib:.0f} MiB")
    assert 0.6 * plan_n < peak_n < plan_n and 0.6 * plan_15n < peak_15n < plan_15n, (peak_n, plan_n, peak_15n, plan_15n)
    # The larger stack is 107 MiB more and is swept whole (a memory-mapped read kept all of it, so the
    # peak grew by the stack). The peak grows by the table the plan measured, and by less than half
    # the extra stack: the peaks of identical runs differ by up to ~40 MiB (XLA's compile threads).
    extra_stack = (large - small) * box * box * 4
    assert peak_15n - peak_n < (plan_15n - plan_n) + extra_stack / 2, (peak_n, peak_15n, plan_n, plan_15n)


def test_step_scratch_estimate_bounds_xla_memory_analysis():
    """The plan's compiled-step scratch is above what XLA allocates for the block function, and not far above."""
    import jax
    import jax.numpy as jnp

    from jaxcryo.forward import make_ctf_params
    from jaxcryo.forward.model import Particles
    from jaxcryo.loss import Problem
    from jaxcryo.pipeline import plan_memory, step_scratch_bytes
    from jaxcryo.reconstruct import group_functions, make_optimizer

    box, rows, batch = 24, 96, 32
    grid = FourierGrid(box)
    tx = make_optimizer("psgd", box=box)
    fn, _ = group_functions(Problem(grid=grid, lam=1e-4), tx, batch_size=batch, n_probes=1, exact=False,
                            average=True, blocks=True)
    params = jnp.zeros((2,) + grid.volume_shape + (2,))
    ctf = jax.tree.map(lambda x: jnp.broadcast_to(x, (2, rows)),
                       make_ctf_params(rows, pixel_size_angstrom=2.0, defocus_u_angstrom=1e4))
    block = Particles(jnp.zeros((2, rows, grid.n_pixels, 2)), jnp.zeros((2, rows, 3, 3)), ctf, jnp.ones((2, rows)))
    compiled = jax.jit(fn).lower(params, jax.vmap(tx.init)(params), jax.random.split(jax.random.PRNGKey(0), 2),
                                 block, None, jnp.int32(0), jnp.int32(0), params).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    # XLA's temporaries hold the step's volume-sized buffers too (gradient, HVP, probes, trials),
    # which the plan counts among its volumes
    estimate = step_scratch_bytes(box, batch_size=batch) + plan_memory(1, box).volumes_bytes
    assert temp < estimate < 3 * temp, (temp, estimate)


def test_one_frozen_config_holds_the_settings(star, in_memory):
    """A jaxcryo.Config gives the same run as the same settings as keywords; keywords beside a
    config override its fields; it is frozen; an unknown name is an error before any work."""
    import dataclasses

    table, stack = open_particles(star)
    with stack:
        particles = load_particles(table, stack, FourierGrid(BOX))
    cfg = jc.Config(epochs=2, batch_size=32, wiener_after=1, seed=0)
    rec = jc.reconstruct(particles, cfg, box=BOX, pixel_size_angstrom=PX)
    np.testing.assert_array_equal(rec.volume, in_memory.volume)
    assert rec.history["epoch"] == [1, 2]
    one = jc.reconstruct(particles, cfg, box=BOX, pixel_size_angstrom=PX, epochs=1)  # override
    assert one.history["epoch"] == [1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    with pytest.raises(TypeError, match="epoch"):
        jc.reconstruct(particles, cfg, box=BOX, pixel_size_angstrom=PX, epoch=3)
    with pytest.raises(ValueError, match="gold-standard"):
        jc.refine(particles, np.zeros((BOX,) * 3, np.float32), cfg.replace(halves=False), box=BOX,
                  pixel_size_angstrom=PX)
    assert cfg.as_dict()["batch_size"] == 32 and jc.Config(method=jc.make_optimizer("sgd", box=BOX)).as_dict()


@pytest.fixture(scope="module")
def refine_star(tmp_path_factory):
    """Particles refine can find poses for: box 24 at 8 A/px, SNR 1 (as tests/test_refine.py)."""
    folder = tmp_path_factory.mktemp("refine_stream")
    assert cli.main(["simulate", "--out", str(folder), "--n-images", "200", "--box", "24", "--pixel-size", "8",
                     "--snr", "1", "--seed", "1", "--quiet"]) == 0
    return str(folder / "particles.star")


def test_refine_streamed_is_the_in_memory_refine(refine_star):
    """Refine on the same driver: streamed with one block holding every particle it is the
    in-memory refine (only the FFT batch differs); with three blocks per pass only the
    minibatches differ (drawn within blocks): the same quality of poses and map. The final solve
    over streamed blocks (each block's final pose pass feeding the normal equations) is the
    in-memory one: resumed from the same state, the same poses and maps."""
    import dataclasses

    from jaxcryo.io import read_map
    from jaxcryo.pipeline import StreamedBlocks
    from jaxcryo.refine import rotation_angle_deg

    box, px = 24, 8.0
    truth, _ = read_map(os.path.join(os.path.dirname(refine_star), "truth.mrc"))
    table, stack = open_particles(refine_star)
    true_rot = np.asarray(jc.euler_to_matrix(table.euler_deg), np.float32)
    table = dataclasses.replace(table, shifts_angstrom=np.zeros((len(table), 2)))  # a global search
    grid = FourierGrid(box)
    kw = dict(box=box, pixel_size_angstrom=px, epochs=4, global_order=1, global_epochs=1, batch_size=50)
    with stack:
        particles = load_particles(table, stack, grid)
        mem = jc.refine(particles, truth, **kw)
        one = jc.refine(StreamedBlocks(table, stack, grid, chunk_size=10_000), truth, **kw)
        three = jc.refine(StreamedBlocks(table, stack, grid, chunk_size=70), truth, **kw)
        final_mem = jc.refine(particles, truth, resume=mem.state, **kw)
        final_three = jc.refine(StreamedBlocks(table, stack, grid, chunk_size=70), truth, resume=mem.state, **kw)
    assert final_three.reconstruction.history["epoch"] == mem.reconstruction.history["epoch"]  # no epoch ran
    # the same candidates (poses and posteriors); the maps up to the order of the sums and CG's tolerance
    # (here all 200 alike; a float-level near-tie may flip on another CPU, so 98% must be)
    same = np.abs(final_three.rotations - final_mem.rotations).max(axis=(1, 2)) < 1e-5
    assert same.mean() >= 0.98, same.mean()
    np.testing.assert_allclose(final_three.max_prob[same], final_mem.max_prob[same], rtol=1e-4, atol=1e-6)
    scale = np.abs(final_mem.reconstruction.volume).max()
    np.testing.assert_allclose(final_three.reconstruction.volume, final_mem.reconstruction.volume, atol=2e-3 * scale)
    for a, b in zip(final_three.reconstruction.half_maps, final_mem.reconstruction.half_maps):
        assert fsc(a, b)[1:box // 2].min() > 0.9995  # (0.99999 here)
    scale = np.abs(mem.reconstruction.volume).max()
    np.testing.assert_allclose(one.reconstruction.volume, mem.reconstruction.volume, atol=1e-4 * scale)
    np.testing.assert_allclose(one.rotations, mem.rotations, atol=1e-5)
    shells = slice(1, box // 2 - 1)
    f_three = fsc(three.reconstruction.volume, truth)[shells].mean()
    f_mem = fsc(mem.reconstruction.volume, truth)[shells].mean()
    e_three = np.median(rotation_angle_deg(three.rotations, true_rot))
    e_mem = np.median(rotation_angle_deg(mem.rotations, true_rot))
    print(f_three, f_mem, e_three, e_mem, three.reconstruction.history["angular_step_deg"])
    assert f_three > f_mem - 0.03, (f_three, f_mem)
    assert e_three < e_mem + 1.0 and e_mem < 7.5, (e_three, e_mem)
