"""The normal-equation route: exact against the loss, CG at the least-squares optimum, and a
map from ``reconstruct(method='normal')`` at least as good as psgd's."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo as jc
from conftest import make_particles, make_problem
from jaxcryo import normal
from jaxcryo.curvature import exact_diagonal, hvp
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.loss import loss, value_grad_hvp
from jaxcryo.reconstruct import least_squares


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("box", [8, 9])
@pytest.mark.parametrize("interpolation", ["nearest", "trilinear"])
@pytest.mark.parametrize("with_ctf,shells", [(False, False), (True, True)])
def test_equations_reproduce_loss_gradient_hvp_and_diagonal(box, interpolation, with_ctf, shells):
    """float64, random volume and direction, a zero-weight row, batches that do not divide n."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(box)
        sw = tuple(np.linspace(1.0, 2.0, box)) if shells else None
        problem = make_problem(box, interpolation, lam=0.01, shell_weights=sw)
        parts = make_particles(rng, problem, 6, dtype=np.float64, with_ctf=with_ctf, pad=1)
        neq = normal.accumulate(parts, problem, batch_size=4)
        x = jnp.asarray(rng.standard_normal(problem.grid.volume_shape + (2,)))
        z = jnp.asarray(rng.standard_normal(x.shape))
        reg = problem.regularizer(jnp.float64)
        value, grad, hz = value_grad_hvp(x, parts, problem, z[None])
        v2, g2 = normal.value_and_grad(neq, x, reg)
        assert _rel(v2, value) < 1e-12 and _rel(g2, grad) < 1e-12
        assert _rel(normal.apply(neq, z) + 2 * reg * z, hz[0]) < 1e-12
        assert _rel(normal.apply(neq, z) + 2 * reg * z, hvp(loss, x, z, parts, problem)) < 1e-12
        assert _rel(normal.diagonal(neq) + 2 * reg, exact_diagonal(parts, problem, 4, jnp.float64)) < 1e-12
        assert _rel(normal.rhs(neq), -value_grad_hvp(jnp.zeros_like(x), parts, problem.data_only())[1]) < 1e-12


def test_equations_add_over_disjoint_sets_and_reject_what_they_cannot_do():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        problem = make_problem(8, "trilinear")
        parts = make_particles(rng, problem, 10, dtype=np.float64)
        whole = normal.accumulate(parts, problem, batch_size=10)
        split = normal.combine(normal.accumulate(jax.tree.map(lambda a: a[:4], parts), problem, 3),
                               normal.accumulate(jax.tree.map(lambda a: a[4:], parts), problem, 5))
        for a, b in zip(whole, split):
            assert _rel(a, b) < 1e-12
    with pytest.raises(ValueError, match="nearest and trilinear"):
        normal.accumulate(parts, make_problem(8, "nufft"))
    with pytest.raises(ValueError, match="r_max"):
        normal.accumulate(parts, jc.Problem(grid=FourierGrid(8, r_max=4)))


def test_cg_reaches_the_least_squares_optimum():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        problem = dataclasses.replace(make_problem(10, "trilinear", lam=1e-3), shell_lam=tuple(np.linspace(0, 0.05, 10)))
        parts = make_particles(rng, problem, 40, dtype=np.float64)
        ref, info = least_squares(parts, problem, iters=300, tol=1e-11)
        assert info["relative_residual"] < 1e-10
        x, info = normal.solve(normal.accumulate(parts, problem, 16), problem, iters=300, tol=1e-11)
        assert info["relative_residual"] < 1e-10
        assert _rel(x, ref) < 1e-8


def test_normal_route_map_as_good_as_psgd():
    box, px = 24, 3.0
    truth = jc.synthetic_molecule(box, pixel_size_angstrom=px, seed=3)
    sim = jc.simulate_particles(truth, 2000, pixel_size_angstrom=px, snr=0.1, seed=4)
    particles = jc.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / px, sim.ctf, FourierGrid(box))
    kw = dict(box=box, pixel_size_angstrom=px, seed=1, wiener_after=2)
    psgd = jc.reconstruct(particles, method="psgd", epochs=4, batch_size=64, **kw)
    rec = jc.reconstruct(particles, method="normal", epochs=4, **kw)
    shells = slice(1, box // 2 - 1)
    assert rec.half_maps.shape == (2, box, box, box) and rec.fsc is not None
    assert 1 <= len(rec.history["epoch"]) <= 4 and rec.history["seconds"] == sorted(rec.history["seconds"])
    lam = np.asarray(rec.history["shell_lam"])
    assert lam[0] == 0 and np.all(lam[1:box // 2] > 0)
    ours, theirs = jc.fsc(rec.volume, truth)[shells].mean(), jc.fsc(psgd.volume, truth)[shells].mean()
    assert ours >= theirs - 0.005, (ours, theirs)
    # the half-maps are the minimisers of their own objective: CG converged
    assert max(max(k) for k in rec.history["cg_iters"]) < 50


def test_two_devices_give_the_one_device_maps(tmp_path):
    """Accumulation sharded over 2 (host) devices, psum-ed: the same equations, the same maps.
    A subprocess: the device count is read once, at start-up."""
    import os
    import subprocess
    import sys

    script = tmp_path / "two.py"
    script.write_text(
        "import numpy as np, jaxcryo as jc\n"
        "from jaxcryo.forward.slicing import FourierGrid\n"
        "box, px = 12, 3.0\n"
        "truth = jc.synthetic_molecule(box, pixel_size_angstrom=px, seed=3)\n"
        "sim = jc.simulate_particles(truth, 73, pixel_size_angstrom=px, snr=1.0, seed=4)\n"
        "P = jc.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / px, sim.ctf, FourierGrid(box))\n"
        "kw = dict(box=box, pixel_size_angstrom=px, method='normal', wiener_after=1, batch_size=16)\n"
        "a, b = jc.reconstruct(P, devices=1, **kw), jc.reconstruct(P, devices=2, **kw)\n"
        "print(np.abs(a.volume - b.volume).max() / np.abs(a.volume).max(),\n"
        "      np.abs(a.half_maps - b.half_maps).max() / np.abs(a.half_maps).max())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    volume_err, halves_err = map(float, proc.stdout.split()[-2:])
    # float32 rounding: the psum adds the devices' partial tables in another order, and the CG
    # solves (from zero) and the noise estimate carry it on (measured 1.0e-5).
    assert volume_err < 5e-5 and halves_err < 5e-5


def test_cli_default_is_the_normal_route(tmp_path, monkeypatch):
    import json

    from jaxcryo import cli

    monkeypatch.setenv("JAXCRYO_CACHE_DIR", "")  # no persistent compilation cache from a test

    sim, out = tmp_path / "sim", tmp_path / "rec"
    out.mkdir()
    assert cli.main(["simulate", "--out", str(sim), "--n-images", "300", "--box", "16", "--pixel-size", "4",
                     "--snr", "1", "--quiet"]) == 0
    assert cli.main(["reconstruct", str(sim / "particles.star"), "--out", str(out / "map.mrc"), "--quiet",
                     "--keep-checkpoint"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["settings"]["method"] == "normal" and history["epoch"] == [1, 2]
    assert {"map.mrc", "map_half1.mrc", "map_half2.mrc", "history.json"} <= {p.name for p in out.iterdir()}
    from jaxcryo.io import read_map
    volume, truth = read_map(out / "map.mrc")[0], read_map(sim / "truth.mrc")[0]
    assert jc.fsc(volume, truth)[1:7].mean() > 0.8
    half = read_map(out / "map_half1.mrc")[0]
    # Rerun with --resume: the kept checkpoint after round 2 (arrays + JSON, no optimizer state) is
    # picked up; nothing left but the map's solve.
    assert (out / "map.ckpt.npz").exists()
    assert cli.main(["reconstruct", str(sim / "particles.star"), "--out", str(out / "map.mrc"), "--quiet",
                     "--resume"]) == 0
    assert json.loads((out / "history.json").read_text())["epoch"] == [1, 2]
    np.testing.assert_array_equal(read_map(out / "map_half1.mrc")[0], half)
    np.testing.assert_allclose(read_map(out / "map.mrc")[0], volume, atol=1e-3 * np.abs(volume).max())
