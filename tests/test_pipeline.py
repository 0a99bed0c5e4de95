"""STAR + stacks -> Particles, memory plans and checkpoints (jaxcryo.pipeline), at tiny size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcryo.forward import FourierGrid, prepare_particles
from jaxcryo.geometry import euler_to_matrix
from jaxcryo.io import InputError, make_table, write_particles, write_stack
from jaxcryo.pipeline import (checkpoint_path, format_bytes, load_checkpoint, load_particles, open_particles,
                              plan_memory, save_checkpoint, table_poses)
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
    loaded, settings = load_checkpoint(path)
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
    with pytest.raises(InputError, match="unreadable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt.npz")
