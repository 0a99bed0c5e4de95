"""Gold-standard 3-D refinement with unknown poses: the reconstruction driver with its pose stage on.

Every minibatch step of :func:`jaxcryo.reconstruct.make_epoch` first runs the pose stage made
here (:func:`make_pose_stage`): the batch's images are scored against projections of their own
half-map (gold standard: each half-set only ever sees its own map) over candidate rotations x
shifts (:mod:`jaxcryo.poses`, dense products), the top K poses of each image are kept with
their posterior weights (RELION-style marginalisation over the significant poses, with a
temperature), and the batch is expanded to B x K rows: candidate rotation, image shifted back by
the candidate shift, weight = particle weight x posterior weight. The volume step (psgd by
default) then runs unchanged on the expanded batch. Each particle's best pose (rotation, shift,
posterior probability) is kept in a :class:`PoseState` updated inside the compiled epoch.

Around that compiled epoch, :func:`refine` runs a Python-level schedule (recompiling only when a
static setting changes): a global search over an SO(3) grid and a shift grid, then local searches
at halving angular and shift steps around each particle's current pose; the frequency limit of
the scores follows the half-map FSC resolution plus a margin; a noise spectrum re-estimated
every epoch from the residuals at the best poses; a soft solvent mask applied to both half-maps
between epochs; a Wiener prior from the half-map FSC; and a stop when resolution and poses stop
changing.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcryo import distributed as dist, poses
from jaxcryo.config import Config, resolve
from jaxcryo.curvature import exact_diagonal
from jaxcryo.forward.ctf import conj_multiply, shift_phase
from jaxcryo.forward.model import Particles, ctf_batch, ft_to_volume, slices, volume_to_ft
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.fsc import fsc, resolution
from jaxcryo.geometry import spherical_mask
from jaxcryo.loss import Problem, batched, data_loss_sum, subset
from jaxcryo.noise import n_noise_groups, pixel_shells, residual_power, sigma2_from_sums
from jaxcryo.reconstruct import (BlockLayout, ParticleBlocks, ReconState, Reconstruction, _split_halves,
                                 _stack_groups, finish, group_functions, make_optimizer, reconstruct_normal,
                                 wiener_shell_lam)

__all__ = ["PoseState", "PoseSearch", "RefineState", "Refinement", "make_pose_stage", "refine", "pose_stage_bytes",
           "default_chunk", "lowpass", "resample_map", "rotation_angle_deg"]


class PoseState(NamedTuple):
    """Each particle's current best pose (leading axis n; with half-sets (G, m, ...)).

    rotations: (n, 3, 3) RELION matrices; shifts_px: (n, 2) shift of the particle beyond the one
    already undone in its data (same sign as ``render``/``prepare_particles``); max_prob: (n,)
    posterior probability of the best pose (RELION's rlnMaxValueProbDistribution).
    """

    rotations: Any
    shifts_px: Any
    max_prob: Any


@dataclasses.dataclass(frozen=True)
class PoseSearch:
    """Static settings of one pose stage (hashable: changing one recompiles the epoch).

    mode: 'global' (the whole SO(3) grid of ``order`` x the shift grid of ``max_shift_px`` and
    ``shift_step_px``) or 'local' ((2 local_n+1)^3 rotations around each particle's pose x
    (2 shift_n+1)^2 shifts around its shift, at the steps given each epoch in the stage's
    dynamic ``args``). top_k: poses kept per image; temperature: divides the log-likelihoods
    before the posterior (> 1 softens it). r_limit: Fourier radius scored (static: it fixes
    shapes; the stage's ``args["r_mask"]`` can lower it further without recompiling).
    shift_window_px: with a global search, > 0 scores the shifts within this radius of each
    particle's current shift (at ``shift_step_px``, total kept within ``max_shift_px``) instead
    of the whole grid about zero: the rotations stay global, the shifts become local.
    symmetry: the map's point group; a global search then scores only the grid's rotations in
    an asymmetric unit (:func:`jaxcryo.poses.global_grid`): about 1/G of them.
    """

    mode: str = "global"
    order: int = 2
    local_n: int = 1
    max_shift_px: float = 3.0
    shift_step_px: float = 1.0
    shift_n: int = 1
    top_k: int = 4
    temperature: float = 1.0
    r_limit: int | None = None
    interpolation: str = "trilinear"
    chunk: int = 4096
    shift_window_px: float = 0.0
    symmetry: str = "C1"

    def __post_init__(self):
        if self.mode not in ("global", "local"):
            raise ValueError(f"mode must be 'global' or 'local', got {self.mode!r}")


def _shifted(data, shifts_px, grid: FourierGrid):
    """Undo candidate shifts t (..., 2) of images (B, P, 2): conj(ramp(t)) * y, (B, ..., P, 2)."""
    flat = shifts_px.reshape(-1, 2)
    ramps = jax.vmap(lambda t: shift_phase(grid.freqs, t, grid.box))(flat.astype(data.dtype))
    ramps = ramps.reshape(shifts_px.shape[:-1] + ramps.shape[-2:])
    y = data.reshape((data.shape[0],) + (1,) * (shifts_px.ndim - 2) + data.shape[1:])
    return conj_multiply(ramps, y)


def make_pose_stage(search: PoseSearch, grid: FourierGrid):
    """The pose stage of :func:`jaxcryo.reconstruct.make_epoch` for ``search``.

    pose_stage(params, batch, rows, key, args) -> (expanded batch of B*K rows, new rows), with
    ``rows`` a :class:`PoseState` of the batch and ``args`` a dict of dynamic settings:
    ``pixel_weights`` ((G, P): per noise group, the multiplicity over the noise variance of each
    pixel, zero beyond the frequency limit; each image is scored with its ``noise_group``'s
    row; or (P,) for all) and, for local searches, ``step_deg`` and ``shift_step_px``.
    """
    k = search.top_k
    if search.mode == "global":
        grid_rot = jnp.asarray(poses.global_grid(search.order, search.symmetry))
        window = search.shift_window_px > 0
        grid_shift = jnp.asarray(poses.shift_grid(search.shift_window_px if window else search.max_shift_px,
                                                  search.shift_step_px))

    def stage(params, batch: Particles, rows: PoseState, key, args):
        del key
        dtype = batch.data.dtype
        b = batch.data.shape[0]
        c = ctf_batch(batch.ctf, grid, b, dtype)
        weights = args["pixel_weights"]  # (noise groups, P): each image gets its own group's row
        if weights.ndim == 2:
            weights = weights[0] if weights.shape[0] == 1 else weights[batch.noise_group]
        kw = dict(pixel_weights=weights, r_limit=search.r_limit,
                  interpolation=search.interpolation, chunk=search.chunk)
        if search.mode == "global":
            data = _shifted(batch.data, rows.shifts_px.astype(dtype)[:, None], grid)[:, 0] if window else batch.data
            # streamed top-k over rotation chunks: the same result as top_k(score_poses(...)),
            # without the (B, M, S) scores (lax.top_k over them was 20x the scoring's time on CPU)
            i_rot, i_shift, w, max_prob = poses.search_top_k(params, data, c, grid_rot.astype(dtype),
                                                             grid_shift.astype(dtype), grid, k=k,
                                                             temperature=search.temperature, **kw)
            rot = grid_rot.astype(dtype)[i_rot]
            shift = grid_shift.astype(dtype)[i_shift]
            if window:
                shift = _clip_norm(rows.shifts_px.astype(dtype)[:, None] + shift, search.max_shift_px)
        else:
            cand_rot, cand_shift = local_candidates(rows.rotations.astype(dtype), rows.shifts_px.astype(dtype),
                                                    args["step_deg"], args["shift_step_px"],
                                                    search.local_n, search.shift_n)
            cand_shift = _clip_norm(cand_shift, search.max_shift_px)
            scores = poses.score_local(params, batch.data, c, cand_rot, cand_shift, grid, **kw)
            i_rot, i_shift, w, max_prob = poses.top_k(scores / search.temperature, k)
            rot = jnp.take_along_axis(cand_rot, i_rot[:, :, None, None], axis=1)
            shift = jnp.take_along_axis(cand_shift, i_shift[:, :, None], axis=1)
        data = _shifted(batch.data, shift, grid)  # (B, K, P, 2)
        # Every per-image field (CTF, and any other) repeated K times; then the candidates.
        expanded = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), k, axis=0), batch)
        expanded = expanded._replace(data=data.reshape((b * k,) + data.shape[2:]), rotations=rot.reshape(b * k, 3, 3),
                                     weight=(batch.weight[:, None] * w.astype(dtype)).reshape(b * k))
        return expanded, PoseState(rot[:, 0], shift[:, 0], max_prob.astype(dtype))

    return stage


def local_candidates(rotations, shifts_px, step_deg, shift_step_px, n: int = 1, shift_n: int = 1):
    """Local search candidates with traced (dynamic) steps: rotations (B, (2n+1)^3, 3, 3) and
    shifts (B, (2 shift_n+1)^2, 2), laid out as :func:`jaxcryo.poses.local_rotations` and
    :func:`jaxcryo.poses.local_shifts` (centre at index L // 2), so that halving the steps
    between epochs does not recompile the epoch."""
    dtype = rotations.dtype
    r = np.arange(-int(n), int(n) + 1, dtype=np.float64)
    cube = jnp.asarray(np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3), dtype)
    omega = cube * jnp.deg2rad(jnp.asarray(step_deg, dtype))
    theta = jnp.linalg.norm(omega, axis=-1)[:, None, None]
    x, y, z = omega[:, 0], omega[:, 1], omega[:, 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack([jnp.stack([zero, -z, y], -1), jnp.stack([z, zero, -x], -1), jnp.stack([-y, x, zero], -1)], -2)
    safe = jnp.where(theta > 0, theta, 1.0)
    a = jnp.where(theta > 0, jnp.sin(safe) / safe, 1.0)
    b = jnp.where(theta > 0, (1 - jnp.cos(safe)) / safe ** 2, 0.5)
    offsets = jnp.eye(3, dtype=dtype) + a * k + b * (k @ k)
    s = np.arange(-int(shift_n), int(shift_n) + 1, dtype=np.float64)
    yy, xx = np.meshgrid(s, s, indexing="ij")
    grid2 = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), dtype) * jnp.asarray(shift_step_px, dtype)
    return jnp.einsum("bij,ljk->blik", rotations, offsets), shifts_px[:, None, :] + grid2[None]


def _clip_norm(shifts, max_norm):
    """Shifts (..., 2) pulled back onto the disk of radius ``max_norm`` pixels."""
    norm = jnp.linalg.norm(shifts, axis=-1, keepdims=True)
    return shifts * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))


def rotation_angle_deg(a, b):
    """Angle (degrees) of the rotation between matrices a and b (..., 3, 3)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (np.einsum("...ij,...ij->...", a, b) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def default_chunk(box: int, interpolation: str = "trilinear") -> int:
    """Rotations projected at a time by the pose stage: a power of two in [64, 4096] that keeps
    the chunk's projections and stencils near 1 GB (float32)."""
    k = 8 if interpolation == "trilinear" else 1
    per_rotation = FourierGrid(box).n_pixels * (4 + 5 * k)
    return int(2 ** np.clip(np.floor(np.log2(2.5e8 / per_rotation)), 6, 12))


def pose_stage_bytes(batch_size: int, box: int, *, global_order: int = 2, max_shift_px: float | None = None,
                     shift_step_px: float = 1.0, top_k: int = 4, chunk: int | None = None, groups: int = 2,
                     interpolation: str = "trilinear", dtype_bytes: int = 4) -> int:
    """Scratch memory of the pose stage and the expanded volume step during a global epoch (the
    larger of the two searches, at the full frequency limit), for all half-sets at once:
    :func:`jaxcryo.poses.memory_bytes` of the global scores plus the B x K expanded rows and their
    forward/adjoint buffers."""
    grid = FourierGrid(box)
    m = 72 * 8 ** int(global_order)
    s = len(poses.shift_grid(min(5.0, box / 8.0) if max_shift_px is None else max_shift_px, shift_step_px))
    c = default_chunk(box, interpolation) if chunk is None else chunk
    scores = poses.memory_bytes(batch_size, m, s, grid, interpolation=interpolation, chunk=c, itemsize=dtype_bytes)
    k = 8 if interpolation == "trilinear" else 1
    p = grid.n_pixels
    expanded = dtype_bytes * (4 * batch_size * top_k * (2 * p + 19) + 2 * batch_size * top_k * p * 2 * k)
    return int(groups * (scores + expanded))


def final_solve_bytes(images: int, box: int, *, top_k: int = 4, groups: int = 2, interpolation: str = "trilinear",
                      dtype_bytes: int = 4) -> int:
    """Memory of the final solve beyond the epochs' (:func:`jaxcryo.reconstruct.reconstruct_normal`
    over each image's top-K candidates): the candidates of ``images`` images (the whole set in
    memory; one block streamed) as Fourier pairs with poses and CTF, the block they come from,
    and the normal equations: one accumulation table per half-set (43 floats per full-grid voxel
    trilinear, 3 nearest) and the stencils and right-hand sides of the half-sets and their union
    (29 and 5 floats)."""
    grid = FourierGrid(box)
    per_pair = (grid.n_pixels * 2 + 9 + 9 + 1 + 1) * dtype_bytes
    table, system = (43, 29) if interpolation == "trilinear" else (3, 5)
    voxels = box ** 3
    return int((top_k + 1) * images * per_pair + (groups * table + (groups + 1) * system) * voxels * dtype_bytes)


# ----------------------------------------------------------------------------- maps


def lowpass(volume, pixel_size_angstrom: float, resolution_angstrom: float, edge_shells: float = 2.0):
    """Real (N, N, N) map low-passed to ``resolution_angstrom`` with a raised-cosine edge."""
    v = np.asarray(volume, np.float64)
    n = v.shape[0]
    k = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    cut = n * pixel_size_angstrom / resolution_angstrom
    edge = np.clip((r - cut) / edge_shells + 0.5, 0.0, 1.0)
    filt = 0.5 + 0.5 * np.cos(np.pi * edge)
    return np.fft.irfftn(np.fft.rfftn(v) * filt, s=v.shape, axes=(0, 1, 2)).astype(np.float32)


def resample_map(volume, pixel_size_angstrom: float, box: int, target_pixel_size_angstrom: float):
    """A map at another voxel size and box: Fourier crop/pad to the new voxel size, then
    real-space crop/pad about the centre N//2 to ``box``.

    Raises ValueError when the voxel sizes differ by a ratio that no whole number of Fourier
    pixels gives to within 0.5% (resample the reference yourself, e.g. relion_image_handler).
    """
    v = np.asarray(volume, np.float64)
    n = v.shape[0]
    if abs(pixel_size_angstrom - target_pixel_size_angstrom) > 1e-4 * target_pixel_size_angstrom:
        m = int(round(n * pixel_size_angstrom / target_pixel_size_angstrom))
        if m < 4 or abs(m * target_pixel_size_angstrom - n * pixel_size_angstrom) > 0.005 * n * pixel_size_angstrom:
            raise ValueError(f"cannot resample a {n}^3 map of {pixel_size_angstrom:g} A/px to "
                             f"{target_pixel_size_angstrom:g} A/px by whole Fourier pixels")
        f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(v)))
        out = np.zeros((m, m, m), complex)
        lo = min(n, m)
        so, sd = n // 2 - lo // 2, m // 2 - lo // 2
        out[sd:sd + lo, sd:sd + lo, sd:sd + lo] = f[so:so + lo, so:so + lo, so:so + lo]
        v = np.real(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out)))) * (m / n) ** 3
        n = m
    if n != box:
        out = np.zeros((box, box, box))
        lo = min(n, box)
        so, sd = n // 2 - lo // 2, box // 2 - lo // 2
        out[sd:sd + lo, sd:sd + lo, sd:sd + lo] = v[so:so + lo, so:so + lo, so:so + lo]
        v = out
    return v.astype(np.float32)


def _apply_mask(params, mask, interpolation):
    """Both half-maps' Fourier pairs (G, N, N, H, 2) times a real-space mask."""
    def one(p):
        return volume_to_ft(ft_to_volume(p, interpolation) * mask, interpolation)
    return jax.vmap(one)(params)


# ----------------------------------------------------------------------------- noise and scale


def _pixel_weights(sigma2, grid: FourierGrid, dtype):
    """multiplicity / sigma^2 per noise group and pixel, (G, P) (sigma^2 (G, S) or (S,): E|noise|^2
    of a pixel): the log-likelihood -sum w |y - cPv|^2 / 2 is then the real-space Gaussian
    one (see :mod:`jaxcryo.poses`)."""
    s = np.maximum(np.array(sigma2, np.float64, ndmin=2), 1e-30)
    w = grid.multiplicity[None] / s[:, np.minimum(pixel_shells(grid), s.shape[1] - 1)]
    return jnp.asarray(w, dtype)


def _reference_scale(init_ft, particles: Particles, grid: FourierGrid, interpolation: str, cut_shell: float,
                     n_sample: int = 256, seed: int = 0):
    """Scale that makes the reference's projections carry the images' signal power below ``cut_shell``.

    The images' power minus a white-noise floor (their mean power in the outer third of the
    disk) is matched with the mean power of CTF-modulated projections at random poses.
    """
    from jaxcryo.geometry import random_rotations

    n = particles.data.shape[0]
    sample = subset(particles, jnp.arange(min(n, n_sample)))
    shells = pixel_shells(grid)
    y2 = np.asarray(jnp.sum(sample.data ** 2, -1))  # (B, P)
    floor = float(y2[:, shells > 0.66 * grid.radius].mean()) if np.any(shells > 0.66 * grid.radius) else 0.0
    rot = random_rotations(jax.random.PRNGKey(seed + 7), sample.data.shape[0], sample.data.dtype)
    model = slices(jnp.asarray(init_ft), rot, grid, interpolation)
    model = model * ctf_batch(sample.ctf, grid, rot.shape[0], model.dtype)[..., None]
    m2 = np.asarray(jnp.sum(model ** 2, -1))
    low = (shells >= 1) & (shells <= cut_shell)
    if not np.any(low):
        return 1.0
    signal = max(float(y2[:, low].mean()) - floor, 0.0)
    model_power = float(m2[:, low].mean())
    if not (model_power > 0 and signal > 0):
        return 1.0
    return math.sqrt(signal / model_power)


# ----------------------------------------------------------------------------- driver


class RefineState(NamedTuple):
    """Everything needed to continue a refinement: the reconstruction state (its history holds
    the schedule) and each half-set's poses (a :class:`PoseState` with leading axes (G, m))."""

    recon: ReconState
    poses: PoseState


class Refinement(NamedTuple):
    """Result of :func:`refine`: the :class:`~jaxcryo.reconstruct.Reconstruction` and per-particle
    poses in the input's row order: rotations (n, 3, 3), shifts_px (n, 2) beyond the shift
    already undone in the data, max_prob (n,), half_set (n,) 1 or 2; state: final RefineState."""

    reconstruction: Reconstruction
    rotations: np.ndarray
    shifts_px: np.ndarray
    max_prob: np.ndarray
    half_set: np.ndarray
    state: RefineState


def _at_poses(particles: Particles, rotations, shifts_px, grid: FourierGrid) -> Particles:
    """Particles at the given poses: the rotations set and the images shifted back by ``shifts_px``."""
    dtype = particles.data.dtype
    data = _shifted(particles.data, jnp.asarray(shifts_px, dtype)[:, None, :], grid)[:, 0]
    return particles._replace(data=data, rotations=jnp.asarray(rotations, dtype))


def _rows_of(pose_state: PoseState, positions) -> PoseState:
    """The pose state (G, m, ...) of a block's positions (G, rows) in the half-sets (-1: padding,
    any row); None: all of it (a single block)."""
    if positions is None:
        return pose_state
    pos = jnp.asarray(np.maximum(positions, 0))
    return jax.tree.map(lambda x: jax.vmap(lambda a, p: a[p])(x, pos), pose_state)


def _scatter_rows(pose_state: PoseState, positions, rows: PoseState) -> PoseState:
    """``pose_state`` with a block's new rows written at its positions (padding dropped)."""
    m = pose_state.max_prob.shape[1]
    pos = jnp.asarray(np.where(positions >= 0, positions, m))
    return jax.tree.map(lambda x, r: jax.vmap(lambda a, p, b: a.at[p].set(b.astype(a.dtype), mode="drop"))(x, pos, r),
                        pose_state, rows)


def _put_rows(array: np.ndarray, positions, values) -> None:
    """array[g, positions[g]] = values[g] (numpy, in place; padding positions skipped)."""
    if positions is None:
        array[...] = values
        return
    for gi in range(array.shape[0]):
        keep = positions[gi] >= 0
        array[gi, positions[gi][keep]] = values[gi][keep]


def _block_sums(fn, blocks, pose_state: PoseState):
    """Sum over the blocks of the tuples ``fn(block, rows)``, as float64 numpy."""
    total = None
    for pos, block in blocks:
        out = [np.asarray(x, np.float64) for x in fn(block, _rows_of(pose_state, pos))]
        total = out if total is None else [a + b for a, b in zip(total, out)]
    return total


def _first_particles(blocks, n: int = 256) -> Particles:
    """Up to ``n`` real particles (unstacked) of the first block."""
    _, block = next(iter(blocks))
    flat = jax.tree.map(lambda x: jnp.asarray(x).reshape((-1,) + x.shape[2:]), block)
    keep = np.flatnonzero(np.asarray(flat.weight) > 0)[:n]
    return subset(flat, jnp.asarray(keep))


def _best_pose_particles(stacked: Particles, pose_state: PoseState, grid: FourierGrid) -> Particles:
    """Each half-set's particles at their current best pose (rotation and shift applied)."""
    return jax.vmap(lambda p, r, t: _at_poses(p, r, t, grid))(stacked, pose_state.rotations, pose_state.shifts_px)


def refine(particles: Particles, reference, config: Config | None = None, *, box: int, pixel_size_angstrom: float,
           mask=None, resume: RefineState | None = None, callback: Callable[[RefineState], Any] | None = None,
           devices: int | None = None, mesh=None, **settings) -> Refinement:
    """Gold-standard refinement of a map and the particles' poses.

    Args:
      config: the run's settings, a frozen :class:`jaxcryo.Config` (default ``Config()``); any
        keyword ``settings`` beside it override its fields. The pose-search fields are refine's
        own (below); of the volume-step fields it reads method, interpolation, batch_size, lam,
        seed, symmetry and the optimizer's (n_probes, beta, alpha, learning_rate, initial_step,
        c, warmup), as :func:`jaxcryo.reconstruct.reconstruct` does.
      particles: :class:`Particles` whose ``data`` have any prior shift already undone (zeros
        for a global search) and whose ``rotations`` are the priors used with ``local``; or a
        :class:`jaxcryo.reconstruct.ParticleBlocks` source of such particles, e.g.
        :class:`jaxcryo.pipeline.StreamedBlocks` (read from disk in blocks every pass). One driver
        either way: each block is swept by the same compiled block function as
        :func:`jaxcryo.reconstruct.reconstruct`'s, with its rows of the pose state; statistics
        (exact diagonal, noise per group, loss) are sums over the blocks. One block holding every
        particle is the in-memory run. Streamed, the final solve reads the blocks again, each
        block's final pose pass feeding the normal equations as it is read.
      reference: real (box, box, box) starting map at ``pixel_size_angstrom`` (see
        :func:`resample_map`); it is low-passed to ``initial_lowpass_angstrom`` (no coarser
        than Fourier shell 2) and, with ``scale_reference``, scaled to the images' signal power.
      diameter_angstrom: soft spherical solvent mask diameter (default: the box less 6 px);
        ``mask`` (real (box,)*3, values 0..1) replaces it.
      local: start from the particles' rotations (local searches only, no global search).
      epochs: at most this many epochs; the run stops earlier (after ``min_epochs``), as
        RELION's auto-refine does, when the sampling is at its finest, the resolution no longer
        improves and the poses have settled (:func:`stop_rule`).
      global_order, global_epochs: SO(3) grid (:func:`jaxcryo.poses.so3_grid`) and epochs of the
        global search; max_shift_px (default min(5, box/8) px, RELION: 5), shift_step_px: its shift grid.
      global_shift_window_px: global epochs after the first search the shifts within this radius
        of each particle's shift (the rotations stay global; 0: the whole grid every time).
      local_step_deg: first local angular step (default half the global step); each later
        epoch halves the angular and shift steps down to ``min_step_deg`` / ``min_shift_step_px``
        (no finer than the resolution needs: ``step_fraction`` x atan(resolution / diameter)).
      top_k, temperature: poses kept per image and the posterior temperature.
      margin_shells: Fourier shells scored beyond the current half-map resolution.
      method, batch_size, lam, n_probes, interpolation, seed: the volume step, as
        :func:`jaxcryo.reconstruct.reconstruct`.
      chunk: rotations projected at a time by the pose stage (default :func:`default_chunk`).
      resume, callback: continue from / receive a :class:`RefineState` after every epoch.
      symmetry: point group (RELION symbol): the volume step symmetrises the maps
        (Problem.symmetry) and global searches score the rotations of an asymmetric unit only
        (about 1/G of the grid: :func:`jaxcryo.poses.global_grid`).
      devices, mesh: spread the particles over this many local devices (default: all) or a
        :func:`jaxcryo.distributed.make_mesh` mesh, as :func:`jaxcryo.reconstruct.reconstruct`
        does; the same poses and maps as one device, up to float rounding.
      final_solve: the maps returned are solved exactly at the refined poses (the normal
        equations of :func:`jaxcryo.reconstruct.reconstruct_normal`, with the noise estimate and
        the Wiener prior, the same half-sets, unmasked as RELION writes its maps), as RELION's
        last iteration reconstructs at the converged poses; False: the psgd iterates themselves
        (masked). Nearest and trilinear.
    Returns:
      :class:`Refinement`. Its reconstruction's history has, per epoch: ``epoch``, ``loss`` (at
      the best poses), ``seconds``, ``resolution_angstrom``, ``angular_step_deg``,
      ``shift_step_px``, ``r_limit``, ``mean_pose_change_deg``, ``mode``.
    """
    cfg = resolve(config, settings)
    if not cfg.halves:
        raise ValueError("refine is gold-standard: it always refines two half-sets (Config.halves must be True)")
    (initial_lowpass_angstrom, diameter_angstrom, local, min_epochs, batch_size, method, interpolation,
     global_order, global_epochs, max_shift_px, shift_step_px, global_shift_window_px, local_step_deg, min_step_deg,
     step_fraction, min_shift_step_px, top_k, temperature, margin_shells, lam, scale_reference, seed, n_probes,
     chunk, symmetry, final_solve) = (getattr(cfg, k) for k in (
        "initial_lowpass_angstrom", "diameter_angstrom", "local", "min_epochs", "batch_size", "method",
        "interpolation", "global_order", "global_epochs", "max_shift_px", "shift_step_px", "global_shift_window_px",
        "local_step_deg", "min_step_deg", "step_fraction", "min_shift_step_px", "top_k", "temperature",
        "margin_shells", "lam", "scale_reference", "seed", "n_probes", "chunk", "symmetry", "final_solve"))
    epochs = cfg.epochs_or(12)
    sym = {}
    if str(symmetry).upper() != "C1":
        sym = {"symmetry": symmetry}  # the volume step symmetrises; global searches cover an asymmetric unit
    grid = FourierGrid(box)
    streamed = isinstance(particles, ParticleBlocks)
    dtype = jnp.dtype(particles.dtype if streamed else particles.data.dtype)
    max_shift_px = min(5.0, box / 8.0) if max_shift_px is None else float(max_shift_px)
    diameter_angstrom = (box - 6) * pixel_size_angstrom if diameter_angstrom is None else diameter_angstrom
    if mask is None:
        mask = spherical_mask(box, 0.5 * diameter_angstrom / pixel_size_angstrom, soft_width=3.0)
    mask = jnp.asarray(mask, dtype)
    problem = Problem(grid=grid, interpolation=interpolation, lam=lam, **sym)
    key = jax.random.PRNGKey(seed)
    split_key, key = jax.random.split(key)
    n = particles.n_particles if streamed else particles.weight.shape[0]
    n_noise = particles.n_noise_groups if streamed else n_noise_groups(particles)
    groups = _split_halves(split_key, n, True)
    mesh = dist.mesh_for(devices, mesh)  # None on one device
    g, m = groups.shape
    # One driver: each half-set is swept in blocks (in memory: one block, placed once; streamed:
    # several, read again every pass), each with its rows' pose state.
    layout = BlockLayout(groups, particles.block_size if streamed else None)
    if layout.n_blocks == 1:
        stacked = next(iter(particles.blocks([groups]))) if streamed else _stack_groups(particles, groups)
        sharded = stacked if mesh is None else (next(iter(particles.blocks([groups], mesh))) if streamed
                                                 else dist.shard_groups(particles, groups, mesh))

        def stat_blocks():
            return [(None, stacked)]

        def train_blocks(epoch):
            return [(None, sharded)]
    else:
        def stat_blocks():
            fixed = layout.fixed(with_positions=True)
            return zip([p for p, _ in fixed], particles.blocks([r for _, r in fixed]))

        def train_blocks(epoch):
            order = layout.shuffled(seed, epoch, with_positions=True)
            return zip([p for p, _ in order], particles.blocks([r for _, r in order], mesh))
    batch_size = int(min(batch_size, layout.rows))
    steps_per_epoch = layout.n_blocks * (-(-layout.rows // batch_size))
    if isinstance(method, str):
        tx = make_optimizer(method, box=box, r_max=grid.radius, beta=cfg.beta, alpha=cfg.alpha, n_probes=n_probes,
                            initial_step=cfg.initial_step, c=cfg.c, learning_rate=cfg.learning_rate,
                            warmup=int(min(cfg.warmup, steps_per_epoch // 4)), seed=seed)
        exact, probes = method == "psgd-exact", (n_probes if method == "psgd" else 0)
    else:
        tx, exact, probes = optax.with_extra_args_support(method), False, n_probes
    global_step = poses.angular_step_deg(global_order)
    first_local = global_step / 2 if local_step_deg is None else float(local_step_deg)

    data_problem = problem.data_only()
    diag_problem = (dataclasses.replace(data_problem, interpolation="nearest") if interpolation == "nufft"
                    else data_problem)

    @jax.jit
    def power_sums(params, block, rows):
        """Residual power sums (noise groups, shells) of a block at its rows' best poses, both half-sets."""
        best = _best_pose_particles(block, rows, grid)
        power, pixels = jax.vmap(lambda v, p: residual_power(v, p, data_problem, n_groups=n_noise,
                                                            batch_size=batch_size))(params, best)
        return power.sum(0), pixels.sum(0)

    @jax.jit
    def stat_sums(params, block, rows):
        """Of a block at its rows' best poses: each half-set's exact data diagonal (normalised by
        the block's weight) and that weight, and its data-loss sum and weight."""
        best = _best_pose_particles(block, rows, grid)
        diag = jax.vmap(lambda p: exact_diagonal(p, diag_problem, batch_size, dtype))(best)
        total, weight = jax.vmap(lambda v, p: data_loss_sum(v, p, data_problem, batch_size))(params, best)
        return diag, jnp.sum(best.weight, axis=1), total, weight

    # A start coarser than Fourier shell 2 holds no pose information: low-pass no further.
    initial_lowpass_angstrom = min(float(initial_lowpass_angstrom), box * pixel_size_angstrom / 2.0)
    if resume is None:
        ref = lowpass(reference, pixel_size_angstrom, initial_lowpass_angstrom) * np.asarray(mask)
        init = volume_to_ft(jnp.asarray(ref, dtype), interpolation)
        lp_shell = box * pixel_size_angstrom / initial_lowpass_angstrom
        if scale_reference:
            init = init * _reference_scale(init, _first_particles(stat_blocks()), grid, interpolation, lp_shell,
                                           seed=seed)
        params = jnp.stack([init] * g)
        opt_state = jax.vmap(tx.init)(params)
        rotations = np.broadcast_to(np.eye(3, dtype=dtype), (g, m, 3, 3))
        if local:  # the priors, by position in the half-sets
            rotations = np.array(rotations)
            for pos, block in stat_blocks():
                _put_rows(rotations, pos, np.asarray(block.rotations))
        pose_state = PoseState(jnp.asarray(rotations), jnp.zeros((g, m, 2), dtype), jnp.zeros((g, m), dtype))
        sigma2_0 = sigma2_from_sums(*_block_sums(lambda b, rows: power_sums(jnp.zeros_like(params), b, rows),
                                                 stat_blocks(), pose_state), pool_empty=True)
        history = {"epoch": [], "loss": [], "seconds": [], "resolution_angstrom": [], "angular_step_deg": [],
                   "shift_step_px": [], "r_limit": [], "mean_pose_change_deg": [], "mode": [],
                   "sigma2": [sigma2_0.tolist()],
                   "next": [{"mode": "local" if local else "global", "step_deg": first_local,
                             "shift_step_px": shift_step_px if local else shift_step_px,
                             "r_limit": float(min(grid.radius, math.ceil(lp_shell + 1.0))),  # the low-pass edge ends at cut + 1
                             "global_left": 0 if local else global_epochs}]}
        state = RefineState(ReconState(0, params, opt_state, jax.random.split(key, g), history), pose_state)
    else:
        state = resume
    rec = state.recon
    history = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in rec.history.items()}
    params, opt_state, keys, pose_state = rec.params, rec.opt_state, rec.key, state.poses
    if history.get("shell_lam"):
        problem = dataclasses.replace(problem, shell_lam=tuple(history["shell_lam"][-1]))
    compiled = {}

    def epoch_fn(search, prob, *args):
        """The compiled epoch for these static settings (compiled ahead, its time recorded)."""
        tag = (search, prob)
        if tag not in compiled:
            fn, _ = group_functions(prob, tx, batch_size=batch_size, n_probes=probes, exact=exact,
                                    pose_stage=make_pose_stage(search, grid), mesh=mesh, n_rows=layout.rows,
                                    blocks=True)
            t0 = time.perf_counter()
            compiled.clear()  # one compiled block function at a time: the schedule never goes back
            compiled[tag] = jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile()
            history["compile_seconds"] += time.perf_counter() - t0
        return compiled[tag]

    volume_problem = problem.data_only()  # the Tikhonov weights come in as a dynamic argument
    quantum = max(2, grid.radius // 6)
    pixel_radius = np.linalg.norm(grid.freqs, axis=-1)

    def r_mask(r_limit):
        return jnp.asarray(pixel_radius <= r_limit + 1e-6, dtype)

    def statistics(params, pose_state):
        """At each half-set's best poses, summed over the blocks: exact data diagonal, residual
        power per noise group and shell, data loss."""
        parts = [(stat_sums(params, block, _rows_of(pose_state, pos)), power_sums(params, block,
                                                                                  _rows_of(pose_state, pos)))
                 for pos, block in stat_blocks()]
        if len(parts) == 1:
            (diag, _, total, weight), power = parts[0]
        else:
            w = sum(p[0][1] for p in parts)
            per_group = (g,) + (1,) * (params.ndim - 1)
            diag = sum(p[0][0] * p[0][1].reshape(per_group) for p in parts) / jnp.maximum(w, 1e-12).reshape(per_group)
            total, weight = sum(p[0][2] for p in parts), sum(p[0][3] for p in parts)
            power = tuple(sum(p[1][i] for p in parts) for i in range(2))
        return diag, power, total / jnp.maximum(weight, 1e-12)

    elapsed = history["seconds"][-1] if history["seconds"] else 0.0
    history.setdefault("compile_seconds", 0.0)
    for epoch in range(rec.epoch + 1, epochs + 1):
        plan = dict(history["next"][-1])
        if plan.get("stop"):
            break
        t0 = time.perf_counter()
        mode = "global" if plan["global_left"] > 0 else "local"
        # Static settings change rarely (mode; the frequency limit in steps of `quantum` shells);
        # the exact limit, steps, noise and prior are dynamic arguments.
        # (global epochs compile anyway and dominate the run: their limit is exact)
        q = 1 if mode == "global" else quantum
        r_static = int(min(grid.radius, q * math.ceil(plan["r_limit"] / q)))
        search = PoseSearch(mode=mode, order=global_order, max_shift_px=max_shift_px,
                            shift_step_px=shift_step_px, top_k=top_k, temperature=temperature,
                            r_limit=r_static, interpolation=interpolation,
                            shift_window_px=float(global_shift_window_px) if mode == "global" and epoch > 1 else 0.0,
                            symmetry=str(symmetry),
                            chunk=default_chunk(box, interpolation) if chunk is None else int(chunk))
        sigma2 = np.asarray(history["sigma2"][-1])
        reg = jnp.broadcast_to(problem.regularizer(dtype), grid.volume_shape + (1,))
        args = {"pixel_weights": _pixel_weights(sigma2, grid, dtype) * r_mask(plan["r_limit"]),
                "step_deg": jnp.asarray(plan["step_deg"], dtype),
                "shift_step_px": jnp.asarray(plan["shift_step_px"], dtype), "regularizer": reg}
        diag = None
        if exact:
            diag = statistics(params, pose_state)[0] + 2.0 * reg
        before = np.asarray(pose_state.rotations)
        step0, zero = 0, jnp.zeros((), jnp.int32)
        for pos, block in train_blocks(epoch):
            rows = _rows_of(pose_state, pos)
            inputs = (params, opt_state, keys, block, diag, zero, jnp.asarray(step0, jnp.int32), None, rows, args)
            if mesh is not None:  # particle rows sharded over the devices, everything else replicated
                inputs = tuple(x if i == 3 else dist.replicate(x, mesh) for i, x in enumerate(inputs))
            t1 = time.perf_counter()
            fn = epoch_fn(search, volume_problem, *inputs)
            t0 += time.perf_counter() - t1  # compilation is not run time
            params, opt_state, keys, _, _, rows = fn(*inputs)
            pose_state = rows if pos is None else _scatter_rows(pose_state, pos, rows)
            step0 += -(-layout.rows // batch_size)
        params = _apply_mask(params, mask, interpolation)
        if not bool(jnp.all(jnp.isfinite(params))):
            raise FloatingPointError(f"refine: the half-maps became non-finite in epoch {epoch} "
                                     "(check the images and the reference for NaN/Inf)")
        change = rotation_angle_deg(before, np.asarray(pose_state.rotations))
        real = groups >= 0
        mean_change = float(change[real].mean())
        # Gold-standard bookkeeping from the half-maps: resolution, Wiener prior, noise.
        maps = [np.asarray(ft_to_volume(p, interpolation)) for p in params]
        curve = fsc(*maps)
        res = resolution(curve, pixel_size_angstrom)
        data_diag, power, data_loss = statistics(params, pose_state)
        value = float(jnp.mean(data_loss + jnp.sum(problem.regularizer(dtype) * params * params,
                                                   axis=tuple(range(1, params.ndim)))))
        shell_lam = wiener_shell_lam(curve, np.asarray(data_diag), box, r_max=grid.radius)
        problem = dataclasses.replace(problem, shell_lam=tuple(float(x) for x in shell_lam))
        sig = sigma2_from_sums(*power, pool_empty=True)
        elapsed += time.perf_counter() - t0

        res_shell = box * pixel_size_angstrom / res
        history["epoch"].append(epoch)
        history["loss"].append(value)
        history["seconds"].append(elapsed)
        history["resolution_angstrom"].append(float(res))
        history["angular_step_deg"].append(float(global_step if mode == "global" else plan["step_deg"]))
        history["shift_step_px"].append(float(shift_step_px if mode == "global" else plan["shift_step_px"]))
        history["r_limit"].append(float(plan["r_limit"]))
        history["mean_pose_change_deg"].append(mean_change)
        history["mode"].append(mode)
        if mode == "global" and "global_rotations" not in history:
            history["global_rotations"] = int(poses.global_grid(global_order, str(symmetry)).shape[0])
        history["sigma2"].append(sig.tolist())
        history.setdefault("shell_lam", []).append(list(problem.shell_lam))
        history["fsc"] = curve.tolist()

        # The next epoch's plan.
        nxt = dict(plan)
        nxt["r_limit"] = float(min(grid.radius, math.ceil(res_shell) + margin_shells))
        needed = math.degrees(math.atan(res / max(diameter_angstrom, 1e-6))) * step_fraction
        floor_step = max(min_step_deg, needed)
        if mode == "global":
            nxt["global_left"] = plan["global_left"] - 1
            finer = False
        else:
            finer = plan["step_deg"] / 2 >= floor_step * 0.999 or plan["shift_step_px"] / 2 >= min_shift_step_px
            if plan["step_deg"] / 2 >= floor_step * 0.999:
                nxt["step_deg"] = plan["step_deg"] / 2
            if plan["shift_step_px"] / 2 >= min_shift_step_px:
                nxt["shift_step_px"] = plan["shift_step_px"] / 2
        nxt.update(stop_rule(plan, resolution_angstrom=float(res), mean_change_deg=mean_change,
                             settled_sampling=mode == "local" and not finer, may_stop=epoch >= min_epochs))
        history["next"].append(nxt)
        state = RefineState(ReconState(epoch, params, opt_state, keys, history), pose_state)
        if callback is not None:
            callback(state)

    state = RefineState(ReconState(state.recon.epoch if history["epoch"] else 0, params, opt_state, keys, history),
                        pose_state)
    if final_solve and interpolation in ("nearest", "trilinear") and history["epoch"]:
        # As RELION's last iteration: one more pose pass at the converged maps, oversampled
        # (local, half the last steps), keeping each image's top K poses with their posterior
        # weights; the maps are then solved exactly over those rows (marginalised poses).
        t0 = time.perf_counter()
        last = history["next"][-1]
        search = PoseSearch(mode="local", order=global_order, max_shift_px=max_shift_px, top_k=top_k,
                            temperature=temperature, r_limit=int(min(grid.radius, math.ceil(last["r_limit"]))),
                            interpolation=interpolation,
                            chunk=default_chunk(box, interpolation) if chunk is None else int(chunk))
        args = {"pixel_weights": _pixel_weights(np.asarray(history["sigma2"][-1]), grid, dtype)
                * r_mask(last["r_limit"]),
                "step_deg": jnp.asarray(history["angular_step_deg"][-1] / 2, dtype),
                "shift_step_px": jnp.asarray(history["shift_step_px"][-1] / 2, dtype)}
        k = top_k
        rows_k = np.where(groups[..., None] >= 0,
                          (np.arange(g)[:, None, None] * m + np.arange(m)[None, :, None]) * k + np.arange(k), -1)
        if layout.n_blocks == 1:  # every particle in memory: one pass, kept for the solve
            expanded, pose_state = _final_pose_pass(search, grid, params, stacked, pose_state, args, batch_size)
            history["final_pose_pass_seconds"] = time.perf_counter() - t0
        else:  # streamed: each block's pass as the solve reads it (a block source of candidates)
            expanded = _CandidateBlocks(particles, groups, search, grid, params, pose_state, args, batch_size)
        recon = _final_reconstruction(expanded, rows_k.reshape(g, m * k), state.recon._replace(history=history),
                                      box=box, pixel_size_angstrom=pixel_size_angstrom,
                                      interpolation=interpolation, lam=lam, seed=seed, symmetry=symmetry,
                                      devices=devices, mesh=mesh)
        if layout.n_blocks > 1:
            pose_state = expanded.pose_state
        state = RefineState(recon.state, pose_state)
    else:
        recon = finish(state.recon, interpolation, pixel_size_angstrom)
    rot, shift, prob, half = _unstack_poses(pose_state, groups, n)
    return Refinement(recon, rot, shift, prob, half, state)


@functools.lru_cache(maxsize=4)
def _final_pass_fn(search: PoseSearch, grid: FourierGrid, batch_size: int):
    """The final pose pass over one half-set's block (compiled once per shape)."""
    stage = make_pose_stage(search, grid)
    k = search.top_k

    @jax.jit
    def one_half(p, part, rows, args):
        m = part.weight.shape[0]

        def body(idx):
            r = jax.tree.map(lambda x: x[jnp.maximum(idx, 0)], rows)
            return stage(p, subset(part, idx), r, None, args)
        expanded, new = jax.lax.map(body, batched(jnp.arange(m), batch_size))
        expanded = jax.tree.map(lambda x: x.reshape((-1, k) + x.shape[2:])[:m].reshape((m * k,) + x.shape[2:]),
                                expanded)
        return expanded, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:m], new)
    return one_half


def _final_pose_pass(search: PoseSearch, grid: FourierGrid, params, stacked: Particles, pose_state: PoseState,
                     args, batch_size: int):
    """The pose stage ``search`` over every particle of each half-set at its half-map: the
    expanded rows (G * m * K, particle-major: position j's K candidates at rows j K .. j K + K - 1
    of its half-set's block) with posterior weights, and the new pose state (the best of them)."""
    one_half = _final_pass_fn(search, grid, int(min(batch_size, stacked.weight.shape[1])))
    g = pose_state.max_prob.shape[0]
    outs = [one_half(params[i], jax.tree.map(lambda x: x[i], stacked), jax.tree.map(lambda x: x[i], pose_state), args)
            for i in range(g)]
    expanded = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[o[0] for o in outs])
    new = jax.tree.map(lambda *xs: jnp.stack(xs), *[o[1] for o in outs])
    return expanded, new


class _CandidateBlocks(ParticleBlocks):
    """The final pose pass of a block source, as a block source for the final solve.

    Row r of this set is candidate r % K of half-set position (r // K) % m of half-set
    r // (m K) (the rows of the in-memory pass, :func:`_final_pose_pass`). Each block asked for
    reads its particles from ``source``, runs the pass on them at their half-map and hands out
    the candidates asked for; the best poses are written to ``pose_state`` as they come (the
    searches start from the poses given, so a position in two blocks, or a second sweep for the
    solve's noise-weighted accumulation, gets the same candidates). The pass runs on one device; the blocks are sharded over ``mesh`` afterwards.
    """

    def __init__(self, source: ParticleBlocks, groups, search: PoseSearch, grid: FourierGrid, params,
                 pose_state: PoseState, args, batch_size: int):
        self.source, self.groups, self.search, self.grid = source, np.asarray(groups), search, grid
        self.params, self.args, self.batch_size = params, args, batch_size
        self.start = self.pose_state = pose_state  # the pass searches about start, writes pose_state
        self.k = search.top_k
        g, self.m = self.groups.shape
        self.n_particles = g * self.m * self.k
        self.n_noise_groups, self.dtype = source.n_noise_groups, source.dtype
        self.block_size = None if source.block_size is None else source.block_size * self.k

    def blocks(self, rows_list, mesh=None):
        g, m, k = self.groups.shape[0], self.m, self.k
        for rows in rows_list:
            rows = np.asarray(rows)
            c = rows.shape[1]
            width = -(-c // k) + 1  # positions a block of c candidate rows can touch: one fixed shape
            real = rows >= 0
            pos = np.where(real, (rows // k) % m, -1)
            wanted = -np.ones((g, width), np.int64)
            for h in range(g):
                u = np.unique(pos[h][real[h]])
                wanted[h, :len(u)] = u
            table_rows = np.where(wanted >= 0, np.take_along_axis(self.groups, np.maximum(wanted, 0), 1), -1)
            block = next(iter(self.source.blocks([table_rows])))
            expanded, new = _final_pose_pass(self.search, self.grid, self.params, block,
                                             _rows_of(self.start, wanted), self.args, self.batch_size)
            self.pose_state = _scatter_rows(self.pose_state, wanted, new)
            index = np.zeros((g, c), np.int64)
            for h in range(g):
                slot = np.searchsorted(wanted[h][wanted[h] >= 0], np.maximum(pos[h], 0))
                index[h] = (h * width + slot) * k + rows[h] % k
            flat = jax.tree.map(lambda x: np.asarray(x)[np.where(real, index, 0).ravel()], expanded)
            flat = flat._replace(weight=np.where(real.ravel(), flat.weight, 0).astype(flat.weight.dtype))
            if mesh is None:
                yield jax.tree.map(lambda x: jnp.asarray(x.reshape((g, c) + x.shape[1:])), flat)
            else:
                layout = np.where(real, np.arange(g * c).reshape(g, c), -1)
                yield dist.shard_groups(flat, layout, mesh)


def stop_rule(plan: dict, *, resolution_angstrom: float, mean_change_deg: float, settled_sampling: bool,
              may_stop: bool = True) -> dict:
    """Refine's convergence test, after RELION's auto-refine: stop at the finest sampling once an
    epoch did not improve the best half-map resolution so far (by 1%) and the poses have
    settled: their mean change is under a quarter of the angular step, or no longer falling
    (not 10% under the smallest mean change so far at this sampling).

    Args:
      plan: this epoch's plan (its ``step_deg``; ``best_res`` and ``best_change``: None before any).
      settled_sampling: this epoch was local and the next one samples no finer.
    Returns:
      ``best_res``, ``best_change`` and ``stop`` for the next epoch's plan.
    """
    best_res = plan.get("best_res") or math.inf  # None: nothing yet (JSON has no infinity)
    best_change = plan.get("best_change") or math.inf
    settled = mean_change_deg < 0.25 * plan["step_deg"] or mean_change_deg >= 0.9 * best_change
    return {"best_res": min(best_res, resolution_angstrom),
            "best_change": min(best_change, mean_change_deg) if settled_sampling else None,
            "stop": bool(settled_sampling and may_stop and settled and resolution_angstrom >= 0.99 * best_res)}


def _final_reconstruction(posed: Particles, groups, recon: ReconState, *, box: int,
                          pixel_size_angstrom: float, interpolation: str, lam: float, seed: int, symmetry: str,
                          devices, mesh) -> Reconstruction:
    """The maps at the refined poses, solved exactly: :func:`jaxcryo.reconstruct.reconstruct_normal`
    (normal equations, noise estimate, Wiener prior from the half-maps' FSC) over ``posed``
    (rows at their poses, images shifted back, weights the posterior), with the half-sets'
    rows ``groups``, as RELION's last iteration reconstructs at the converged poses. Nothing is
    masked, as RELION writes its auto-refine map and half-maps (for post-processing with a mask
    of the user's choice): the solvent mask shapes the references between epochs only. A mask
    raises the half-maps' FSC (EMD-5625 at box 56: 10.4 Å masked, 14.1 Å unmasked, where the
    map's FSC to the truth reaches 0.5 at 14.5 Å), and a sphere that cuts the molecule's edge
    lowers the map's FSC to the truth (the same set: 0.591 with the default sphere, 0.614
    without; EMD-1832 at box 64: 0.698 either way)."""
    t0 = time.perf_counter()
    final = reconstruct_normal(posed, box=box, pixel_size_angstrom=pixel_size_angstrom, interpolation=interpolation,
                               lam=lam, seed=seed, symmetry=symmetry, noise_model="estimate", devices=devices,
                               mesh=mesh, groups=groups)
    history = dict(recon.history)
    seconds = time.perf_counter() - t0
    history["final_solve"] = {"seconds": seconds, "compile_seconds": final.history.get("compile_seconds"),
                              "noise_sigma2": final.history.get("noise_sigma2"),
                              "resolution_angstrom": float(final.resolution_angstrom)}
    return Reconstruction(np.asarray(final.volume), np.asarray(final.half_maps), final.params,
                          final.fsc, final.resolution_angstrom, history, recon)


def _unstack_poses(pose_state: PoseState, groups, n: int):
    rot = np.zeros((n, 3, 3), np.float32)
    shift = np.zeros((n, 2), np.float32)
    prob = np.zeros(n, np.float32)
    half = np.zeros(n, np.int64)
    for gi, rows in enumerate(np.asarray(groups)):
        keep = rows >= 0
        rot[rows[keep]] = np.asarray(pose_state.rotations[gi])[keep]
        shift[rows[keep]] = np.asarray(pose_state.shifts_px[gi])[keep]
        prob[rows[keep]] = np.asarray(pose_state.max_prob[gi])[keep]
        half[rows[keep]] = gi + 1
    return rot, shift, prob, half
