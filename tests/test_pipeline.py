"""STAR + stacks -> Particles, memory plans and checkpoints (jaxcryo.pipeline), at tiny size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.forward import FourierGrid, prepare_particles
from jaxcryo.geometry import euler_to_matrix
from jaxcryo.io import InputError, make_table, write_particles, write_stack
from jaxcryo.pipeline import (checkpoint_path, checkpoint_settings, format_bytes, load_checkpoint, load_particles,
                              open_particles, plan_memory, save_checkpoint, state_template, table_poses)
from jaxcryo.reconstruct import ReconState, make_optimizer


def _write_set(folder, n=13, box=12, px=2.5, *, ctf=True, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    stack = str(folder / "p.mrcs")
    write_stack(stack, images, pixel_size_angstrom=px)
    table = make_table(stack_paths=stack, stack_indices=np.arange(n), pixel_size_angstrom=px,
                       euler_deg=rng.uniform(-180, 180, (n, 3)), shifts_angstrom=rng.uniform(-5, 5, (n, 2)),
                       defocus_u_angstrom=rng.uniform(1e4, 2e4, n) if ctf else None, box_size=box)
    star = str(folder / "p.star")
    write_particles(star, table)
    return star, images


def test_table_poses_converts_units(tmp_path):
    star, _ = _write_set(tmp_path)
    table, stack = open_particles(star)
    stack.close()
    rotations, shifts_px, ctf = table_poses(table)
    np.testing.assert_allclose(rotations, np.asarray(euler_to_matrix(table.euler_deg)), atol=1e-6)
    np.testing.assert_allclose(shifts_px, table.shifts_angstrom / 2.5, rtol=1e-6)
    np.testing.assert_allclose(ctf.defocus_u_angstrom, table.defocus_u_angstrom, rtol=1e-6)
    np.testing.assert_allclose(ctf.pixel_size_angstrom, 2.5)
    assert table_poses(table, with_ctf=False)[2] is None


def test_no_ctf_columns_gives_none(tmp_path):
    star, _ = _write_set(tmp_path, ctf=False)
    table, stack = open_particles(star)
    stack.close()
    assert table_poses(table)[2] is None


def test_load_particles_in_chunks_equals_prepare_at_once(tmp_path):
    star, images = _write_set(tmp_path, n=13)
    table, stack = open_particles(star)
    grid = FourierGrid(12)
    done = []
    with stack:
        particles = load_particles(table, stack, grid, chunk_size=5, progress=done.append)
    assert sum(done) == 13 and len(done) == 3
    rotations, shifts_px, _ = table_poses(table)
    ref = prepare_particles(jnp.asarray(images), rotations, jnp.asarray(shifts_px), None, grid)
    np.testing.assert_allclose(particles.data, np.asarray(ref.data), atol=1e-5)
    assert particles.data.shape == (13, grid.n_pixels, 2) and particles.weight.sum() == 13


def test_mixed_pixel_sizes_refused(tmp_path):
    box, n = 8, 4
    stack = str(tmp_path / "s.mrcs")
    write_stack(stack, np.zeros((n, box, box)), pixel_size_angstrom=1.0)
    table = make_table(stack_paths=stack, stack_indices=np.arange(n), pixel_size_angstrom=[1.0, 1.0, 2.0, 2.0],
                       optics_group=[1, 1, 2, 2], euler_deg=np.zeros((n, 3)), box_size=box)
    star = str(tmp_path / "s.star")
    write_particles(star, table)
    with pytest.raises(InputError, match="different pixel sizes"):
        open_particles(star)


def test_memory_plan_scales_with_particles():
    small, big = plan_memory(1000, 64), plan_memory(2000, 64)
    assert big.particles_bytes == 2 * small.particles_bytes
    assert big.volumes_bytes == small.volumes_bytes
    # Fourier pairs inside the disk are smaller than the images they come from.
    assert small.particles_bytes / 2 < 1000 * 64 * 64 * 4
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(10) == "10 B"
    assert "GiB" in format_bytes(3 * 1024 ** 3)


def test_checkpoint_round_trip(tmp_path):
    tx = make_optimizer("psgd", box=8)
    params = jnp.stack([jnp.full((8, 8, 5, 2), float(i)) for i in range(2)])
    opt_state = jax.vmap(tx.init)(params)
    key = jax.random.split(jax.random.PRNGKey(3), 2)
    state = ReconState(2, params, opt_state, key, {"epoch": [1, 2], "loss": [3.0, 2.0], "seconds": [0.1, 0.2],
                                                   "compile_seconds": 1.0})
    path = checkpoint_path(str(tmp_path / "map.mrc"))
    assert path.endswith("map.ckpt.npz")
    save_checkpoint(path, state, {"method": "psgd"})
    assert checkpoint_settings(path) == {"method": "psgd"}
    loaded, settings = load_checkpoint(path, state_template(method="psgd", box=8, groups=2))
    assert settings == {"method": "psgd"} and loaded.epoch == 2
    assert loaded.history == {"epoch": [1, 2], "loss": [3.0, 2.0], "seconds": [0.1, 0.2]}
    assert jax.tree.structure(loaded.opt_state) == jax.tree.structure(opt_state)
    for a, b in zip(jax.tree.leaves((params, opt_state, key)), jax.tree.leaves(loaded[1:4])):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [p.name for p in tmp_path.iterdir()] == ["map.ckpt.npz"]  # no temporary left behind


def test_bad_checkpoint_is_an_input_error(tmp_path):
    path = tmp_path / "map.ckpt.npz"
    path.write_bytes(b"not a checkpoint")
    template = state_template(method="psgd", box=8)
    with pytest.raises(InputError, match="unreadable checkpoint"):
        load_checkpoint(path, template)
    with pytest.raises(InputError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt.npz", template)


def _psgd_state(box=8, groups=2):
    tx = make_optimizer("psgd", box=box)
    params = jnp.stack([jnp.full((box, box, box // 2 + 1, 2), float(i)) for i in range(groups)])
    return ReconState(1, params, jax.vmap(tx.init)(params), jax.random.split(jax.random.PRNGKey(0), groups),
                      {"epoch": [1], "loss": [1.0], "seconds": [0.1]})


@pytest.mark.parametrize("method", ["psgd", "psgd-exact", "sgd", "adam"])
def test_state_template_matches_the_real_state(method):
    """The tree a checkpoint is rebuilt into is the one reconstruct() builds (structure, shapes, dtypes)."""
    tx = make_optimizer(method, box=8)
    params = jnp.zeros((1, 8, 8, 5, 2), jnp.float32)
    real = (params, jax.vmap(tx.init)(params), jax.random.split(jax.random.PRNGKey(0), 1))
    template = state_template(method=method, box=8, groups=1)
    assert jax.tree.structure(template) == jax.tree.structure(real)
    for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(real)):
        assert a.shape == b.shape and a.dtype == b.dtype


class _Plant:
    """Unpickling this creates the file ``marker`` (what a planted pickle could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoints_cannot_run_code(tmp_path):
    import json
    import pickle

    marker = tmp_path / "pwned"
    template = state_template(method="psgd", box=8, groups=2)
    good = tmp_path / "good.ckpt.npz"
    save_checkpoint(good, _psgd_state(), {"method": "psgd"})
    with np.load(good) as z:
        arrays = dict(z)
    meta = json.loads(bytes(arrays["meta"]).decode())

    crafted = {}
    crafted["pickle file"] = pickle.dumps(_Plant(marker))
    # An object array inside the npz (np.save pickles it).
    crafted["object array leaf"] = {**arrays, "leaf_00000": np.array([_Plant(marker)], dtype=object)}
    # The old format: the tree structure as a pickle, version 1.
    old_meta = {**meta, "version": 1}
    crafted["version-1 treedef pickle"] = {**arrays, "treedef": np.frombuffer(pickle.dumps(_Plant(marker)), np.uint8),
                                           "meta": np.frombuffer(json.dumps(old_meta).encode(), np.uint8)}
    crafted["metadata is a pickle"] = {**arrays, "meta": np.frombuffer(pickle.dumps(_Plant(marker)), np.uint8)}
    wrong = dict(arrays)
    wrong["leaf_00000"] = np.zeros((2, 8, 8, 5, 3), np.float32)
    crafted["leaf of another shape"] = wrong
    fewer = {k: v for k, v in arrays.items() if k != "leaf_00003"}
    crafted["missing leaf"] = fewer
    messages = {}
    for name, content in crafted.items():
        path = tmp_path / "x.ckpt.npz"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            with open(path, "wb") as fh:
                np.savez(fh, **content)
        with pytest.raises(InputError) as err:
            load_checkpoint(path, template)
        assert str(path) in str(err.value) and "delete it to start afresh" in str(err.value), str(err.value)
        messages[name] = str(err.value)
        assert not marker.exists(), f"{name}: loading ran code"
    assert "version 1" in messages["version-1 treedef pickle"]
    assert "float32[2, 8, 8, 5, 3]" in messages["leaf of another shape"]
    with pytest.raises(InputError, match="arrays, these settings need"):
        load_checkpoint(good, state_template(method="sgd", box=8, groups=2))  # other settings: other tree
    load_checkpoint(good, template)  # the genuine one still loads


def test_state_template_matches_what_reconstruct_builds(rng, halves=True):
    """A checkpoint of a real run loads into the tree rebuilt from its settings (guards against
    reconstruct() growing state that state_template does not know)."""
    import jaxcryo as jc
    from conftest import make_particles, make_problem

    problem = make_problem(box=8)
    particles = make_particles(rng, problem, 12)
    rec = jc.reconstruct(particles, box=8, pixel_size_angstrom=3.0, method="psgd", epochs=1, batch_size=6,
                         halves=halves, wiener_after=0, devices=1)
    template = state_template(method="psgd", box=8, groups=2 if halves else 1)
    real = (rec.state.params, rec.state.opt_state, rec.state.key)
    assert jax.tree.structure(template) == jax.tree.structure(real)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(template)] == \
        [(np.shape(b), np.asarray(b).dtype) for b in jax.tree.leaves(real)]


def test_streaming_plan_is_flat_in_the_stack_and_counts_every_part():
    from jaxcryo.pipeline import plan_streaming, step_scratch_bytes
    small, big = (plan_streaming(64, n_images=n, chunk_size=1024, runtime_bytes=300 * 2 ** 20)
                  for n in (10_000, 40_000))
    assert small == big  # blocks of the same size (512 rows a half-set): nothing grows with the stack
    assert small.runtime_bytes == 300 * 2 ** 20 and small.scratch_bytes == step_scratch_bytes(64)
    # 5,000 rows a half-set in 10 equal blocks of 500: three blocks of pairs in flight, and the
    # images of (prefetch + 2) blocks read
    grid = FourierGrid(64)
    assert small.particles_bytes == 3 * 1000 * (grid.n_pixels * 2 + 20) * 4
    assert small.chunk_bytes >= 3 * 1000 * 64 * 64 * 4
    assert small.in_memory_bytes == sum(dataclasses_values(small))
    # one block holding everything: the whole set's pairs (as in memory) and its images once read
    one = plan_streaming(64, n_images=1000, chunk_size=4096)
    assert one.particles_bytes == 3 * 1000 * (grid.n_pixels * 2 + 20) * 4


def dataclasses_values(plan):
    import dataclasses
    return [getattr(plan, f.name) for f in dataclasses.fields(plan)]
