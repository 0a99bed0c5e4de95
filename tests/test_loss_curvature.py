"""The loss and the curvature toolkit against dense references at tiny size (float64 inside
``jax.enable_x64``): check_grads, HVPs vs jax.hessian, exact and Hutchinson diagonals."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import make_particles, make_problem, random_pairs
from jaxcryo.curvature import batch_exact_diagonal, exact_diagonal, hutchinson_diagonal, hvp
from jaxcryo.geometry import half_volume_weights
from jaxcryo.loss import forward, loss, per_image_loss, subset, value_grad_hvp

SHELLS = (1.0, 2.0, 0.5, 1.5)
# One compile per configuration instead of one per primitive (eager dispatch is slow on CPU).
_loss = jax.jit(loss, static_argnames="problem")
_per_image_loss = jax.jit(per_image_loss, static_argnames="problem")
_value_grad_hvp = jax.jit(value_grad_hvp, static_argnames="problem")
_value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnames="problem")
_hvp = jax.jit(lambda params, z, batch, problem: hvp(loss, params, z, batch, problem), static_argnames="problem")
_batch_exact_diagonal = jax.jit(batch_exact_diagonal, static_argnames=("problem", "dtype"))


@functools.partial(jax.jit, static_argnames="problem")
def _dense_hessian(params, batch, problem):
    shape = params.shape
    return jax.hessian(lambda f: loss(f.reshape(shape), batch, problem))(params.ravel())


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("interpolation", ["nearest", "trilinear"])
def test_check_grads_forward_and_loss_wrt_volume(rng, interpolation):
    """Both slicings are linear in the volume: derivatives of any order must match differences."""
    with jax.enable_x64(True):
        problem = make_problem(6, interpolation, lam=0.1, shell_weights=SHELLS)
        batch = make_particles(rng, problem, 2, dtype=np.float64)
        params = random_pairs(rng, problem.grid.volume_shape + (2,), np.float64)
        check_grads(jax.jit(lambda v: forward(v, batch, problem)), (params,), order=1, modes=("fwd", "rev"))
        check_grads(jax.jit(lambda v: loss(v, batch, problem)), (params,), order=2, modes=("fwd", "rev"))


def test_check_grads_nufft_wrt_volume(rng):
    pytest.importorskip("jax_finufft")
    with jax.enable_x64(True):
        problem = make_problem(6, "nufft")
        batch = make_particles(rng, problem, 2, dtype=np.float64)
        params = random_pairs(rng, problem.grid.volume_shape + (2,), np.float64)
        check_grads(lambda v: loss(v, batch, problem), (params,), order=1, modes=("fwd", "rev"))


def test_check_grads_trilinear_wrt_pose(rng):
    """Trilinear slices are piecewise smooth in the pose; a tiny step stays inside one cell."""
    with jax.enable_x64(True):
        problem = make_problem(6, "trilinear")
        batch = make_particles(rng, problem, 2, dtype=np.float64)
        params = random_pairs(rng, problem.grid.volume_shape + (2,), np.float64)
        check_grads(jax.jit(lambda r: forward(params, batch._replace(rotations=r), problem)), (batch.rotations,),
                    order=1, modes=("fwd", "rev"), eps=1e-6)


def test_zero_weight_rows_do_not_count(rng):
    problem = make_problem(6, "trilinear", lam=0.05)
    batch = make_particles(rng, problem, 3, pad=2)
    params = random_pairs(rng, problem.grid.volume_shape + (2,))
    real = subset(batch, jnp.arange(3))
    np.testing.assert_allclose(_loss(params, batch, problem), _loss(params, real, problem), rtol=1e-6)
    padded = subset(batch, jnp.array([0, 1, 2, -1]))
    assert float(padded.weight[-1]) == 0.0
    np.testing.assert_allclose(_loss(params, padded, problem), _loss(params, real, problem), rtol=1e-6)
    mean_data = float(jnp.mean(_per_image_loss(params, real, problem)))
    # the prior weighs each stored voxel by its Hermitian multiplicity / 2 (test_tikhonov_...)
    half = 0.5 * half_volume_weights(6)[..., None]
    np.testing.assert_allclose(float(_loss(params, real, problem)) - 0.05 * float(jnp.sum(half * params ** 2)),
                               mean_data, rtol=1e-5)


def test_tikhonov_term_is_half_the_full_spectrum_norm(rng):
    """lam * (1/2) sum over the full N^3 Hermitian spectrum of |v_k|^2: every stored voxel with
    0 < kx < N/2 stands for two voxels, the kx = 0 and kx = N/2 planes for one. Brute force by
    expanding the half-volume to the full spectrum (even and odd boxes)."""
    from jaxcryo.forward.slicing import hermitian_symmetrize
    for box in (6, 7):
        problem = make_problem(box, "trilinear", lam=0.3)
        params = random_pairs(rng, problem.grid.volume_shape + (2,), np.float32)
        vft = np.asarray(hermitian_symmetrize(params[..., 0] + 1j * params[..., 1]))  # stored half, made Hermitian
        full = np.fft.fftn(np.fft.irfftn(vft, s=(box,) * 3, axes=(0, 1, 2)))  # the full spectrum it represents
        want = 0.3 * 0.5 * np.sum(np.abs(full) ** 2)
        sym = jnp.stack([vft.real, vft.imag], -1).astype(jnp.float32)
        got = float(jnp.sum(problem.regularizer() * sym * sym))
        np.testing.assert_allclose(got, want, rtol=1e-5)
        # data and prior in the same ratio on every plane: kx = 0 voxels get half of lam
        reg = np.asarray(problem.regularizer())[..., 0]
        assert np.allclose(reg[..., 0], 0.15) and np.allclose(reg[..., 1], 0.3)
        assert np.allclose(reg[..., -1], 0.15 if box % 2 == 0 else 0.3)


# ---------------------------------------------------------------- HVPs


@pytest.mark.parametrize("interpolation", ["nearest", "trilinear"])
def test_hvp_and_fused_value_grad_hvp_match_dense_hessian(rng, interpolation):
    with jax.enable_x64(True):
        problem = make_problem(6, interpolation, lam=0.03, shell_weights=SHELLS)
        batch = make_particles(rng, problem, 3, dtype=np.float64, pad=1)
        params = random_pairs(rng, problem.grid.volume_shape + (2,), np.float64)
        dense = _dense_hessian(params, batch, problem)
        probes = random_pairs(rng, (3,) + params.shape, np.float64)
        want = np.stack([dense @ np.ravel(z) for z in probes])

        got = np.stack([np.ravel(_hvp(params, z, batch, problem)) for z in probes])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

        value, grad, hvps = _value_grad_hvp(params, batch, problem, probes)
        np.testing.assert_allclose(hvps.reshape(3, -1), want, rtol=1e-10, atol=1e-12)
        ref_value, ref_grad = _value_and_grad(params, batch, problem)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-13)
        no_probes = _value_grad_hvp(params, batch, problem)
        assert no_probes[2] is None
        np.testing.assert_allclose(no_probes[1], ref_grad, rtol=1e-10, atol=1e-13)


def test_value_grad_hvp_float32_matches_autodiff(rng):
    problem = make_problem(8, "trilinear", lam=0.01)
    batch = make_particles(rng, problem, 4)
    params = random_pairs(rng, problem.grid.volume_shape + (2,))
    z = random_pairs(rng, (1,) + params.shape)
    value, grad, hvps = _value_grad_hvp(params, batch, problem, z)
    assert value.dtype == grad.dtype == hvps.dtype == jnp.float32
    ref_value, ref_grad = _value_and_grad(params, batch, problem)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(hvps[0], _hvp(params, z[0], batch, problem), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- diagonals


@pytest.mark.parametrize("interpolation", ["nearest", "trilinear"])
def test_batch_exact_diagonal_is_the_hessian_diagonal(rng, interpolation):
    with jax.enable_x64(True):
        problem = make_problem(6, interpolation, lam=0.02, shell_weights=SHELLS)
        batch = make_particles(rng, problem, 4, dtype=np.float64, pad=1)
        params = jnp.zeros(problem.grid.volume_shape + (2,), jnp.float64)
        dense = np.asarray(_dense_hessian(params, batch, problem))
        diag = np.asarray(_batch_exact_diagonal(batch, problem, jnp.float64)).ravel()
        np.testing.assert_allclose(diag, np.diag(dense), rtol=1e-10, atol=1e-14)
        if interpolation == "nearest":  # nearest slicing makes the Hessian diagonal
            np.testing.assert_allclose(diag, dense @ np.ones(len(diag)), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(dense, np.diag(np.diag(dense)), atol=1e-14)
        else:
            assert np.abs(dense - np.diag(np.diag(dense))).max() > 1e-3  # trilinear couples voxels


def test_hutchinson_mean_is_unbiased_within_its_error(rng):
    """z * Hz has mean H_ii and variance sum_{j != i} H_ij^2 (Rademacher z): check the z-scores of
    the k-probe mean against the exact standard error, elementwise and in aggregate, and the
    returned standard error against the exact one."""
    n_probes = 256
    with jax.enable_x64(True):
        problem = make_problem(6, "trilinear", lam=0.0)
        batch = make_particles(rng, problem, 3, dtype=np.float64)
        params = jnp.zeros(problem.grid.volume_shape + (2,), jnp.float64)
        dense = np.asarray(_dense_hessian(params, batch, problem))
        estimate = jax.jit(lambda key: hutchinson_diagonal(lambda z: hvp(loss, params, z, batch, problem), key,
                                                           params, n_probes, chunk=32))
        mean, sem = estimate(jax.random.PRNGKey(3))
    mean, sem = np.ravel(mean), np.ravel(sem)
    true_sem = np.sqrt((dense ** 2).sum(1) - np.diag(dense) ** 2) / np.sqrt(n_probes)
    coupled = true_sem > 1e-12 * np.abs(dense).max()
    assert coupled.sum() > 50
    np.testing.assert_allclose(mean[~coupled], np.diag(dense)[~coupled], atol=1e-12)
    z = (mean - np.diag(dense))[coupled] / true_sem[coupled]
    assert np.abs(z).max() < 4.5
    assert 0.6 < np.mean(z ** 2) < 1.5
    ratio = sem[coupled] / true_sem[coupled]
    assert 0.8 < np.median(ratio) < 1.2


def test_exact_diagonal_over_a_dataset_is_the_weighted_batch_average(rng):
    problem = make_problem(8, "trilinear", lam=0.1)
    particles = make_particles(rng, problem, 7, pad=1)
    whole = _batch_exact_diagonal(particles, problem)
    chunked = exact_diagonal(particles, problem, batch_size=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-7)
    total = float(particles.weight.sum())
    manual = 0.0
    prior = 2.0 * problem.regularizer()  # 2 lam m_k / 2 per voxel (multiplicity-weighted Tikhonov)
    for start in range(0, 8, 3):
        b = subset(particles, jnp.arange(start, min(start + 3, 8)))
        manual = manual + float(b.weight.sum()) / total * (_batch_exact_diagonal(b, problem) - prior)
    np.testing.assert_allclose(chunked, manual + prior, rtol=1e-5, atol=1e-7)


def test_exact_diagonal_rejects_nufft():
    problem = make_problem(6, "nufft")
    with pytest.raises(ValueError, match="hutchinson"):
        batch_exact_diagonal(make_particles(np.random.default_rng(0), problem, 1), problem)
