"""The compiled reconstruction driver: whole epochs under one jit, half-maps, history.

An epoch is one ``jax.jit``-compiled function: a ``lax.scan`` over shuffled minibatches
(the last one padded with zero-weight rows, so no particle is dropped), ``vmap``-ed over the
two independent half-sets for gold-standard half-maps. It is compiled once, before the first
epoch, and its parameter and optimizer buffers are donated. The particle axis is an ordinary
array axis, so it can be sharded across devices.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcryo import distributed as dist
from jaxcryo.config import Config, resolve
from jaxcryo.curvature import exact_diagonal, rademacher, radial_profile, symmetrize_diagonal
from jaxcryo.forward.model import Particles, ft_to_volume
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.fsc import fsc, resolution
from jaxcryo.geometry import default_alpha, half_volume_weights
from jaxcryo.loss import Problem, batched, data_loss_sum, loss, subset, sum_over_batches, value_grad_hvp
from jaxcryo.noise import (NOISE_MODELS, n_noise_groups, noise_moved, residual_power, shell_weights_from_sigma2,
                           sigma2_from_sums, with_noise_weights)
from jaxcryo.optim import armijo, has_hutchinson, scale_by_hutchinson, seed_hutchinson

METHODS = ("psgd", "psgd-exact", "sgd", "adam", "normal")


class ReconState(NamedTuple):
    """Everything needed to continue a run: epoch done, parameters and optimizer state of each
    half-set (leading axis G = 2, or 1 without halves), PRNG key, history so far."""

    epoch: int
    params: Any
    opt_state: Any
    key: Any
    history: dict


class Reconstruction(NamedTuple):
    """Result of :func:`reconstruct`.

    volume: (N, N, N) map (mean of the half-maps); half_maps: (2, N, N, N) or None;
    params: (G, N, N, N//2+1, 2) Fourier pairs of each half; fsc: half-map FSC per shell
    (None without halves); resolution_angstrom: at FSC 0.143; history: dict of lists
    ``epoch``, ``loss`` (the objective), ``data_loss`` and ``prior`` (its two terms; the prior
    changes when the Wiener prior switches on), ``seconds``, plus ``compile_seconds``, and
    when estimated ``noise_sigma2`` (G x n_shells, per noise group and Fourier shell) and
    ``noise_weights`` (the loss's weights from it); state: the final ReconState.
    """

    volume: np.ndarray
    half_maps: np.ndarray | None
    params: Any
    fsc: np.ndarray | None
    resolution_angstrom: float | None
    history: dict
    state: ReconState


def make_optimizer(method: str, *, box: int, r_max: int | None = None, beta: float = 0.9,
                   alpha: float | None = None, n_probes: int = 1, initial_step: float = 10.0,
                   c: float = 0.9, learning_rate: float | None = None, warmup: int = 0,
                   increase_factor: float = 2.0, seed: int = 0):
    """The optax transform behind each named method (all but adam use an Armijo search).

    psgd: Hutchinson diagonal (Algorithm 1); psgd-exact: the same transform fed the exact
    full-data diagonal; sgd: the plain gradient; adam: optax.adam(learning_rate or 1e-2).
    The Armijo search starts from twice the last accepted step (capped at ``initial_step``)
    rather than at ``initial_step`` every time: the same steps are accepted (measured) with
    a third fewer loss evaluations per epoch.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or an optax transform, got {method!r}")
    if method == "adam":
        return optax.adam(1e-2 if learning_rate is None else learning_rate)
    steps = [optax.scale(-1.0)]
    if learning_rate is None:
        steps.append(armijo(initial_step=initial_step, c=c, increase_factor=increase_factor))
    else:
        steps.append(optax.scale(learning_rate))
    if method in ("psgd", "psgd-exact"):
        alpha = default_alpha(box, r_max) if alpha is None else alpha
        steps.insert(0, scale_by_hutchinson(beta=beta if method == "psgd" else 0.0, alpha=alpha,
                                            n_probes=n_probes, warmup=warmup if method == "psgd" else 0,
                                            seed=seed))
    return optax.chain(*steps)


_split_halves = dist.split_halves  # the half-set split lives below the driver (distributed.py)
half_sets = dist.half_sets


def _stack_groups(particles: Particles, groups):
    """Stack the half-sets along a new leading axis (padding rows get weight 0)."""
    parts = [subset(particles, jnp.asarray(g)) for g in groups]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def make_epoch(problem: Problem, tx, *, batch_size: int, n_probes: int, exact: bool,
               axis_name: str | None = None, n_rows: int | None = None, n_devices: int = 1,
               average: bool = False, pose_stage: Callable | None = None, blocks: bool = False):
    """The epoch function for one half-set: (params, opt_state, key, particles[, diag]) ->
    (params, opt_state, key, batch losses). Pure; the caller vmaps and jits it.

    Every minibatch step is two stages: the pose stage, then the volume step (gradient,
    Hessian-vector products and the optax transform) on the batch the pose stage returns.
    ``pose_stage`` None is the identity (known poses: the batch as it is). Otherwise it is
    ``pose_stage(params, batch, pose_rows, key, pose_args) -> (expanded_batch, new_pose_rows)``
    with ``pose_rows`` the batch's rows of a per-particle pose state (any pytree with leading
    axis n, e.g. :class:`jaxcryo.refine.PoseState`) and ``pose_args`` dynamic settings shared by
    the epoch; the epoch then takes ``pose_state`` and ``pose_args`` as two more arguments,
    scatters the new rows back (padding rows are dropped), and returns the pose state last.
    A ``pose_args["regularizer"]`` (scalar or (N, N, H, 1)) replaces the problem's Tikhonov
    weights, so that a schedule can change the Wiener prior between epochs without recompiling.
    The expanded batch may have more rows than the minibatch (e.g. B x K candidate poses whose
    weights are the particle weight times the posterior): the loss normalises by its total weight.

    With ``axis_name`` it runs inside ``shard_map`` (see :mod:`jaxcryo.distributed`):
    ``particles`` is this device's block of rows, ``n_rows`` the half-set's row count before
    device padding and ``n_devices`` the mesh size. The minibatches are the same rows as on one
    device; each device computes on an equal slice of each and the sums are psum-ed. A pose
    stage then runs on each device's slice of the batch (the pose state is replicated: each
    device reads its rows of it, and the new rows of all devices are gathered back).

    With ``average`` the epoch ends at the mean of its iterates from the fraction
    ``average_from`` of its steps on (Polyak-Ruppert averaging restarted every epoch): it
    removes most of the minibatch noise that a constant step leaves. The driver averages the
    whole of every epoch but the first, whose first half (far from the optimum, and the
    curvature warm-up) would drag the mean back toward the start.

    With ``blocks`` the function sweeps one block of an epoch (the driver's in-memory set is one
    block; a streamed set is several, see :func:`reconstruct`) and carries the running mean
    across blocks: ``block(params, opt_state, key, particles, diag, start, step0, mean[,
    pose_state, pose_args]) -> (params, opt_state, key, batch losses, mean[, pose_state])``,
    ``step0`` the epoch's step index at the block's first minibatch, ``start`` the step from
    which iterates are averaged, ``mean`` their running mean so far (zeros at the epoch's
    start); ``params`` stays the last iterate. One block with ``step0 = 0`` and ``start =
    floor(average_from x steps)`` is the epoch, exactly.
    """

    def terms(params, batch, probes, reg=None):
        if axis_name is not None:
            return dist.value_grad_hvp_psum(params, batch, problem, probes, axis_name, regularizer=reg)
        if reg is not None:  # dynamic Tikhonov weights (pose-stage runs)
            data = problem.data_only()
            value, grad, hvps = value_grad_hvp(params, batch, data, probes)
            value = value + jnp.sum(reg * params * params)
            grad = grad + 2.0 * reg * params
            hvps = None if hvps is None else hvps + 2.0 * reg * probes
            return value, grad, hvps, lambda p: loss(p, batch, data) + jnp.sum(reg * p * p)
        value, grad, hvps = value_grad_hvp(params, batch, problem, probes)
        return value, grad, hvps, lambda p: loss(p, batch, problem)

    def take(particles, index):
        return subset(particles, index) if axis_name is None else dist.gather_batch(particles, index, axis_name)

    def poses_of_batch(params, batch, index, pose_state, pose_args, key):
        """Stage 1: the pose stage on this device's rows of the batch; the new rows scattered
        into the (replicated) pose state."""
        rows = jax.tree.map(lambda x: x[jnp.maximum(index, 0)], pose_state)
        if axis_name is not None:  # this device's slice of the batch, as gather_batch hands it out
            per = index.shape[0] // n_devices
            at = jax.lax.axis_index(axis_name) * per
            rows = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, at, per, 0), rows)
        batch, new_rows = pose_stage(params, batch, rows, key, pose_args)
        if axis_name is not None:
            new_rows = jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, axis=0, tiled=True), new_rows)
        n_state = jax.tree.leaves(pose_state)[0].shape[0]
        where = jnp.where(index >= 0, index, n_state)  # padding rows: out of bounds, dropped
        pose_state = jax.tree.map(lambda s, r: s.at[where].set(r.astype(s.dtype), mode="drop"),
                                  pose_state, new_rows)
        return batch, pose_state

    def step(carry, index, particles, diag, start, poses=None):
        (params, opt_state, key), (mean, count) = carry[:2]
        key, probe_key = jax.random.split(key)
        extra = {}
        probes = rademacher(probe_key, params, n_probes) if (n_probes and not exact) else None
        batch = take(particles, index)
        if pose_stage is not None:
            key, pose_key = jax.random.split(key)
            batch, pose_state = poses_of_batch(params, batch, index, carry[2], poses, pose_key)
        reg = None if (pose_stage is None or not isinstance(poses, dict)) else poses.get("regularizer")
        value, grad, hvps, value_fn = terms(params, batch, probes, reg)
        if exact:
            extra["diag_sample"] = diag
        elif probes is not None:
            extra["diag_sample"] = symmetrize_diagonal(jnp.mean(probes * hvps, axis=0), problem)
        updates, opt_state = tx.update(grad, opt_state, params, value=value, grad=grad,
                                       value_fn=value_fn, **extra)
        params = optax.apply_updates(params, updates)
        if average:  # running mean of the iterates from step `start` on
            k = jnp.maximum(count - start + 1, 1).astype(params.dtype)
            mean = jnp.where(count >= start, mean + (params - mean) / k, mean)
        if pose_stage is not None:
            return ((params, opt_state, key), (mean, count + 1), pose_state), value
        return ((params, opt_state, key), (mean, count + 1)), value

    def block(params, opt_state, key, particles, diag, start, step0, mean, pose_state=None, pose_args=None):
        n = particles.weight.shape[0] if n_rows is None else n_rows
        key, perm_key = jax.random.split(key)
        order = batched(jax.random.permutation(perm_key, n), batch_size)
        if n_devices > 1:  # equal slices per device: pad each batch with zero-weight rows
            order = jnp.pad(order, ((0, 0), (0, -batch_size % n_devices)), constant_values=-1)
        if not average:
            mean = jnp.zeros((), params.dtype)
        start = jnp.asarray(start, jnp.int32)
        count = jnp.asarray(step0, jnp.int32)
        carry = ((params, opt_state, key), (mean, count))
        if pose_stage is not None:
            carry = carry + (pose_state,)
        carry, values = jax.lax.scan(lambda c, i: step(c, i, particles, diag, start, pose_args), carry, order)
        (params, opt_state, key), (mean, _) = carry[:2]
        out = (params, opt_state, key, values, mean if average else params)
        return out + (carry[2],) if pose_stage is not None else out

    def epoch(params, opt_state, key, particles, diag=None, average_from=0.0, pose_state=None, pose_args=None):
        n = particles.weight.shape[0] if n_rows is None else n_rows
        start = jnp.floor(average_from * (-(-n // batch_size))).astype(jnp.int32)
        mean = jnp.zeros_like(params) if average else None
        out = block(params, opt_state, key, particles, diag, start, 0, mean, pose_state, pose_args)
        return (out[4],) + out[1:4] + out[5:]

    return block if blocks else epoch


def steps_per_block(rows: int, batch_size: int) -> int:
    """Minibatch steps of one block of ``rows`` rows per half-set (the last batch padded)."""
    return -(-int(rows) // int(batch_size))


def make_full_loss(problem: Problem, batch_size: int, axis_name: str | None = None):
    """Full-data objective of one half-set (a scan over fixed batches; same for every method).

    With ``axis_name`` (inside shard_map) ``particles`` is this device's block of rows.
    """

    def full_loss(params, particles):
        total, weight = data_loss_sum(params, particles, problem, batch_size)
        if axis_name is not None:  # partial sums over this device's rows
            total, weight = jax.lax.psum((total, weight), axis_name)
        return total / jnp.maximum(weight, 1e-12) + jnp.sum(problem.regularizer(params.dtype) * params * params)

    return full_loss


def map_groups(fn, interpolation: str, in_axes=0):
    """``jax.vmap`` over the half-set axis, or, for ``nufft``, a ``lax.map`` with the same
    signature: jax-finufft's batching rule does not run under this JAX (``batching.not_mapped``
    is gone), and the half-sets are independent, so mapping them one after the other is exact."""
    if interpolation != "nufft":
        return jax.vmap(fn, in_axes=in_axes)

    def mapped(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)

        def one(xs):
            it = iter(xs)
            return fn(*[next(it) if ax == 0 else a for a, ax in zip(args, axes)])

        return jax.lax.map(one, tuple(a for a, ax in zip(args, axes) if ax == 0))

    return mapped


def group_functions(problem: Problem, tx, *, batch_size: int, n_probes: int, exact: bool,
                    mesh=None, n_rows: int | None = None, average: bool = False,
                    pose_stage: Callable | None = None, blocks: bool = False):
    """(epoch, full_loss) over all half-sets (leading axis G), not yet jitted.

    epoch(params, opt_state, keys, stacked, diag, average_from) and full_loss(params, stacked)
    (with ``pose_stage``, see :func:`make_epoch`: epoch(..., average_from, pose_state, pose_args),
    pose_state with leading axis G, pose_args shared by the half-sets; with ``blocks``:
    block(params, opt_state, keys, stacked, diag, start, step0, mean[, pose_state, pose_args]))
    take ``stacked`` from ``_stack_groups`` (mesh None) or :func:`jaxcryo.distributed.shard_groups`
    (a mesh: rows sharded, ``n_rows`` the half-sets' length before device padding; params,
    optimizer state, keys and the pose state replicated, e.g. by
    :func:`jaxcryo.distributed.replicate`).
    """
    over_groups = lambda fn, in_axes=0: map_groups(fn, problem.interpolation, in_axes)  # noqa: E731
    axes = (0, 0, 0, 0, 0, None, None, 0) if blocks else (0, 0, 0, 0, 0, None)
    if pose_stage is not None:
        axes = axes + (0, None)
    kw = dict(batch_size=batch_size, n_probes=n_probes, exact=exact, average=average, pose_stage=pose_stage,
              blocks=blocks)
    if mesh is None:
        return (over_groups(make_epoch(problem, tx, **kw), axes), over_groups(make_full_loss(problem, batch_size)))
    rows, rep = dist.P(None, dist.AXIS), dist.P()
    specs = tuple(rows if i == 3 else rep for i in range(len(axes)))
    epoch = dist.shard(over_groups(make_epoch(problem, tx, axis_name=dist.AXIS, n_rows=n_rows,
                                              n_devices=dist.n_devices(mesh), **kw), axes),
                       mesh, in_specs=specs, out_specs=rep)
    full_loss = dist.shard(over_groups(make_full_loss(problem, batch_size, dist.AXIS)), mesh,
                           in_specs=(rep, rows), out_specs=rep)
    return epoch, full_loss


def wiener_shell_lam(fsc_curve, diag, box: int, *, r_max: int | None = None, fudge: float = 1.0):
    """Per-shell Tikhonov weights of a Wiener filter from a half-map FSC.

    For one half-set the data curvature of voxel k is diag(H)_k = 2 sum_i m c_i^2 / n; its
    estimate has SNR_half = FSC / (1 - FSC), so the Wiener (MAP) weight is
    lam_k = (diag(H)_k / 2) / SNR_half. Returned per shell index 0 .. len(fsc)-1 from the
    shell means of ``diag`` ((G, N, N, H, 2) or (N, N, H, 2); half-sets averaged); ``fudge``
    scales the SNR as RELION's tau2_fudge does.
    """
    d = np.asarray(diag)
    d = d.mean(0) if d.ndim == 5 else d
    # in interior-voxel units: Problem.regularizer weighs shell_lam by the multiplicity m_k / 2
    d = d / (0.5 * half_volume_weights(box))[..., None]
    mean_diag = radial_profile(d, box, "mean")[: len(fsc_curve)]
    f = np.clip(np.asarray(fsc_curve, np.float64), 1e-3, 0.999)
    snr = fudge * f / (1.0 - f)
    lam = 0.5 * np.nan_to_num(mean_diag) / snr
    r_max = box // 2 - 1 if r_max is None else r_max
    lam[r_max + 1:] = lam[min(r_max, len(lam) - 1)]
    lam[0] = 0.0  # never damp the mean density
    return lam


def finish(state: ReconState, interpolation: str, pixel_size_angstrom: float) -> Reconstruction:
    """The Reconstruction of a final state: gridding-corrected maps, and with two half-sets
    their mean, FSC and resolution at 0.143."""
    params = state.params
    maps = np.asarray(jax.vmap(lambda v: ft_to_volume(v, interpolation))(params))
    if maps.shape[0] == 2:
        curve = fsc(maps[0], maps[1])
        res = resolution(curve, pixel_size_angstrom)
        return Reconstruction(maps.mean(0), maps, params, curve, res, state.history, state)
    return Reconstruction(maps[0], None, params, None, None, state.history, state)


class ParticleBlocks:
    """A particle set the driver reads in blocks (the interface :func:`reconstruct` accepts in
    place of in-memory Particles; :class:`InMemoryBlocks` and
    :class:`jaxcryo.pipeline.StreamedBlocks` implement it).

    n_particles: rows of the whole set; n_noise_groups: noise groups (``Particles.noise_group``
    values) in it; dtype: of the Fourier pairs; block_size: images per block, both half-sets
    together (None: the whole set is one block, placed once and kept).
    ``blocks(rows_list, mesh)`` yields, for each (G, c) array of particle rows (-1: padding, weight
    0), those particles stacked as (G, c, ...) Particles (sharded over ``mesh`` when given, as
    :func:`jaxcryo.distributed.shard_groups` places them).
    """

    n_particles: int
    n_noise_groups: int
    dtype: Any
    block_size: int | None = None

    def blocks(self, rows_list, mesh=None):
        raise NotImplementedError


class InMemoryBlocks(ParticleBlocks):
    """Particles in memory as one block (``share``: the rows this process holds, several processes)."""

    def __init__(self, particles: Particles, share: "dist.HostShare | None" = None):
        self.particles, self.share = particles, share
        self.n_particles = particles.weight.shape[0] if share is None else share.n_total
        self.dtype = particles.data.dtype
        self.n_noise_groups = n_noise_groups(particles)

    def blocks(self, rows_list, mesh=None):
        for rows in rows_list:
            yield (_stack_groups(self.particles, rows) if mesh is None
                   else dist.shard_groups(self.particles, rows, mesh, self.share))


class BlockLayout:
    """How the driver cuts each half-set (rows ``groups`` (G, m)) into blocks of at most
    ``block_size`` images (both half-sets together; None: one block). The blocks hold
    ``rows`` = ceil(m / n_blocks) positions each (sizes differ by at most one; the shorter ones
    end with one padding row, as a half-set does), so every block has the same shape and the
    compiled block function serves them all."""

    def __init__(self, groups: np.ndarray, block_size: int | None):
        self.groups = np.asarray(groups)
        g, m = self.groups.shape
        per = m if block_size is None else max(1, int(block_size) // g)
        self.n_blocks = -(-m // per) if per < m else 1
        self.rows = -(-m // self.n_blocks)

    def _cut(self, positions, with_positions: bool = False):
        """(G, m) positions in visiting order -> list of (G, rows) particle rows, -1 padded (with
        ``with_positions``: of (positions in the half-sets, rows) pairs, both -1 padded)."""
        out = []
        for part in np.array_split(np.arange(positions.shape[1]), self.n_blocks):
            pos = np.sort(positions[:, part], axis=1)  # file order within a block: kinder to disks
            rows = np.take_along_axis(self.groups, pos, axis=1)
            pad = ((0, 0), (0, self.rows - rows.shape[1]))
            rows = np.pad(rows, pad, constant_values=-1)
            out.append((np.pad(pos, pad, constant_values=-1), rows) if with_positions else rows)
        return out

    def fixed(self, with_positions: bool = False):
        """The blocks of a statistics pass (the same every time)."""
        g, m = self.groups.shape
        return self._cut(np.broadcast_to(np.arange(m), (g, m)), with_positions)

    def shuffled(self, seed: int, epoch: int, with_positions: bool = False):
        """The blocks of epoch ``epoch``: each half-set's rows in a fresh random order, drawn from
        (seed, epoch) alone, so a resumed run sees the same blocks."""
        g, m = self.groups.shape
        rng = np.random.default_rng([int(seed), int(epoch), 0x6A63])
        return self._cut(np.stack([rng.permutation(m) for _ in range(g)]), with_positions)


def reconstruct(particles: "Particles | ParticleBlocks", config: Config | None = None, *, box: int,
                pixel_size_angstrom: float, shell_lam=None, init_volume_ft=None, resume: ReconState | None = None,
                callback: Callable[[ReconState], Any] | None = None, devices: int | None = None, mesh=None,
                share: "dist.HostShare | None" = None, progress: Callable[[int], Any] | None = None,
                **settings) -> Reconstruction:
    """Reconstruct a map from particles with known poses.

    Args:
      particles: :class:`~jaxcryo.forward.model.Particles` (from ``prepare_particles``), or a
        :class:`ParticleBlocks` source read block by block (e.g. streamed from disk:
        :func:`jaxcryo.pipeline.reconstruct_streaming`). One driver either way: every epoch
        sweeps the blocks (in memory: one) with the same compiled block function, the running
        mean of the iterates carried across blocks; the exact diagonal, noise estimate, Wiener
        prior and loss are sums over the blocks. Each half-set is cut into equal blocks whose
        rows are reshuffled every epoch; with one block the result is the in-memory one.
      config: the run's settings, a frozen :class:`jaxcryo.Config` (default ``Config()``); any
        keyword ``settings`` beside it override its fields (``epochs=3``, ``method="sgd"``, ...).
        The fields reconstruct reads are these:
      box, pixel_size_angstrom: the map's edge (pixels) and voxel size.
      method: 'psgd' (default; Hutchinson-preconditioned SGD, Algorithm 1), 'normal' (the
        normal equations accumulated in one pass and solved by CG: :func:`reconstruct_normal`,
        which uses ``epochs`` as its round cap, ``wiener_after > 0`` as its switch for the Wiener
        prior, and ignores the optimizer settings), 'psgd-exact',
        'sgd', 'adam', or any optax transform (it receives ``value``, ``grad``, ``value_fn``
        and, when ``n_probes`` > 0, ``diag_sample`` = z * Hz as extra args).
      interpolation: 'trilinear' (default), 'nearest' or 'nufft' (CPU only).
      epochs, batch_size: passes over the data and images per step.
      lam: Tikhonov weight. r_max: Fourier radius used (default N//2 - 1).
      halves: reconstruct two random half-sets independently (gold standard), report their
        FSC and resolution, and return their mean as the map.
      n_probes, beta, alpha, learning_rate, initial_step, c, warmup: optimizer settings (see
        :func:`make_optimizer`); ``warmup`` steps (at most a quarter of the first epoch) only
        gather curvature samples (psgd, and only when it has no exact first estimate).
      init_samples: with nearest/trilinear slicing, every Hutchinson estimate (psgd, or one in
        an optax chain) starts from the exact full-data diagonal (one back-projection of squared
        weights x CTF^2, see :func:`jaxcryo.curvature.exact_diagonal`), counted as this many
        samples of the running mean; no warm-up steps then. 0: start from nothing (warm-up).
        c is 0.9 here, 0.99 in the paper: see the README for the measurements behind it and
        behind batch_size 128 (256 converged slower per epoch).
      average: end every epoch at the mean of its iterates (see :func:`make_epoch`).
      shell_lam: a fixed prior per Fourier shell (e.g. :func:`jaxcryo.simulate.oracle_shell_lam`),
        added to lam in the objective (then no Wiener prior is estimated).
      wiener_after: with halves, after this many epochs (0: never) estimate each shell's SNR
        from the half-maps' FSC and add the Wiener prior :func:`wiener_shell_lam` to the
        objective for the remaining epochs (as RELION's refinement regularises, from the
        gold-standard FSC). The loss history then changes objective at that epoch.
      noise_model: 'estimate' (default): after ``noise_after`` epochs, estimate the noise
        power sigma^2 per Fourier shell and per noise group (``particles.noise_group``, e.g.
        the optics group; one group when None) from the residuals of each half-set's images
        at its current map, pooled over the halves (:func:`jaxcryo.noise.residual_power`),
        and weight the loss's pixels by 1/sigma^2 from then on (normalised to mean 1; see
        :func:`jaxcryo.noise.shell_weights_from_sigma2`). As RELION does, it is re-estimated
        after every later epoch (the residual of a map that is still converging also holds
        signal, mostly at low resolution); the model (and the epoch, recompiled) changes only
        when some shell's sigma^2 moved by more than ``noise_tol`` (relative); the loss of an
        epoch is that of the model in force after it. 'white': equal weights.
        Estimated with the Wiener prior's recompilation when both fall on the same epoch
        (the prior then uses the weighted data curvature).
      init_volume_ft: optional starting Fourier pairs (N, N, N//2+1, 2); zeros otherwise.
      resume: a ReconState from an earlier run (e.g. a checkpoint) to continue from.
      callback: called with the ReconState after every epoch.
      devices: how many local devices to spread the particles over (default: all of this
        process's devices; 1 runs the plain single-device path). Results are the same for
        every count, up to float rounding (see :mod:`jaxcryo.distributed`).
      mesh: a ``jax.sharding.Mesh`` from :func:`jaxcryo.distributed.make_mesh` instead of
        ``devices`` (needed for several processes; made automatically when there are).
      share: for several processes, the :class:`~jaxcryo.distributed.HostShare` whose rows
        ``particles`` holds (from :func:`jaxcryo.distributed.host_share`); None when every
        process passes the full set.
      symmetry: point group in RELION's notation ('C1' default, 'C4', 'D2', 'T', 'O', 'I', ...;
        :mod:`jaxcryo.symmetry`): each image is used at its pose composed with every group
        element, so the map is symmetric by construction (as relion_reconstruct --sym). A step
        then costs about G times as much; ValueError for an unknown symbol.
      progress: called with the number of images swept after each block of an epoch.
    """
    cfg = resolve(config, settings)
    (method, interpolation, batch_size, lam, r_max, halves, seed, n_probes, beta, alpha, learning_rate,
     initial_step, c, average, warmup, init_samples, wiener_after, noise_model, noise_after, noise_tol,
     symmetry) = (getattr(cfg, k) for k in (
        "method", "interpolation", "batch_size", "lam", "r_max", "halves", "seed", "n_probes", "beta", "alpha",
        "learning_rate", "initial_step", "c", "average", "warmup", "init_samples", "wiener_after", "noise_model",
        "noise_after", "noise_tol", "symmetry"))
    epochs = cfg.epochs_or(10)
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"noise_model must be one of {NOISE_MODELS}, got {noise_model!r}")
    if isinstance(method, str) and method == "normal":
        return reconstruct_normal(particles, box=box, pixel_size_angstrom=pixel_size_angstrom,
                                  interpolation=interpolation, rounds=epochs, batch_size=batch_size, lam=lam,
                                  r_max=r_max, halves=halves, seed=seed, wiener=wiener_after > 0, resume=resume,
                                  callback=callback, devices=devices, mesh=mesh, share=share, symmetry=symmetry,
                                  noise_model=noise_model, noise_tol=noise_tol)
    grid = FourierGrid(box, r_max)
    problem = Problem(grid=grid, interpolation=interpolation, lam=lam, symmetry=symmetry,
                      shell_lam=None if shell_lam is None else tuple(float(x) for x in shell_lam))
    source = particles if isinstance(particles, ParticleBlocks) else InMemoryBlocks(particles, share)
    dtype = source.dtype
    n_noise = source.n_noise_groups
    if jax.process_count() > 1:  # every process must build the same Problem
        from jax.experimental import multihost_utils
        n_noise = int(np.max(multihost_utils.process_allgather(np.asarray(n_noise))))
    key = jax.random.PRNGKey(seed)
    split_key, key = jax.random.split(key)
    mesh = dist.mesh_for(devices, mesh)  # None on one device: the plain path, no collectives
    groups = _split_halves(split_key, source.n_particles, halves)
    g = groups.shape[0]
    layout = BlockLayout(groups, source.block_size)
    batch_size = int(min(batch_size, layout.rows))
    steps = layout.n_blocks * steps_per_block(layout.rows, batch_size)  # minibatch steps per epoch
    if layout.n_blocks == 1:  # in memory: the one block is placed once and kept
        whole = next(iter(source.blocks([groups], mesh)))
        n_real = int(np.sum(groups >= 0))
        fixed_blocks = lambda: (whole,)  # noqa: E731
        training_blocks = lambda epoch: ((n_real, whole),)  # noqa: E731
    else:  # streamed: every pass reads its blocks again (a fresh shuffle of the rows every epoch)
        whole = None

        def fixed_blocks():
            return source.blocks(layout.fixed(), mesh)

        def training_blocks(epoch):
            order = layout.shuffled(seed, epoch)
            return zip([int(np.sum(r >= 0)) for r in order], source.blocks(order, mesh))
    rows = dist.P(None, dist.AXIS)

    # Warm-up steps (curvature samples only) take at most a quarter of the first epoch; none
    # when the estimate starts from the exact diagonal (one cheap pass for nearest/trilinear).
    seed_exact = init_samples > 0 and interpolation != "nufft"
    warmup = 0 if seed_exact else int(min(warmup, steps // 4))
    if isinstance(method, str):
        tx = make_optimizer(method, box=box, r_max=grid.radius, beta=beta, alpha=alpha, n_probes=n_probes,
                            initial_step=initial_step, c=c, learning_rate=learning_rate, warmup=warmup,
                            seed=seed)
        exact = method == "psgd-exact"
        probes = n_probes if method == "psgd" else 0
    else:
        tx, exact, probes = optax.with_extra_args_support(method), False, n_probes

    def per_block(fn, out_specs=dist.P()):
        """jit of ``fn(params, block) -> sums`` over the half-sets (sums psum-ed over a mesh)."""
        mapped = map_groups(fn, interpolation, (0, 0))
        if mesh is not None:
            mapped = dist.shard(mapped, mesh, in_specs=(dist.P(), rows), out_specs=out_specs)
        return jax.jit(mapped)

    def psum(x):
        return x if mesh is None else jax.lax.psum(x, dist.AXIS)

    def diag_sums(prob):
        """Per block: each half-set's exact data diag(H) (normalised by the block's weight) and that weight."""
        data = prob.data_only()
        if data.interpolation == "nufft":
            data = dataclasses.replace(data, interpolation="nearest")

        def one(_, p):
            w_here = jnp.sum(p.weight.astype(dtype))
            d = exact_diagonal(p, data, int(min(batch_size, p.weight.shape[0])), dtype)
            if mesh is None:
                return d, w_here
            w = psum(w_here)
            return psum(d * w_here) / jnp.maximum(w, 1e-12), w
        return per_block(one)

    def diagonals(prob):
        """Exact full-data diag(H) of each half-set, (G, N, N, H, 2) (nufft: nearest's)."""
        fn, dummy = diag_sums(prob), jnp.zeros((g,), dtype)
        parts = [dist.to_local(fn(dummy, b)) for b in fixed_blocks()]
        if len(parts) == 1:
            d = parts[0][0]
        else:
            w = sum(p[1] for p in parts)
            per_group = lambda x: x.reshape((g,) + (1,) * 4)  # noqa: E731
            d = sum(p[0] * per_group(p[1]) for p in parts) / per_group(jnp.maximum(w, 1e-12))
        d = jnp.asarray(d) + 2.0 * prob.regularizer(dtype)
        return d if mesh is None else dist.replicate(d, mesh)

    def residual_one(p, part):
        # the residual does not depend on the weights or the prior: one compilation serves all epochs
        prob = dataclasses.replace(problem, lam=0.0, shell_weights=None, shell_lam=None)
        return psum(residual_power(p, part, prob, n_groups=n_noise, batch_size=batch_size))

    residual_sums = per_block(residual_one)

    def noise_sigma2(params):
        """sigma^2 (G, S) pooled over the half-sets (each half's images at its own map), the
        images per noise group (G,), the residual power per half-set (H, G, S) with its images
        (H,), and the seconds spent compiling (the first time)."""
        seconds = 0.0
        power_h = pixels_h = 0.0
        for b in fixed_blocks():
            t0 = time.perf_counter()
            power, pixels = dist.to_local(residual_sums(params, b))
            power_h, pixels_h = power_h + np.asarray(power, np.float64), pixels_h + np.asarray(pixels, np.float64)
            if not seconds:
                seconds = time.perf_counter() - t0  # the first block: mostly compilation
        power, pixels = power_h.sum(0), pixels_h.sum(0)
        sigma2 = sigma2_from_sums(power, pixels)
        per_image = grid.multiplicity.sum()
        return sigma2, pixels.sum(1) / per_image, (power_h, pixels_h.sum((1, 2)) / per_image), seconds

    def loss_sums(prob):
        data = prob.data_only()
        return per_block(lambda p, part: psum(data_loss_sum(p, part, data, batch_size)))

    if resume is None:
        init = problem.zeros(dtype) if init_volume_ft is None else jnp.asarray(init_volume_ft, dtype)
        params = jnp.stack([init] * g)
        opt_state = jax.vmap(tx.init)(params)
        history0 = {"epoch": [], "loss": [], "data_loss": [], "prior": [], "seconds": []}
        seed_exact = seed_exact and not exact and has_hutchinson(opt_state)
        if seed_exact:  # timed: counts toward the first epoch's seconds
            t0 = time.perf_counter()
            opt_state = seed_hutchinson(opt_state, jax.block_until_ready(dist.to_local(diagonals(problem))),
                                        init_samples)
            history0["init_seconds"] = time.perf_counter() - t0
        state = ReconState(0, params, opt_state, jax.random.split(key, g), history0)
    else:
        state = resume
    history = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in state.history.items()}
    for k in ("data_loss", "prior"):
        history.setdefault(k, [])
    if noise_model == "estimate" and history.get("noise_weights") is not None:  # resumed after the estimate
        problem = with_noise_weights(problem, history["noise_weights"])
    if history.get("shell_lam") is not None:  # a resumed run that had already set its prior
        problem = dataclasses.replace(problem, shell_lam=tuple(history["shell_lam"]))

    if mesh is not None:  # volume, optimizer state and keys replicated; particle rows sharded
        state = state._replace(params=dist.replicate(state.params, mesh),
                               opt_state=dist.replicate(state.opt_state, mesh), key=dist.replicate(state.key, mesh))
    params, opt_state, keys = state.params, state.opt_state, state.key
    zero = jnp.zeros((), jnp.int32)

    def build(prob, data_diag=None, epoch_too=True):
        """The block function for ``prob``, compiled (before timing) on the first block it sees:
        (run, full-loss sums, diag). ``data_diag``: the data term's diagonal when already computed
        (psgd-exact reuses it). ``epoch_too`` False: only the loss (after the last epoch)."""
        diag = None
        if exact and epoch_too:
            diag = diagonals(prob) if data_diag is None else data_diag + 2.0 * prob.regularizer(dtype)
        fn, _ = group_functions(prob, tx, batch_size=batch_size, n_probes=probes, exact=exact, mesh=mesh,
                                n_rows=layout.rows, average=average, blocks=True)
        jitted = jax.jit(fn, donate_argnums=(0, 1, 7))
        compiled = []

        def run(*args):
            if not compiled:
                t0 = time.perf_counter()
                compiled.append(jitted.lower(*args).compile())
                history["compile_seconds"] += time.perf_counter() - t0
            return compiled[0](*args)

        if epoch_too and whole is not None:  # compile now, before any timing
            mean = jnp.zeros_like(params) if average else None
            t0 = time.perf_counter()
            compiled.append(jitted.lower(params, opt_state, keys, whole, diag, zero, zero, mean).compile())
            history["compile_seconds"] += time.perf_counter() - t0
        return run, loss_sums(prob), diag

    history["compile_seconds"] = 0.0
    run_block, full_loss, diag = build(problem)
    elapsed = history["seconds"][-1] if history["seconds"] else history.get("init_seconds", 0.0)
    for epoch in range(state.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        compiling = history["compile_seconds"]
        start = jnp.asarray(np.floor((0.5 if epoch == 1 else 0.0) * steps), jnp.int32)
        step0 = 0
        mean = jnp.zeros_like(params) if average else None
        for images, block in training_blocks(epoch):
            params, opt_state, keys, _, mean = run_block(params, opt_state, keys, block, diag, start,
                                                         jnp.asarray(step0, jnp.int32), mean)
            step0 += steps_per_block(layout.rows, batch_size)
            if progress is not None:
                progress(images)
        if average:
            params = mean
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - t0 - (history["compile_seconds"] - compiling)
        t0 = time.perf_counter()
        new_noise, residuals = False, None
        if noise_model == "estimate" and epoch >= noise_after:
            # Noise model: residual power per shell and noise group at the current maps (see
            # jaxcryo.noise); the loss weighs each pixel by 1/sigma^2 from now on.
            sigma2, counts, residuals, extra = noise_sigma2(params)
            history["compile_seconds"] += extra
            t0 += extra
            new_noise = noise_moved(history.get("noise_sigma2"), sigma2, noise_tol)
        new_prior = bool(wiener_after and halves and epoch == wiener_after and problem.shell_lam is None)
        if not (new_noise or new_prior):
            elapsed += time.perf_counter() - t0
        else:  # the objective changes: one recompilation for both
            data_diag = None
            if new_noise:
                weights = shell_weights_from_sigma2(sigma2, grid, group_counts=counts)
                problem = with_noise_weights(problem, weights)
                history["noise_sigma2"] = [[float(x) for x in row] for row in sigma2]
                history["noise_weights"] = [[float(x) for x in row] for row in weights]
            if new_prior:
                # Gold-standard prior: the half-maps' FSC gives each shell's SNR; the Wiener weight
                # is the data curvature over that SNR (see wiener_shell_lam).
                local = params if mesh is None else dist.to_local(params)
                halves_now = [np.asarray(ft_to_volume(v, interpolation)) for v in local]
                data_diag = diagonals(problem.data_only())
                shell_lam = wiener_shell_lam(fsc(*halves_now), np.asarray(dist.to_local(data_diag)), box,
                                             r_max=grid.radius)
                problem = dataclasses.replace(problem, shell_lam=tuple(float(x) for x in shell_lam))
                history["shell_lam"] = list(problem.shell_lam)
            if seed_exact and not exact and has_hutchinson(opt_state):  # restart from the new objective's diagonal
                if data_diag is None:
                    data_diag = diagonals(problem.data_only())
                opt_state = seed_hutchinson(opt_state, dist.to_local(data_diag) + 2.0 * problem.regularizer(dtype),
                                            init_samples)
                if mesh is not None:
                    opt_state = dist.replicate(opt_state, mesh)
            state = ReconState(epoch, params, opt_state, keys, history)
            compiling = history["compile_seconds"]
            if epoch < epochs or residuals is None:  # after the last epoch only its loss is needed
                run_block, full_loss, diag = build(problem, data_diag, epoch_too=epoch < epochs)
            elapsed += time.perf_counter() - t0 - (history["compile_seconds"] - compiling)
        reg = problem.regularizer(dtype)
        local = params if mesh is None else dist.to_local(params)
        prior = float(np.mean([float(jnp.sum(reg * p * p)) for p in local]))
        if residuals is None:
            total = weight = 0.0
            for b in fixed_blocks():
                t, w = dist.to_local(full_loss(params, b))
                total, weight = total + np.asarray(t, np.float64), weight + np.asarray(w, np.float64)
            data_value = float(np.mean(total / np.maximum(weight, 1e-12)))
            value = data_value + prior
        else:  # the data term is linear in the noise weights: read it off the residual sums
            power_h, images_h = residuals
            weights = np.asarray(problem.shell_weights, np.float64)
            data_value = float(np.mean(np.sum(weights * power_h, axis=(1, 2)) / np.maximum(images_h, 1e-12)))
            value = data_value + prior
        history["epoch"].append(epoch)
        history["loss"].append(value)
        history["data_loss"].append(data_value)
        history["prior"].append(prior)
        history["seconds"].append(elapsed)
        state = ReconState(epoch, params, opt_state, keys, history)
        if callback is not None:
            callback(state if mesh is None else dist.to_local(state))
    state = ReconState(state.epoch, params, opt_state, keys, history)
    if mesh is not None:
        state = dist.to_local(state)
    return finish(state, interpolation, pixel_size_angstrom)


def least_squares(particles: Particles, problem: Problem, *, iters: int = 100, batch_size: int = 512,
                  diag=None, tol: float = 1e-7):
    """The exact minimiser of the full-data objective by Jacobi-preconditioned conjugate gradients.

    A reference for convergence studies (the optimum every method converges to). ``diag``
    defaults to the exact diagonal (nearest/trilinear) or ones (nufft). Returns (pairs, info)
    with info = {'iters', 'relative_residual'}.
    """
    dtype = particles.data.dtype
    total_w = jnp.maximum(jnp.sum(particles.weight), 1e-12)
    zero = problem.zeros(dtype)
    data = problem.data_only()

    def grad_hvp(params, z):
        def one(b):
            _, g, hz = value_grad_hvp(params, b, data, z[None])
            frac = jnp.sum(b.weight) / total_w
            return frac * g, frac * hz[0]
        g, hz = sum_over_batches(one, particles, batch_size, (zero, zero))
        lam = problem.regularizer(dtype)
        return g + 2 * lam * params, hz + 2 * lam * z

    if diag is None:
        diag = (exact_diagonal(particles, problem, batch_size, dtype) if problem.interpolation != "nufft"
                else jnp.ones_like(zero))
    inv = 1.0 / jnp.maximum(diag, 1e-12 * jnp.max(diag))

    @jax.jit
    def run(diag_inv):
        g0, _ = grad_hvp(zero, zero)
        b = -g0  # H x = b at the optimum (the loss is quadratic, grad(0) = -b)
        r = b
        z = diag_inv * r
        p = z
        rz = jnp.vdot(r, z)
        bnorm = jnp.linalg.norm(b)

        def cond(c):
            return (c[5] < iters) & (jnp.linalg.norm(c[1]) > tol * bnorm)

        def body(c):
            x, r, p, rz, _, k = c
            _, hp = grad_hvp(zero, p)
            a = rz / jnp.vdot(p, hp)
            x, r = x + a * p, r - a * hp
            z = diag_inv * r
            rz_new = jnp.vdot(r, z)
            p = z + (rz_new / rz) * p
            return x, r, p, rz_new, 0, k + 1

        x, r, _, _, _, k = jax.lax.while_loop(cond, body, (zero, r, p, rz, 0, 0))
        return x, k, jnp.linalg.norm(r) / bnorm

    x, k, rel = run(inv)
    return x, {"iters": int(k), "relative_residual": float(rel)}


def reconstruct_normal(particles: "Particles | ParticleBlocks", *, box: int, pixel_size_angstrom: float,
                       interpolation: str = "trilinear", rounds: int = 2, batch_size: int = 256,
                       lam: float = 1e-4, r_max: int | None = None, halves: bool = True, seed: int = 0,
                       wiener: bool = True, cg_iters: int = 50, cg_tol: float = 1e-4,
                       resume: ReconState | None = None, callback: Callable[[ReconState], Any] | None = None,
                       devices: int | None = None, mesh=None, share: "dist.HostShare | None" = None,
                       symmetry: str = "C1", noise_model: str = "white", noise_tol: float = 0.1,
                       noise_sample: int = 2048, groups=None) -> Reconstruction:
    """Known-pose reconstruction through the normal equations (``reconstruct(method='normal')``).

    One pass over the particles accumulates each half-set's normal equations
    (:func:`jaxcryo.normal.accumulate`); then each round solves them by Jacobi-preconditioned CG
    (warm-started), takes the half-maps' FSC, and, with ``wiener``, sets the Wiener prior of
    :func:`wiener_shell_lam` for the next round, as RELION iterates FSC -> tau2 -> reconstruction.
    The prior is set once, from the unregularised half-maps (re-estimating it from the
    Wiener-filtered half-maps raises their FSC, weakens the prior and lowered the FSC to the
    truth, measured), so with ``wiener`` there are two rounds (``rounds`` caps them), else one.
    The returned map is the solve of BOTH half-sets' equations together (they add), with the
    half-sets' prior: better than the mean of the half-maps (measured; also better than half
    that prior, the full set's nominal SNR of 2 SNR_half). It is solved alongside the halves
    (one compiled solve for all three systems).
    History: one entry per round (``epoch`` = round, the objective, seconds since the start
    of the accumulation), plus ``compile_seconds`` (accumulation and solve, measured apart).
    Nearest and trilinear slicing (nufft: use an iterative method).

    ``symmetry``: each image enters the equations at its pose composed with every group element
    (the accumulation costs G times as much; the solves do not). ``noise_model='estimate'``:
    after a first solve with white weights, sigma^2 per noise group and shell is estimated from
    the residuals of up to ``noise_sample`` particles per half-set at their half-map (one cheap
    pass over a sample: a spectrum needs few images); when some shell's weight differs from
    white by more than ``noise_tol`` the equations are accumulated again with 1/sigma^2 weights
    (one more pass), else the white equations are kept. One process (any number of its devices);
    with several processes the equations stay white (said in the history).

    ``particles`` may be a :class:`ParticleBlocks` source (e.g. streamed from disk): the
    equations are sums over particles, so each block of :meth:`BlockLayout.fixed` is accumulated
    and the sums added; the noise sample is the first block's first rows. With one block
    holding every particle the result is the in-memory one.
    """
    from jaxcryo import normal

    if interpolation not in ("nearest", "trilinear"):
        raise ValueError(f"method 'normal' needs nearest or trilinear slicing, got {interpolation!r}")
    grid = FourierGrid(box, r_max)
    problem = Problem(grid=grid, interpolation=interpolation, lam=lam, symmetry=symmetry)
    from_blocks = isinstance(particles, ParticleBlocks)
    dtype = jnp.dtype(particles.dtype if from_blocks else particles.data.dtype)
    key = jax.random.PRNGKey(seed)
    split_key, key = jax.random.split(key)
    if mesh is None and (jax.process_count() > 1 or (devices or jax.local_device_count()) > 1):
        mesh = dist.make_mesh(devices)
    if mesh is not None and jax.process_count() == 1 and dist.n_devices(mesh) == 1:
        mesh = None
    n = particles.n_particles if from_blocks else (particles.weight.shape[0] if share is None else share.n_total)
    # ``groups``: the half-sets' rows (G, m), -1 padded, when the caller fixes them (refine's
    # final solve over several candidate rows per particle); else drawn from the seed.
    groups = _split_halves(split_key, n, halves) if groups is None else np.asarray(groups)
    g = groups.shape[0]
    batch_size = int(min(batch_size, groups.shape[1]))
    noise_group = None if from_blocks or particles.noise_group is None else np.asarray(particles.noise_group)
    n_noise = particles.n_noise_groups if from_blocks else n_noise_groups(particles)
    if resume is not None and resume.history.get("noise_weights") is not None:
        problem = with_noise_weights(problem, resume.history["noise_weights"])
    data = problem.data_only()

    @jax.jit
    def with_union(neq):
        """Append the union of the half-sets (the map's system) and return the diagonals."""
        if g == 2:
            neq = jax.tree.map(lambda x: jnp.concatenate([x, x.sum(0, keepdims=True)]), neq)
        return neq, jax.vmap(normal.diagonal)(neq)

    # One half-set after the other (lax.map): vmapped over the half-sets, XLA's scatter into
    # the tables ran 20x slower on CPU (measured). Every step is one jitted function: eager
    # JAX ops compile one by one (they were half of a 20,000-particle run's time).
    # A new function per objective: jit caches traces by function, so one closure over a
    # reassigned `data` would silently reuse the first objective's trace.
    if from_blocks:
        rows_list = BlockLayout(groups, particles.block_size).fixed()

        def blocks():
            return particles.blocks(rows_list, mesh)
    else:
        stacked = (_stack_groups_numpy(particles, groups) if mesh is None
                   else dist.shard_groups(particles, groups, mesh, share))

        def blocks():
            return [stacked]

    def make_accumulate(prob):
        if mesh is None:
            def accumulate(st):
                return jax.lax.map(lambda p: normal.accumulate(p, prob, batch_size), st)
            return accumulate

        def accumulate(st):
            return jax.lax.map(lambda p: normal.accumulate(p, prob, batch_size, axis_name=dist.AXIS), st)
        return dist.shard(accumulate, mesh, in_specs=dist.P(None, dist.AXIS), out_specs=dist.P())

    sample_rows = min(noise_sample, groups.shape[1])

    def accumulate_all(prob):
        """The half-sets' equations summed over the blocks (with the union's and the diagonals),
        the seconds spent compiling, and the noise sample (the first block's first rows)."""
        fn, seconds, total, sample = None, 0.0, None, None
        for block in blocks():
            if fn is None:
                t0 = time.perf_counter()
                fn = jax.jit(make_accumulate(prob)).lower(block).compile()
                seconds = time.perf_counter() - t0
                sample = jax.tree.map(lambda x: np.asarray(x)[:, :sample_rows], block)
            part = fn(block)
            if mesh is not None:
                part = dist.to_local(part)
            total = part if total is None else normal.combine(total, part)
        neq, diag = with_union(total)
        return neq, np.asarray(diag), seconds, sample
    shape = grid.volume_shape + (1,)

    def reg_of(prob):
        return np.broadcast_to(np.asarray(prob.regularizer(dtype)), shape)

    def one_round(neq, reg, x0):
        x, k, rel = normal.cg(neq, reg, x0, iters=cg_iters, tol=cg_tol)
        value, _ = normal.value_and_grad(neq, x, reg)
        return x, k, rel, value, ft_to_volume(x, interpolation)


    t_start = time.perf_counter()
    neq, data_diag, compile_seconds, sample = accumulate_all(data)
    t_start += compile_seconds
    # The sample is drawn from this process's rows: all of them unless several processes share.
    estimate_noise_now = (noise_model == "estimate" and resume is None and share is None
                          and jax.process_count() == 1)

    if resume is None:
        params = jnp.zeros((neq.rhs.shape[0],) + grid.volume_shape + (2,), dtype)
        history = {"epoch": [], "loss": [], "seconds": []}
        start = 0
    else:
        params = jnp.asarray(dist.to_local(resume.params), dtype)
        if g == 2:
            params = jnp.concatenate([params, params.mean(0, keepdims=True)])
        history = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in resume.history.items()}
        start = resume.epoch
    if history.get("shell_lam") is not None:
        problem = dataclasses.replace(problem, shell_lam=tuple(history["shell_lam"]))
    t1 = time.perf_counter()
    solve_groups = jax.jit(jax.vmap(one_round, in_axes=(0, None, 0))).lower(neq, reg_of(problem), params).compile()
    compile_seconds += time.perf_counter() - t1
    # Every solve starts from zero: a round's maps then depend only on its equations and prior
    # (not on where an earlier round, or a killed run, left off), so a resumed run gives the same
    # maps as an uninterrupted one. CG from zero costs a few iterations more (stencil: ms each).
    cold = jnp.zeros_like(params)
    if noise_model == "estimate" and not estimate_noise_now and history.get("noise_weights") is None:
        history["noise_model_note"] = "white: with several processes the estimate is not made"
    if estimate_noise_now:
        # sigma^2 per noise group and shell from the residuals of a sample of each half-set at
        # its white half-map; re-accumulate only when the spectrum is not white.
        x0 = solve_groups(neq, reg_of(problem), cold)[0]
        power, pixels = jax.jit(jax.vmap(lambda p, s: residual_power(p, s, data, n_groups=n_noise)))(x0[:g], sample)
        power, pixels = np.asarray(power, np.float64).sum(0), np.asarray(pixels, np.float64).sum(0)
        sigma2 = sigma2_from_sums(power, pixels)
        # images per noise group: of the whole set in memory; of a block source, in the sample
        counts = (np.bincount(noise_group, minlength=n_noise) if noise_group is not None
                  else np.asarray(pixels.sum(1) / grid.multiplicity.sum()) if from_blocks else None)
        weights = shell_weights_from_sigma2(sigma2, grid, group_counts=counts)
        history["noise_sigma2"] = [[float(x) for x in row] for row in np.atleast_2d(sigma2)]
        if np.nanmax(np.abs(weights - 1.0)) > noise_tol:
            problem = with_noise_weights(problem, weights)
            history["noise_weights"] = [[float(x) for x in row] for row in np.atleast_2d(weights)]
            data = problem.data_only()
            t1 = time.perf_counter()
            neq, data_diag, seconds, _ = accumulate_all(data)
            compile_seconds += seconds
    elapsed = history["seconds"][-1] if history["seconds"] else 0.0
    elapsed += t1 - t_start  # the accumulation
    history["compile_seconds"] = compile_seconds
    history.setdefault("cg_iters", [])
    keys = jax.random.split(key, g)
    state = ReconState(start, params[:g], None, keys, history)
    maps = None
    needed = 2 if (wiener and g == 2) else 1  # a resumed run that has done them has nothing left
    for rnd in range(start + 1, min(rounds, needed) + 1):
        t0 = time.perf_counter()
        params, iters, _, values, maps = solve_groups(neq, reg_of(problem), cold)
        maps = np.asarray(maps)
        prior_set = False
        if g == 2 and wiener and problem.shell_lam is None:
            prior_set = True
            shell_lam = wiener_shell_lam(fsc(maps[0], maps[1]), data_diag[:2], box, r_max=grid.radius)
            problem = dataclasses.replace(problem, shell_lam=tuple(float(x) for x in shell_lam))
            history["shell_lam"] = list(problem.shell_lam)
        elapsed += time.perf_counter() - t0
        history["epoch"].append(rnd)
        history["loss"].append(float(np.mean(np.asarray(values)[:g])))
        history["seconds"].append(elapsed)
        history["cg_iters"].append([int(k) for k in np.asarray(iters)[:g]])
        state = ReconState(rnd, params[:g], None, keys, history)
        if callback is not None:
            callback(state)
        if not prior_set:
            break  # solved with the final objective: another round would change nothing

    t0 = time.perf_counter()
    if maps is None:  # resumed after the last round: the halves are solved (CG stops at once), the map's system not
        params, _, _, _, maps = solve_groups(neq, reg_of(problem), cold)
        maps = np.asarray(maps)
    if g == 2:  # maps[2]: both half-sets' equations together, with the half-sets' prior
        volume, maps = maps[2], maps[:2]
        curve = fsc(maps[0], maps[1])
        res = resolution(curve, pixel_size_angstrom)
    else:
        volume, maps, curve, res = maps[0], None, None, None
    if history["seconds"]:
        history["seconds"][-1] = history["seconds"][-1] + time.perf_counter() - t0
    state = ReconState(state.epoch, params[:g], None, keys, history)
    return Reconstruction(volume, maps, params[:g], curve, res, history, state)


def _stack_groups_numpy(particles: Particles, groups):
    """:func:`_stack_groups` in numpy (host arrays in, host arrays out: no eager device op
    to compile per leaf)."""
    safe = np.maximum(groups, 0)

    def take(x):
        return np.asarray(x)[safe]

    out = jax.tree.map(take, particles)
    return out._replace(weight=np.where(groups >= 0, out.weight, 0).astype(np.asarray(particles.weight).dtype))
