"""Conditioning: the paper's lower bound, kappa against an independent hit count, preconditioned spread."""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import pytest

from jaxcryo.conditioning import (add_condition_command, brute_force_hits, conditioning_report, diag_cross_section,
                                  disk_ball_ratio, exact_hessian_diagonal, full_spectrum_diagonal,
                                  hutchinson_hessian_diagonal, kappa_by_radius, kappa_from_hits,
                                  kappa_lower_bound, preconditioned_spread, relative_error_by_probes,
                                  theoretical_bound, uniform_particles)
from jaxcryo.forward import FourierGrid
from jaxcryo.forward.ctf import ctf
from jaxcryo.loss import Problem


def test_disk_ball_ratio_counts_and_approximation():
    radii, p, approx = disk_ball_ratio(20)
    assert p[0] == 1.0
    assert p[1] == pytest.approx(9 / 19)  # round(|k|) <= 1: a 3x3 square of pixels, 1 + 6 + 12 voxels
    assert np.all(np.diff(p) < 0)
    np.testing.assert_allclose(p[8:], approx[8:], rtol=0.12)  # p ~ 3 / (4R) once the grid is fine enough
    assert kappa_lower_bound(0.5, n_images=10, lam=0.0) == pytest.approx(2.0)
    assert kappa_lower_bound(0.5, n_images=10, lam=10.0) == pytest.approx(20 / 15)


def test_bound_holds_for_nearest_uniform_no_ctf():
    box, lam = 16, 1e-3
    parts = uniform_particles(3000, seed=3)
    problem = Problem(grid=FourierGrid(box), interpolation="nearest", lam=lam)
    diag = exact_hessian_diagonal(parts, problem)
    kappa = kappa_by_radius(diag, box, lam=lam)
    bound = theoretical_bound(len(kappa) - 1, lam=lam)
    assert np.all(kappa[1:] >= bound[1:]), (kappa, bound)
    assert kappa[0] == pytest.approx(1.0)
    # The origin is hit once by every image: D(0) = 1 + lam / 2 exactly.
    d = full_spectrum_diagonal(diag, box, lam)
    assert d[0, 0, 0] == pytest.approx(1.0 + lam / 2, rel=1e-5)
    t, cross = diag_cross_section(diag, box, lam=lam)
    assert cross[0] == pytest.approx(1.0 + lam / 2, rel=1e-5) and np.all(cross[1:] < cross[0])


@pytest.mark.parametrize("with_ctf", [False, True])
def test_kappa_matches_brute_force_hit_count(with_ctf):
    box, n = 12, 400
    parts = uniform_particles(n, seed=5, with_ctf=with_ctf, pixel_size_angstrom=3.0)
    problem = Problem(grid=FourierGrid(box), interpolation="nearest")
    kappa = kappa_by_radius(exact_hessian_diagonal(parts, problem, batch_size=128), box)

    ctf_squared = None
    if with_ctf:  # CTF^2 at every pixel of the full disk, in brute_force_hits' pixel order
        c = np.arange(-box // 2, box - box // 2)
        px, py = np.meshgrid(c, c, indexing="xy")
        keep = px ** 2 + py ** 2 <= (box // 2 - 1) ** 2
        freqs = np.stack([px[keep], py[keep]], -1).astype(np.float32)
        ctf_squared = np.asarray(jax.vmap(lambda p: ctf(freqs, p, box))(parts.ctf)) ** 2
    hits = brute_force_hits(np.asarray(parts.rotations), box, ctf_squared=ctf_squared)
    reference = kappa_from_hits(hits, box)
    assert reference.shape == kappa.shape
    np.testing.assert_allclose(kappa, reference, rtol=0.2)  # the tolerance
    np.testing.assert_allclose(kappa, reference, rtol=1e-3)  # in fact they agree to rounding


def test_spread_after_exact_preconditioning_is_one():
    box = 12
    parts = uniform_particles(300, seed=7, with_ctf=True, pixel_size_angstrom=3.0)
    problem = Problem(grid=FourierGrid(box), interpolation="trilinear", lam=1e-4)
    diag = exact_hessian_diagonal(parts, problem, batch_size=100)
    spread, kappa = preconditioned_spread(diag, diag, box)
    np.testing.assert_allclose(spread, 1.0, rtol=1e-5)
    np.testing.assert_allclose(kappa, 1.0, rtol=1e-5)
    raw, _ = preconditioned_spread(diag, np.ones_like(diag), box)
    assert raw[-1] > 1.5  # there was something to remove


def test_hutchinson_diagonal_error_shrinks_like_one_over_sqrt_probes():
    box = 10
    parts = uniform_particles(200, seed=2)
    problem = Problem(grid=FourierGrid(box), interpolation="trilinear", lam=1e-3)
    exact = exact_hessian_diagonal(parts, problem, batch_size=100)
    samples = hutchinson_hessian_diagonal(parts, problem, jax.random.PRNGKey(0), 32, chunk=8, batch_size=100)
    counts, errs = relative_error_by_probes(samples, exact)
    assert counts == [1, 2, 4, 8, 16, 32]
    assert errs[-1] < errs[0] / 3  # about 1/sqrt(32) = 0.18 of the one-probe error
    # Unbiased: the 32-probe mean is within a few standard errors of the exact diagonal.
    mean, sem = samples.mean(0), samples.std(0, ddof=1) / np.sqrt(32)
    assert np.mean(np.abs(mean - np.asarray(exact)) <= 4 * sem + 1e-6) > 0.99


def test_nearest_hutchinson_is_exact():
    box = 10
    parts = uniform_particles(100, seed=4)
    rep = conditioning_report(parts, box, interpolation="nearest", n_probes=2, batch_size=50)
    # nearest slicing has a diagonal Hessian, so z * Hz = diag(H) for any +-1 probe
    assert rep["hutchinson_error"]["relative_error"][0] < 1e-5
    np.testing.assert_allclose(rep["spread_hutchinson"], 1.0, rtol=1e-4)
    assert rep["radius"][-1] == box // 2 - 2


def test_condition_command_on_a_star_file(tmp_path, capsys):
    from jaxcryo.io import make_table, write_particles
    rng = np.random.default_rng(0)
    n = 150
    euler = np.stack([rng.uniform(-180, 180, n), np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
                      rng.uniform(-180, 180, n)], -1)
    table = make_table(stack_paths=str(tmp_path / "p.mrcs"), stack_indices=np.arange(n), pixel_size_angstrom=2.0,
                       euler_deg=euler, defocus_u_angstrom=rng.uniform(1e4, 2e4, n), box_size=20)
    star = tmp_path / "p.star"
    write_particles(star, table)
    parser = argparse.ArgumentParser()
    add_condition_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["condition", str(star), "--box", "12", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "kappa" in printed and "150 particles, box 12" in printed
    report = json.loads((tmp_path / "out" / "condition.json").read_text())
    assert report["with_ctf"] and report["box"] == 12 and len(report["kappa"]) == 5
    assert (tmp_path / "out" / "condition.png").stat().st_size > 1000
    # Without --box the optics rlnImageSize is used.
    args = parser.parse_args(["condition", str(star), "--no-ctf", "--out", str(tmp_path / "o2")])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "o2" / "condition.json").read_text())
    assert report["box"] == 20 and not report["with_ctf"]
