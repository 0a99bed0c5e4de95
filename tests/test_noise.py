"""The noise model: per-group shell weights in the loss, sigma^2 estimated from residuals,
and reconstruction with coloured noise (two optics groups with opposite spectra)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcryo as jc
from conftest import make_particles, make_problem, random_pairs
from jaxcryo.curvature import batch_exact_diagonal
from jaxcryo.forward import FourierGrid
from jaxcryo.forward.model import volume_to_ft
from jaxcryo.loss import Problem, image_pixel_weights, loss, per_image_loss, subset
from jaxcryo.noise import (estimate_noise, pixel_shells, residual_power, shell_weights_from_sigma2, sigma2_from_sums,
                           with_noise_weights)
from jaxcryo.reconstruct import half_sets, make_full_loss

BOX, PX, N = 24, 3.0, 1200
# one compilation per configuration (eager dispatch is slow on CPU)
_loss = jax.jit(loss, static_argnames="problem")
_grad = jax.jit(jax.grad(loss), static_argnames="problem")
_per_image_loss = jax.jit(per_image_loss, static_argnames="problem")
_diagonal = jax.jit(batch_exact_diagonal, static_argnames="problem")


def _spectra(box):
    """Relative noise power per shell of the two optics groups: rising and falling with |k|."""
    r = np.arange(box) / (box // 2)
    return np.stack([0.3 + 2.0 * r ** 2, 2.0 * np.exp(-2.0 * r) + 0.05])


@pytest.fixture(scope="module")
def coloured():
    """Particles with coloured noise, alternating between two optics groups (noise groups)."""
    truth = jc.synthetic_molecule(BOX, pixel_size_angstrom=PX, seed=7)
    group = (np.arange(N) % 2).astype(np.int32)
    sim = jc.simulate_particles(truth, N, pixel_size_angstrom=PX, snr=0.05, seed=8, interpolation="trilinear",
                                noise_spectrum=_spectra(BOX)[group])
    grid = FourierGrid(BOX)
    particles = jc.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / PX, sim.ctf, grid,
                                     noise_group=group)
    true_sigma2 = sim.noise_power[:2, : grid.radius + 1]  # rows 0 and 1 are groups 0 and 1
    return truth, particles, true_sigma2


# ---------------------------------------------------------------- weights in the loss


def test_per_group_weights_match_one_problem_per_group(rng):
    """Each image is weighed with its own group's spectrum: the two-group loss of every image,
    its gradient and its exact diagonal equal those of single-spectrum problems, one per group."""
    shells = FourierGrid(6).radius + 1
    table = np.stack([np.linspace(0.5, 2.0, shells), np.linspace(3.0, 0.2, shells)])
    problem = with_noise_weights(make_problem(6, "trilinear", lam=0.01), table)
    assert problem.n_noise_groups == 2 and hash(problem) == hash(with_noise_weights(problem, table))
    batch = make_particles(rng, problem, 5)._replace(noise_group=jnp.array([1, 0, 0, 1, 1], jnp.int32))
    params = random_pairs(rng, problem.grid.volume_shape + (2,))
    singles = [with_noise_weights(problem, row) for row in table]

    got = _per_image_loss(params, batch, problem)
    want = [_per_image_loss(params, subset(batch, jnp.array([i])), singles[int(g)])[0]
            for i, g in enumerate(batch.noise_group)]
    np.testing.assert_allclose(got, want, rtol=1e-5)

    pw = np.asarray(image_pixel_weights(problem, batch))
    shell = pixel_shells(problem.grid)
    for i, g in enumerate(np.asarray(batch.noise_group)):
        np.testing.assert_allclose(pw[i], problem.grid.multiplicity * table[g][shell], rtol=1e-6)

    # the minibatch mean, group by group: rows of group g alone, with group g's spectrum
    rows = [jnp.array([1, 2]), jnp.array([0, 3, 4])]
    prior = problem.regularizer()
    split = sum(len(r) / 5 * (_loss(params, subset(batch, r), singles[g]) - jnp.sum(prior * params ** 2))
                for g, r in enumerate(rows))
    np.testing.assert_allclose(_loss(params, batch, problem), split + jnp.sum(prior * params ** 2), rtol=1e-5)
    split_grad = sum(len(r) / 5 * (_grad(params, subset(batch, r), singles[g]) - 2 * prior * params)
                     for g, r in enumerate(rows))
    np.testing.assert_allclose(_grad(params, batch, problem), split_grad + 2 * prior * params, rtol=1e-4, atol=1e-5)
    split_diag = sum(len(r) / 5 * (_diagonal(subset(batch, r), singles[g]) - 2 * prior) for g, r in enumerate(rows))
    np.testing.assert_allclose(_diagonal(batch, problem), split_diag + 2 * prior, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="noise_group"):
        image_pixel_weights(problem, batch._replace(noise_group=None))


def test_shell_weights_from_sigma2():
    grid = FourierGrid(16)
    s = grid.radius + 1
    shell = pixel_shells(grid)
    # white noise of any level gives ones: lam and step sizes keep their meaning
    np.testing.assert_allclose(shell_weights_from_sigma2(np.full((2, s), 7.0), grid), 1.0)
    # coloured: proportional to 1/sigma^2, mean 1 over all pixels of all images (with multiplicity)
    sigma2 = np.stack([1.0 + np.arange(s), 5.0 / (1.0 + np.arange(s))])
    counts = np.array([300.0, 100.0])
    w = shell_weights_from_sigma2(sigma2, grid, group_counts=counts)
    np.testing.assert_allclose(w * sigma2, (w * sigma2)[0, 0], rtol=1e-12)
    per_pixel = w[:, shell] * grid.multiplicity
    np.testing.assert_allclose(np.sum(counts @ per_pixel) / (counts.sum() * grid.multiplicity.sum()), 1.0,
                               rtol=1e-12)
    # unknown shells take the nearest known value; a near-silent shell is floored; an empty
    # group gets the count-weighted mean spectrum
    holes = sigma2.copy()
    holes[0, 3], holes[0, -1], holes[1, 2] = np.nan, 0.0, 1e-9
    w2 = shell_weights_from_sigma2(holes, grid, group_counts=counts)
    assert np.all(np.isfinite(w2)) and np.all(w2 > 0)
    ratio = w2[0] / w2[0, 0]
    np.testing.assert_allclose(ratio[3], sigma2[0, 0] / np.interp(3, [2, 4], sigma2[0, [2, 4]]), rtol=1e-12)
    np.testing.assert_allclose(ratio[-1], sigma2[0, 0] / sigma2[0, -2], rtol=1e-12)
    assert w2[1, 2] / w2[1, 0] == pytest.approx(sigma2[1, 0] / (1e-3 * np.median(holes[1])), rel=1e-9)
    empty = shell_weights_from_sigma2(np.stack([sigma2[0], np.full(s, np.nan)]), grid, group_counts=[5, 0])
    np.testing.assert_allclose(empty[1], empty[0], rtol=1e-12)


# ---------------------------------------------------------------- estimating sigma^2


def test_residuals_at_the_true_map_recover_each_groups_spectrum(coloured):
    """At the map that made the images, the residual is the noise: its mean power per shell
    must be the simulated one, per group. The tolerance is statistical: 600 images per group,
    shell 0 has one real pixel per image (std 6 %), shells 1-2 a handful (std ~2-3 %), the rest
    tens to hundreds (< 1 %)."""
    truth, particles, true_sigma2 = coloured
    problem = Problem(grid=FourierGrid(BOX), interpolation="trilinear")
    vft = volume_to_ft(jnp.asarray(truth), "trilinear")
    est = np.asarray(jax.jit(lambda v, p: estimate_noise(v, p, problem, n_groups=2, batch_size=256))(vft, particles))
    assert est.shape == true_sigma2.shape == (2, BOX // 2)
    ratio = est / true_sigma2
    assert np.abs(ratio[:, 0] - 1).max() < 0.25
    assert np.abs(ratio[:, 1:3] - 1).max() < 0.1
    assert np.abs(ratio[:, 3:] - 1).max() < 0.04
    # the spectra really are coloured and differ: a white or shared model would be off by far more
    assert true_sigma2[0, -1] / true_sigma2[0, 1] > 4 and true_sigma2[1, 1] / true_sigma2[1, -1] > 4
    # padding rows do not count; the pixel counts are images times pixels per shell (with
    # multiplicity); the power sums are the loss's data term, shell by shell
    some = subset(particles, jnp.r_[jnp.arange(10), -jnp.ones(6, int)])
    power, pixels = residual_power(vft, some, problem, n_groups=2, batch_size=4)
    shells = pixel_shells(problem.grid)
    np.testing.assert_allclose(pixels, 5 * np.bincount(shells, problem.grid.multiplicity)[None].repeat(2, 0))
    weights = np.stack([np.linspace(1.0, 2.0, BOX // 2), np.linspace(3.0, 0.5, BOX // 2)])
    weighted = with_noise_weights(problem, weights)
    want = float(jnp.sum(some.weight * _per_image_loss(vft, some, weighted)))
    np.testing.assert_allclose(float(np.sum(weights * np.asarray(power))), want, rtol=1e-5)
    # sigma^2 from the sums: the group that has images keeps its own; the empty one is NaN, or
    # with pool_empty the pooled spectrum (here the other group's)
    only_first = subset(particles, jnp.flatnonzero(particles.noise_group == 0)[:10])
    power, pixels = residual_power(vft, only_first, problem, n_groups=2, batch_size=4)
    sigma2 = sigma2_from_sums(power, pixels)
    np.testing.assert_allclose(sigma2[0], np.asarray(power[0]) / np.asarray(pixels[0]), rtol=1e-6)
    assert np.isnan(sigma2[1]).all()
    np.testing.assert_allclose(sigma2_from_sums(power, pixels, pool_empty=True), sigma2[[0, 0]], rtol=1e-12)


def test_reconstruct_with_the_estimated_model_beats_white(coloured):
    truth, particles, true_sigma2 = coloured
    kw = dict(box=BOX, pixel_size_angstrom=PX, epochs=3, batch_size=64, seed=1)
    white = jc.reconstruct(particles, noise_model="white", **kw)
    est = jc.reconstruct(particles, **kw)  # noise_model="estimate" is the default
    assert "noise_sigma2" not in white.history
    sigma2 = np.asarray(est.history["noise_sigma2"])
    assert sigma2.shape == (2, BOX // 2)
    # the estimate is made at maps still converging (residuals hold some signal at low
    # resolution): within 10 % beyond shell 3, and the right colour in each group
    assert np.abs(sigma2[:, 4:] / true_sigma2[:, 4:] - 1).max() < 0.1
    weights = np.asarray(est.history["noise_weights"])
    assert weights[0, 2] > 3 * weights[0, -1] and weights[1, -1] > 3 * weights[1, 2]
    high = slice(BOX // 4, BOX // 2 - 1)
    f_white, f_est = jc.fsc(white.volume, truth)[high].mean(), jc.fsc(est.volume, truth)[high].mean()
    assert f_est > f_white + 0.01, (f_est, f_white)
    for h in (white.history, est.history):  # the objective's two terms are recorded
        np.testing.assert_allclose(np.add(h["data_loss"], h["prior"]), h["loss"], rtol=1e-6)
        assert all(p > 0 for p in h["prior"])
    # the last loss is the objective with the final noise model, each half-set at its half-map
    problem = with_noise_weights(Problem(grid=FourierGrid(BOX), lam=1e-4), est.history["noise_weights"])
    full = jax.jit(make_full_loss(problem, 256))
    halves = [subset(particles, jnp.asarray(h)) for h in half_sets(N, seed=1)]
    want = np.mean([float(full(est.params[i], halves[i])) for i in (0, 1)])
    np.testing.assert_allclose(est.history["loss"][-1], want, rtol=1e-4)
    with pytest.raises(ValueError, match="noise_model"):
        jc.reconstruct(particles, noise_model="pink", **kw)


def test_normal_route_estimates_the_coloured_model_and_uses_it(coloured):
    """The normal-equation route: sigma^2 from a sample's residuals at the white half-maps, the
    equations accumulated again with 1/sigma^2 (a regression: the second accumulation once reused
    the white trace), a better map than white, and a resumed run gives the same maps."""
    truth, particles, true_sigma2 = coloured
    kw = dict(box=BOX, pixel_size_angstrom=PX, method="normal", wiener_after=1, seed=1)
    white = jc.reconstruct(particles, noise_model="white", **kw)
    seen = []
    est = jc.reconstruct(particles, callback=seen.append, **kw)
    weights = np.asarray(est.history["noise_weights"])
    assert weights[0, 2] > 3 * weights[0, -1] and weights[1, -1] > 3 * weights[1, 2]
    high = slice(BOX // 4, BOX // 2 - 1)
    f_white, f_est = jc.fsc(white.volume, truth)[high].mean(), jc.fsc(est.volume, truth)[high].mean()
    assert f_est > f_white + 0.01, (f_est, f_white)
    again = jc.reconstruct(particles, resume=seen[0], **kw)  # from round 1's state
    np.testing.assert_array_equal(again.volume, est.volume)


# ---------------------------------------------------------------- from STAR files


def test_optics_groups_become_noise_groups(tmp_path):
    """load_particles numbers the noise groups by rlnOpticsGroup (sorted), also for one process's
    share of a STAR (then indexed into the whole STAR's groups); the CLI's flag reaches reconstruct."""
    from jaxcryo.cli import build_parser
    from jaxcryo.io import ParticleStack, make_table, write_particles, write_stack
    from jaxcryo.pipeline import load_particles, open_particles

    n, box = 6, 8
    write_stack(str(tmp_path / "p.mrcs"), np.zeros((n, box, box), np.float32), pixel_size_angstrom=2.0)
    optics = np.array([7, 3, 3, 7, 9, 3])
    table = make_table(stack_paths=str(tmp_path / "p.mrcs"), stack_indices=np.arange(n), pixel_size_angstrom=2.0,
                       euler_deg=np.zeros((n, 3)), shifts_angstrom=np.zeros((n, 2)),
                       defocus_u_angstrom=np.full(n, 1e4), box_size=box, optics_group=optics)
    write_particles(str(tmp_path / "p.star"), table)
    table, stack = open_particles(str(tmp_path / "p.star"))
    with stack:
        whole = load_particles(table, stack, FourierGrid(box))
        np.testing.assert_array_equal(whole.noise_group, [1, 0, 0, 1, 2, 0])
        share = table.subset([0, 3])  # only group 7 here; its index among all groups is still 1
        with ParticleStack(share) as share_stack:
            part = load_particles(share, share_stack, FourierGrid(box), optics_groups=np.unique(table.optics_group))
        np.testing.assert_array_equal(part.noise_group, [1, 1])
        with pytest.raises(ValueError, match="optics groups"):
            load_particles(table, stack, FourierGrid(box), optics_groups=[3, 7])
    args = build_parser().parse_args(["reconstruct", "p.star", "--out", "m.mrc"])
    assert args.noise_model == "estimate"
    assert build_parser().parse_args(["reconstruct", "p.star", "--out", "m.mrc", "--noise-model", "white"]
                                     ).noise_model == "white"
