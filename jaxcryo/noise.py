"""The noise model: sigma^2 per Fourier shell and noise group, estimated from residuals.

Real noise is coloured (its power changes with frequency) and differs between optics groups.
Under a Gaussian model with E|n_p|^2 = sigma^2_g(shell(p)) for each Fourier pixel of an image
of noise group g, the negative log-likelihood is the loss with pixel weights
s_gp = 1 / sigma^2_g(shell(p)) (``Problem.shell_weights``, one tuple per group).

sigma^2 is estimated as RELION re-estimates it: the mean over images and over the pixels of
a shell of the residual power |y - c A v|^2 at the current map. Where the map is still
poor, the residual also holds the part of the signal the map misses, so the estimate is
made after an epoch or more (see :func:`jaxcryo.reconstruct.reconstruct`'s ``noise_after``).

Example:
    >>> power, pixels = residual_power(params, particles, problem, n_groups=2)  # doctest: +SKIP
    >>> weights = shell_weights_from_sigma2(power / pixels, problem.grid,
    ...                                     group_counts=pixels.sum(1) / problem.grid.n_pixels)  # doctest: +SKIP
    >>> problem = with_noise_weights(problem, weights)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward.model import Particles
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.loss import Problem, forward, sum_over_batches

NOISE_MODELS = ("estimate", "white")

__all__ = ["NOISE_MODELS", "pixel_shells", "n_noise_groups", "residual_power", "estimate_noise",
           "shell_weights_from_sigma2",
           "noise_moved", "with_noise_weights"]


def pixel_shells(grid: FourierGrid) -> np.ndarray:
    """(P,) Fourier shell round(|k|) of each of the grid's pixels; shells 0 .. grid.radius."""
    return np.rint(np.linalg.norm(grid.freqs, axis=-1)).astype(np.int32)


def n_noise_groups(particles: Particles) -> int:
    """How many noise groups a particle set uses: max(``noise_group``) + 1, or 1 when None."""
    group = particles.noise_group
    return 1 if group is None else int(np.max(np.asarray(group), initial=0)) + 1


def residual_power(params, particles: Particles, problem: Problem, *, n_groups: int = 1,
                   batch_size: int = 256):
    """Sums of the residual power per noise group and shell over a particle set (jit-able).

    Args:
      params: (N, N, N//2+1, 2) map pairs.
      particles: the images (their ``noise_group``, or group 0 when None; rows with weight 0,
        i.e. padding, do not count).
      n_groups: G, the number of noise groups (static).
    Returns:
      (power, pixels), both (G, n_shells) with n_shells = grid.radius + 1: power[g, s] the sum
      over images of group g (times their weight) of m_p |c A v - y|^2 over the pixels p of
      shell s (m_p the Hermitian multiplicity: the full spectrum's sum), and pixels[g, s] the
      weighted number of such pixels (also counted m_p times). sigma^2 = power / pixels. Sums
      add over half-sets and devices, so pool them before dividing. The loss's data term with
      weights s (G, S) is linear in them: sum(s * power) / (images).
    """
    grid = problem.grid
    dtype = params.dtype
    n_shells = grid.radius + 1
    in_shell = jnp.asarray(np.eye(n_shells)[pixel_shells(grid)] * grid.multiplicity[:, None], dtype)  # (P, S)
    per_shell = jnp.sum(in_shell, axis=0)

    def one(batch):
        r = forward(params, batch, problem) - batch.data
        power = jnp.sum(r * r, axis=-1)  # (B, P): |residual|^2 of each complex pixel
        group = jnp.zeros(power.shape[0], jnp.int32) if batch.noise_group is None else batch.noise_group
        member = jax.nn.one_hot(group, n_groups, dtype=dtype) * batch.weight.astype(dtype)[:, None]  # (B, G)
        return member.T @ power @ in_shell, jnp.sum(member, axis=0)[:, None] * per_shell[None]

    zero = jnp.zeros((n_groups, n_shells), dtype)
    return sum_over_batches(one, particles, batch_size, (zero, zero))


def estimate_noise(params, particles: Particles, problem: Problem, *, n_groups: int = 1, batch_size: int = 256):
    """sigma^2 (G, n_shells) of each noise group and shell: the mean residual power
    |c A v - y|^2 of its pixels at the map ``params`` (NaN where a group has no images)."""
    power, pixels = residual_power(params, particles, problem, n_groups=n_groups, batch_size=batch_size)
    return jnp.where(pixels > 0, power / jnp.maximum(pixels, 1e-30), jnp.nan)


def sigma2_from_sums(power, pixels, *, pool_empty: bool = False) -> np.ndarray:
    """sigma^2 (G, S) from residual sums (G, S) of :func:`residual_power` (pooled over half-sets
    and devices first): power / pixels, and where a group has no pixels in a shell NaN, or with
    ``pool_empty`` the pooled spectrum of the other groups (what a pose search needs: a value
    for every pixel)."""
    power, pixels = np.asarray(power, np.float64), np.asarray(pixels, np.float64)
    fill = power.sum(0) / np.maximum(pixels.sum(0), 1e-30) if pool_empty else np.full(power.shape[1:], np.nan)
    return np.where(pixels > 0, power / np.maximum(pixels, 1e-30), fill[None])


def shell_weights_from_sigma2(sigma2, grid: FourierGrid, *, group_counts=None, floor: float = 1e-3) -> np.ndarray:
    """Loss weights (G, n_shells) from noise powers: 1/sigma^2, floored and normalised.

    Args:
      sigma2: (G, S) or (S,) noise power per group and shell (NaN or <= 0 where unknown).
      grid: the problem's grid (its pixels and multiplicities set the normalisation).
      group_counts: (G,) images per group (default equal); groups with none get the
        count-weighted mean spectrum of the others.
      floor: sigma^2 below ``floor`` times the group's median is raised to it (a shell with
        almost no noise must not take all the weight).
    Returns:
      float64 (G, S): 1/sigma^2 scaled so that its mean over all the pixels of all the images
      (with multiplicity) is 1; white noise gives ones, so lam and step sizes keep their meaning.
      Unknown shells take the value of the nearest known one.
    """
    s2 = np.array(sigma2, np.float64, ndmin=2)
    g, n_shells = s2.shape
    counts = np.ones(g) if group_counts is None else np.asarray(group_counts, np.float64).reshape(g)
    known = np.isfinite(s2) & (s2 > 0)
    empty = ~known.any(axis=1) | (counts <= 0)
    if empty.all():
        return np.ones((g, n_shells))
    idx = np.arange(n_shells)
    for j in np.flatnonzero(~empty):
        s2[j] = np.interp(idx, idx[known[j]], s2[j, known[j]])
        s2[j] = np.maximum(s2[j], floor * np.median(s2[j]))
    if empty.any():
        fill = np.average(s2[~empty], axis=0, weights=np.maximum(counts[~empty], 1e-12))
        s2[empty] = fill
        counts = np.where(empty, 0.0, counts)
    w = 1.0 / s2
    shells = pixel_shells(grid)
    per_shell = np.bincount(np.minimum(shells, n_shells - 1), weights=grid.multiplicity, minlength=n_shells)
    mean = float(np.sum(counts[:, None] * per_shell[None] * w) / (counts.sum() * per_shell.sum()))
    return w / mean


def noise_moved(old_sigma2, sigma2, tol: float) -> bool:
    """Whether a new estimate differs from the one in use (None: none yet) by more than ``tol``
    (relative) in some shell of some group."""
    if old_sigma2 is None:
        return True
    with np.errstate(divide="ignore", invalid="ignore"):
        moved = np.abs(np.asarray(sigma2, np.float64) / np.asarray(old_sigma2, np.float64) - 1.0)
    return bool(np.nanmax(moved, initial=0.0) > tol)


def with_noise_weights(problem: Problem, weights) -> Problem:
    """``problem`` with noise weights (G, S) (or (S,)) as hashable nested tuples."""
    w = np.asarray(weights, np.float64)
    table = tuple(float(x) for x in w) if w.ndim == 1 else tuple(tuple(float(x) for x in row) for row in w)
    return dataclasses.replace(problem, shell_weights=table)
