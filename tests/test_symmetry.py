"""Point-group symmetry: the groups (RELION's axes), the symmetry-expanded objective, and
reconstructions with --symmetry against relion_reconstruct --sym."""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_particles, random_pairs
from jaxcryo import cli
from jaxcryo.curvature import batch_exact_diagonal, exact_diagonal, symmetrize_diagonal
from jaxcryo.forward import FourierGrid, prepare_particles, volume_to_ft
from jaxcryo.fsc import fsc
from jaxcryo.geometry import spherical_mask
from jaxcryo.loss import Problem, forward, loss, per_image_loss, value_grad_hvp
from jaxcryo.reconstruct import reconstruct
from jaxcryo.simulate import gaussian_blob, simulate_particles
from jaxcryo.symmetry import symmetry_matrices, symmetry_order

mrcfile = pytest.importorskip("mrcfile")

ORDERS = [("C1", 1), ("C3", 3), ("c4", 4), ("C7", 7), ("D1", 2), ("D2", 4), ("d3", 6), ("D7", 14),
          ("T", 12), ("O", 24), ("I", 60), ("I1", 60), ("I2", 60), ("I3", 60), ("i4", 60)]


def _rotation(axis, degrees):
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _contains(mats, m, tol=1e-9):
    return bool(np.any(np.abs(mats - m).max(axis=(1, 2)) <= tol))


# ---------------------------------------------------------------------------------- the groups

@pytest.mark.parametrize("symbol,order", ORDERS)
def test_group_properties(symbol, order):
    g = symmetry_matrices(symbol)
    assert g.shape == (order, 3, 3) and symmetry_order(symbol) == order
    np.testing.assert_allclose(g[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.einsum("gji,gjk->gik", g, g), np.broadcast_to(np.eye(3), g.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-12)
    # closed under products, every element distinct
    products = np.einsum("aij,bjk->abik", g, g).reshape(-1, 3, 3)
    dist = np.abs(products[:, None] - g[None]).max(axis=(2, 3))
    assert dist.min(axis=1).max() < 1e-9
    pairwise = np.abs(g[:, None] - g[None]).max(axis=(2, 3)) + 10 * np.eye(order)
    assert pairwise.min() > 0.1


def test_relion_axes_and_orientation():
    """The generators RELION lists: Cn about z, Dn's 2-fold along x, T's 2-fold in the y-z plane,
    O's 4-folds on x, y, z, I2's 2-folds on x, y, z and 5-fold along (1, 0, phi)."""
    phi = (1 + 5 ** 0.5) / 2
    assert _contains(symmetry_matrices("C4"), _rotation((0, 0, 1), 90))
    assert _contains(symmetry_matrices("C7"), _rotation((0, 0, 1), 360 / 7))
    for n in (2, 3, 5):
        d = symmetry_matrices(f"D{n}")
        assert _contains(d, np.diag([1.0, -1.0, -1.0])) and _contains(d, _rotation((0, 0, 1), 360 / n))
        assert not _contains(d, _rotation((0, 1, 0), 180)) or n % 2 == 0  # the odd Dn: no 2-fold on y
    t = symmetry_matrices("T")
    assert _contains(t, _rotation((0, 0, 1), 120), 1e-9)
    assert _contains(t, _rotation((0, 2 ** 0.5, 1), 180), 1e-9)
    assert not _contains(t, _rotation((0, 0, 1), 180), 1e-6)  # the 2-folds are not on z
    signed_perms = [np.diag(s)[list(p)] for p in itertools.permutations(range(3))
                    for s in itertools.product((1.0, -1.0), repeat=3)]
    proper = np.array([m for m in signed_perms if np.linalg.det(m) > 0])
    o = symmetry_matrices("O")
    assert len(proper) == 24 and all(_contains(o, m, 0.0) for m in proper)  # exactly, no rounding
    i2 = symmetry_matrices("i")
    np.testing.assert_array_equal(i2, symmetry_matrices("I2"))
    for m in (np.diag([-1.0, -1.0, 1.0]), np.diag([1.0, -1.0, -1.0]), _rotation((1, 0, phi), 72),
              _rotation((0, 1 / phi, phi), 120)):
        assert _contains(i2, m, 1e-9)
    assert _contains(symmetry_matrices("I3"), _rotation((0, 0, 1), 72), 1e-9)
    assert _contains(symmetry_matrices("I1"), _rotation((phi, 0, -1), 72), 1e-9)


@pytest.mark.parametrize("bad", ["C0", "D0", "Q2", "Cs", "Ci", "C4v", "D2h", "Oh", "I5", "", "C-2", "T2", 4])
def test_unknown_symbol_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"valid forms: C1, Cn, Dn"):
        symmetry_matrices(bad)
    with pytest.raises(ValueError, match="valid forms"):
        Problem(grid=FourierGrid(6), symmetry=bad)


def _relion_ops(symbol, tmp_path):
    out = subprocess.run(["relion_refine", "--sym", symbol, "--print_symmetry_ops", "--o", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    return np.array([[[float(v) for v in lines[i + j].split()] for j in (1, 2, 3)]
                     for i, line in enumerate(lines) if re.match(r"\s*R\(\d+\)=", line)])


@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="RELION is not installed")
def test_matrices_equal_relions(tmp_path):
    """The same set of matrices as relion_refine --sym X --print_symmetry_ops (5 printed digits)."""
    for symbol in ("C3", "d3", "D4", "T", "O", "I", "I1", "I3", "I4"):
        ours, theirs = symmetry_matrices(symbol), _relion_ops(symbol, tmp_path)
        assert theirs.shape == ours.shape, symbol
        dist = np.abs(ours[:, None] - theirs[None]).max(axis=(2, 3))
        assert dist.min(axis=1).max() < 1e-4 and dist.min(axis=0).max() < 1e-4, symbol


# ------------------------------------------------------------------------------- the objective

_loss = jax.jit(loss, static_argnums=2)
_per_image = jax.jit(per_image_loss, static_argnums=2)
_vgh = jax.jit(value_grad_hvp, static_argnums=2)
_diag = jax.jit(batch_exact_diagonal, static_argnums=1)


def _over_group(fn, batch, mats):
    """fn(batch at poses A_i g) for every g, stacked (one vmapped, jitted call)."""
    rots = jnp.einsum("bij,gjk->gbik", batch.rotations, jnp.asarray(mats, batch.rotations.dtype))
    return jax.jit(jax.vmap(lambda r: fn(batch._replace(rotations=r))))(rots)


def test_symmetric_objective_is_the_mean_over_the_group():
    """Brute-force twin: loss, per-image loss, gradient, HVP and exact diagonal with a symmetry
    equal the mean over g of the C1 quantities at poses A_i g (T: 12 elements, axes off the grid)."""
    symbol = "T"
    rng = np.random.default_rng(3)
    plain = Problem(grid=FourierGrid(8), interpolation="trilinear", lam=1e-3)
    sym = Problem(grid=FourierGrid(8), interpolation="trilinear", lam=1e-3, symmetry=symbol.lower())
    assert sym.symmetry == symbol and hash(sym) != hash(plain)
    batch = make_particles(rng, plain, 5, pad=2)
    v = random_pairs(rng, plain.grid.volume_shape + (2,))
    z = random_pairs(rng, (1,) + plain.grid.volume_shape + (2,))
    mats = symmetry_matrices(symbol)
    data_p = plain.data_only()
    value, grad, hvps = _vgh(v, batch, sym, z)
    twin_value, twin_grad, twin_hvps = (x.mean(0) for x in _over_group(lambda b: value_grad_hvp(v, b, data_p, z),
                                                                        batch, mats))
    lam = plain.regularizer()
    np.testing.assert_allclose(value, twin_value + jnp.sum(lam * v * v), rtol=2e-5)
    np.testing.assert_allclose(_loss(v, batch, sym), value, rtol=2e-5)
    np.testing.assert_allclose(grad, twin_grad + 2 * lam * v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hvps, twin_hvps + 2 * lam * z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_per_image(v, batch, sym),
                               _over_group(lambda b: per_image_loss(v, b, plain), batch, mats).mean(0), rtol=2e-5)
    diag = _diag(batch, sym.data_only())
    np.testing.assert_allclose(diag, _over_group(lambda b: batch_exact_diagonal(b, data_p), batch, mats).mean(0),
                               rtol=1e-4, atol=1e-6)
    full = jax.jit(exact_diagonal, static_argnums=(1, 2))(batch, sym, 3)  # in batches of 3 rows
    np.testing.assert_allclose(full, diag + 2 * lam, rtol=1e-4, atol=1e-6)


def test_symmetrized_diagonal_keeps_the_exact_one():
    """The exact diagonal of the O-symmetric objective is invariant under the group average that
    psgd applies to its Hutchinson samples; a random array is not; C1 changes nothing."""
    rng = np.random.default_rng(0)
    sym = Problem(grid=FourierGrid(10), interpolation="trilinear", symmetry="O")
    d = jax.jit(exact_diagonal, static_argnums=(1, 2))(make_particles(rng, sym, 12), sym, 12)
    average = jax.jit(symmetrize_diagonal, static_argnums=1)
    np.testing.assert_allclose(average(d, sym), d, rtol=1e-4, atol=1e-6 * float(d.max()))
    noise = jnp.abs(random_pairs(rng, d.shape))
    assert float(jnp.abs(average(noise, sym) - noise).max()) > 0.3
    plain = Problem(grid=FourierGrid(10))
    assert symmetrize_diagonal(noise, plain) is noise


def _symmetrise_on_grid(volume, symbol):
    """Mean over the group of a map rotated on the voxel grid; exact for signed permutations
    (C4, D2, O), whose rotations map voxels to voxels. The map must vanish at the -N/2 planes."""
    n = volume.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x, y, z], -1)
    out = np.zeros_like(volume)
    for g in symmetry_matrices(symbol):
        assert np.array_equal(g, np.rint(g))
        q = (np.rint(pts @ g.T).astype(int) + n // 2) % n  # V(g p)
        out += volume[q[..., 2], q[..., 1], q[..., 0]]
    return out / len(symmetry_matrices(symbol))


@pytest.mark.parametrize("symbol", ["C4", "D2", "O"])
def test_loss_of_a_symmetric_map_is_invariant(symbol):
    """For a map with the group's symmetry every pose A g sees the same slice as A: with images
    of that map, the symmetric loss is zero as the C1 loss is; composing the other way round
    (g A, a rotation in the image plane's frame) is not."""
    rng = np.random.default_rng(5)
    box = 10
    vol = _symmetrise_on_grid(rng.standard_normal((box,) * 3).astype(np.float32) * spherical_mask(box), symbol)
    v = volume_to_ft(jnp.asarray(vol))
    plain = Problem(grid=FourierGrid(box), interpolation="trilinear")
    sym = Problem(grid=FourierGrid(box), interpolation="trilinear", symmetry=symbol)
    batch = make_particles(rng, plain, 6)
    batch = batch._replace(data=jax.jit(forward, static_argnums=2)(v, batch, plain))
    scale = float(jnp.sum(batch.data ** 2)) / 6
    assert float(_loss(v, batch, sym)) < 1e-5 * scale
    np.testing.assert_allclose(_per_image(v, batch, sym), 0.0, atol=1e-5 * scale)
    wrong = jnp.einsum("gjk,bkl->gbjl", jnp.asarray(symmetry_matrices(symbol), jnp.float32), batch.rotations)
    wrong_loss = jax.jit(jax.vmap(lambda r: loss(v, batch._replace(rotations=r), plain)))(wrong)
    assert float(wrong_loss.mean()) > 0.05 * scale


# ------------------------------------------------------------------------------ reconstructions

BOX, PX = 24, 3.0


def symmetric_blobs(symbol, box=BOX, n_blobs=5, seed=0):
    """A map made of Gaussian blobs at the orbits of random points: exactly symmetric."""
    rng = np.random.default_rng(seed)
    pts = rng.standard_normal((n_blobs, 3))
    pts *= rng.uniform(1.5, box / 4, (n_blobs, 1)) / np.linalg.norm(pts, axis=1, keepdims=True)
    vol = sum(gaussian_blob(box, 1.4, g @ p) for g in symmetry_matrices(symbol) for p in pts)
    return (vol / vol.max()).astype(np.float32)


def _write_particles(folder, sim, box, px):
    from jaxcryo.io import make_table, write_particles, write_stack

    folder.mkdir(parents=True, exist_ok=True)
    write_stack(folder / "particles.mrcs", sim.images, pixel_size_angstrom=px)
    c = sim.ctf
    table = make_table(stack_paths=str(folder / "particles.mrcs"), stack_indices=np.arange(len(sim.images)),
                       pixel_size_angstrom=px, euler_deg=sim.euler_deg, shifts_angstrom=sim.shifts_angstrom,
                       defocus_u_angstrom=c.defocus_u_angstrom, defocus_v_angstrom=c.defocus_v_angstrom,
                       defocus_angle_deg=c.defocus_angle_deg, voltage_kv=300.0, cs_mm=2.7,
                       amplitude_contrast=0.1, box_size=box)
    write_particles(folder / "particles.star", table)
    return folder / "particles.star"


def _max_asymmetry(volume, symbol):
    """max over g of ||V(g x) - V(x)|| / ||V|| on the voxel grid (signed-permutation groups)."""
    n = volume.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x, y, z], -1)
    worst = 0.0
    for g in symmetry_matrices(symbol):
        q = (np.rint(pts @ g.T).astype(int) + n // 2) % n
        worst = max(worst, float(np.linalg.norm(volume[q[..., 2], q[..., 1], q[..., 0]] - volume)
                                 / np.linalg.norm(volume)))
    return worst


def test_cli_symmetry_gives_a_symmetric_map(tmp_path, capsys):
    """`jaxcryo reconstruct --symmetry O` on particles of an asymmetric map: the map equals its
    copies rotated by the group (the truth does not); bad symbols stop before any work."""
    box = 16
    truth = symmetric_blobs("C1", box, n_blobs=8, seed=2)
    sim = simulate_particles(truth, 96, pixel_size_angstrom=PX, snr=2.0, seed=1, interpolation="trilinear")
    star = _write_particles(tmp_path / "sim", sim, box, PX)
    fast = ["--epochs", "2", "--batch-size", "32", "--quiet", "--no-halves"]
    (tmp_path / "o").mkdir()
    assert cli.main(["reconstruct", str(star), "--out", str(tmp_path / "o" / "map.mrc"), "--symmetry", "o",
                     *fast]) == 0
    capsys.readouterr()
    sym_map = mrcfile.read(tmp_path / "o" / "map.mrc")
    assert json.loads((tmp_path / "o" / "history.json").read_text())["settings"]["symmetry"] == "O"
    assert _max_asymmetry(truth, "O") > 0.5
    assert _max_asymmetry(sym_map, "O") < 0.02
    for bad in ("C4v", "X"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["reconstruct", str(star), "--out", str(tmp_path / "bad" / "map.mrc"), "--symmetry", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"unknown symmetry '{bad}'" in err and "valid forms" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION is not installed")
@pytest.mark.parametrize("symbol", ["C4", "D3", "T"])
def test_agrees_with_relion_reconstruct_sym(symbol, tmp_path):
    """Particles of a symmetric map: jaxcryo's map with the symmetry correlates with
    relion_reconstruct --sym's, and its FSC to the truth is at least about RELION's."""
    truth = symmetric_blobs(symbol)
    sim = simulate_particles(truth, 200, pixel_size_angstrom=PX, snr=1.0, seed=4, interpolation="trilinear")
    star = _write_particles(tmp_path, sim, BOX, PX)
    subprocess.run(["relion_reconstruct", "--i", star.name, "--o", "relion.mrc", "--sym", symbol, "--ctf"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
    relion = mrcfile.read(tmp_path / "relion.mrc").astype(np.float64)
    grid = FourierGrid(BOX)
    particles = prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / PX, sim.ctf, grid)
    ours = reconstruct(particles, box=BOX, pixel_size_angstrom=PX, symmetry=symbol, halves=False, epochs=4,
                       batch_size=32).volume
    shells = slice(1, BOX // 2)
    ours_truth, relion_truth = fsc(ours, truth)[shells], fsc(relion, truth)[shells]
    assert relion_truth[:4].min() > 0.95  # RELION read the particles as meant
    signal = relion_truth > 0.5
    assert fsc(ours, relion)[shells][signal].min() > 0.8
    assert ours_truth.mean() >= relion_truth.mean() - 0.02
    assert (ours_truth[signal] >= relion_truth[signal] - 0.1).all()
