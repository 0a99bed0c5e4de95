"""Ab initio reconstruction: a map from particles with no poses and no reference.

Stochastic gradient descent on the expected loss under a posterior over poses, as cryoSPARC's
ab initio and RELION 3.1's SGD initial model do, with the preconditioned SGD of the paper in
the volume step. Every minibatch step is the two stages of the refine driver:

1. **pose stage**: each image is scored against projections of the current map over a global
   SO(3) grid x a shift grid (:func:`jaxcryo.poses.score_poses`, dense products) at the
   current frequency limit; the scores (Gaussian log-likelihoods under a white noise model
   estimated from the images) are divided by an **adaptive temperature** T >= 1, chosen by
   bisection so that the posterior's perplexity (exp of its entropy) is a target fraction of
   all poses (1% early on, as cryoSPARC tunes its noise scale, annealed to 0.1%); K poses per
   image are **drawn** from that posterior (with replacement, weight 1/K each), so that the
   minibatch loss over the B x K rows is an unbiased estimate of the posterior-expected loss.
2. **volume step**: the optax transform (psgd by default: Hutchinson diagonal, Armijo step)
   on that expanded batch, as in :func:`jaxcryo.reconstruct.reconstruct`, with the gradient
   restricted to the Fourier shells inside the current limit (+1): a preconditioner equalises
   the shells' step sizes, so without this restriction psgd fits high frequencies from wrong
   early poses at once and locks into a bad map (measured; plain SGD's small high-frequency
   curvature hides the problem by learning them slowly).

Around the compiled epoch a schedule (:func:`schedule`) marches the frequency limit from
``start_resolution_angstrom`` (35 A) to ``final_resolution_angstrom`` (about 12-15 A; never
finer than 2.5 pixels), with minibatches growing from ``batch_size`` to ``max_batch_size``
on a global SO(3) grid of HEALPix order 1 (30 deg). Then a few **polishing** epochs
(:func:`make_local_stage`) search each image only about its best pose, with angular and shift
steps halving from epoch to epoch (15, 7.5, 3.75, 1.9 deg by default), while the map keeps
taking the same volume steps: the poses end far finer than the global grid at a small
fraction of the cost of a finer global grid. By default this is done twice (``cycles=2``): one
more global epoch with the polished map re-assigns some particles the early map had misplaced,
then the polishing is repeated (measured at SNR 0.1: median error 3.3 -> 2.7 degrees).
Only Fourier pixels inside the limit are used (the particles are cropped to that disk), so
early epochs are cheap. Last, a **refine stage** (``refine_epochs``, :func:`_refine_stage`):
:func:`jaxcryo.refine.refine` from the SGD map, whose 15 deg global search places most of the
particles the SGD left at wrong poses (about a third at SNR 0.1), then its local searches
and final solve; the map and poses returned are refine's. The start is a soft sphere of
``diameter_angstrom`` plus low-passed random noise (seeded), scaled to the images' power.

The hand of the result is undetermined: a map and its mirror image explain every projection
equally well (with poses M A M, M = diag(1, 1, -1)). :func:`flip_hand` gives the other one.
With a point-group ``symmetry`` the volume step is symmetric by construction (each image at
its pose composed with every group element); several classes (K > 1) are not implemented yet.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcryo import poses
from jaxcryo.curvature import batch_exact_diagonal, rademacher, symmetrize_diagonal
from jaxcryo.forward.ctf import conj_multiply, shift_phase
from jaxcryo.forward.model import Particles, ctf_batch, ft_to_volume, slices, volume_to_ft
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.geometry import random_rotations, spherical_mask, volume_radius
from jaxcryo.loss import Problem, batched, loss, subset, value_grad_hvp
from jaxcryo.reconstruct import ReconState, make_optimizer

__all__ = ["AbInitioState", "AbInitio", "abinitio", "schedule", "initial_volume", "flip_hand", "recentre",
           "flip_rotations", "global_alignment", "pose_errors_deg", "adaptive_temperature"]

MIRROR = np.diag([1.0, 1.0, -1.0])
_COMPILED: dict = {}  # compiled epochs of named methods, shared by runs with the same static settings


class AbInitioState(NamedTuple):
    """Everything needed to continue a run: epochs done, map pairs (N, N, H, 2), optimizer
    state, PRNG key, each particle's best pose so far (rotations (n, 3, 3), shifts_px (n, 2),
    max_prob (n,)) and the history."""

    epoch: int
    params: Any
    opt_state: Any
    key: Any
    rotations: Any
    shifts_px: Any
    max_prob: Any
    history: dict

    def to_recon_state(self) -> ReconState:
        """As a :class:`~jaxcryo.reconstruct.ReconState` (poses carried with the optimizer
        state), e.g. for :func:`jaxcryo.pipeline.save_checkpoint`."""
        return ReconState(self.epoch, self.params, (self.opt_state, self.rotations, self.shifts_px, self.max_prob),
                          self.key, self.history)

    @classmethod
    def from_recon_state(cls, state: ReconState) -> "AbInitioState":
        opt_state, rot, shift, prob = state.opt_state
        return cls(state.epoch, state.params, opt_state, state.key, rot, shift, prob, dict(state.history))


class AbInitio(NamedTuple):
    """Result of :func:`abinitio`: volume (N, N, N) real map (one hand, see :func:`flip_hand`;
    centred, see :func:`recentre`: the state keeps the uncentred map and shifts);
    per particle in input order: rotations (n, 3, 3) RELION matrices, shifts_px (n, 2) beyond the
    shift already undone in the data, max_prob (n,); history (dict of per-epoch lists); state."""

    volume: np.ndarray
    rotations: np.ndarray
    shifts_px: np.ndarray
    max_prob: np.ndarray
    history: dict
    state: AbInitioState


# ----------------------------------------------------------------------------- hand and alignment


def flip_hand(volume) -> np.ndarray:
    """The mirror image of a real (N, N, N) map (z -> -z about the centre voxel N//2)."""
    v = np.asarray(volume)
    out = v[::-1]
    if v.shape[0] % 2 == 0:  # index i -> N - i keeps voxel N//2 in place
        out = np.roll(out, 1, axis=0)
    return np.ascontiguousarray(out)


def flip_rotations(rotations) -> np.ndarray:
    """Poses of the mirrored map: M A M with M = diag(1, 1, -1) (same images, same shifts)."""
    r = np.asarray(rotations, np.float64)
    return (MIRROR @ r @ MIRROR).astype(np.asarray(rotations).dtype)


def _project_so3(m):
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def global_alignment(estimated, truth, iters: int = 3):
    """The global rotation G with estimated_i ~ truth_i G (a map rotated by G^T relative to
    the truth has these poses): the SO(3) projection of mean(truth_i^T estimated_i), re-fitted
    ``iters`` times on the better half of the particles. Returns (G (3, 3), errors_deg (n,))."""
    est = np.asarray(estimated, np.float64)
    tru = np.asarray(truth, np.float64)
    keep = np.ones(len(est), bool)
    g = np.eye(3)
    for _ in range(iters + 1):
        g = _project_so3(np.einsum("nji,njk->ik", tru[keep], est[keep]))
        err = poses.geodesic_distance_deg(tru @ g, est)
        keep = err <= np.median(err)
    return g, poses.geodesic_distance_deg(tru @ g, est)


def _symmetric_alignment(estimated, truth, ops, iters: int = 3, seeds: int = 8):
    """As :func:`global_alignment` for a map with point group ``ops`` (G, 3, 3): the poses A and
    A g (g in the group) give the same images, so estimated_i ~ truth_i g_i G with a g_i of each
    particle's own. Candidates for G from a few particles and every g, each re-fitted with the
    per-particle best g_i; the one with the smallest median error wins."""
    est = np.asarray(estimated, np.float64)
    variants = np.einsum("nij,gjk->ngik", np.asarray(truth, np.float64), ops)  # (n, G, 3, 3)
    n, n_ops = variants.shape[:2]

    def errors(g):
        d = poses.geodesic_distance_deg(variants @ g, np.broadcast_to(est[:, None], variants.shape))
        return d.min(1), d.argmin(1)

    best = (np.inf, np.eye(3), None)
    for i in range(min(seeds, n)):
        for j in range(n_ops):
            g = variants[i, j].T @ est[i]
            for _ in range(iters):
                err, pick = errors(g)
                keep = err <= np.median(err)
                g = _project_so3(np.einsum("nji,njk->ik", variants[np.arange(n), pick][keep], est[keep]))
            err, _ = errors(g)
            if np.median(err) < best[0]:
                best = (float(np.median(err)), g, err)
    return best[1], best[2]


def pose_errors_deg(estimated, truth, symmetry: str = "C1"):
    """Angular errors (n,) of estimated poses after the best global rotation, either hand
    (the hand whose median error is smaller), and the hand: (errors, flipped). With a
    ``symmetry`` each particle's error is to the nearest of its G equivalent true poses."""
    from jaxcryo.symmetry import symmetry_matrices

    ops = symmetry_matrices(symmetry)
    if ops.shape[0] == 1:
        align = global_alignment
    else:
        def align(e, t):
            return _symmetric_alignment(e, t, np.asarray(ops, np.float64))
    _, direct = align(estimated, truth)
    _, mirrored = align(flip_rotations(estimated), truth)
    if np.median(mirrored) < np.median(direct):
        return mirrored, True
    return direct, False


# ----------------------------------------------------------------------------- schedule


def schedule(*, epochs: int, box: int, pixel_size_angstrom: float, start_resolution_angstrom: float = 35.0,
             final_resolution_angstrom: float | None = None, batch_size: int = 64, max_batch_size: int = 256,
             n_particles: int | None = None, fine_from: float = 2.0, max_shift_px: float | None = None,
             levels: int = 3, local_epochs: int = 4, local_step_deg: float | None = None,
             min_local_step_deg: float = 1.0, cycles: int = 2):
    """The per-epoch settings: a list of dicts with ``r_limit`` (Fourier pixels scored, may be
    fractional), ``r_static`` (pixels fitted; fixes shapes), ``resolution_angstrom``,
    ``batch_size``, ``order`` (HEALPix order of the SO(3) grid), ``max_shift_px``,
    ``shift_step_px`` and ``target_fraction`` (posterior perplexity target).

    The frequency limit is linear in 1/resolution from the start to the final resolution
    (default max(12 A, 2.5 px)) over the epochs. Shapes change only at ``levels`` steps of the
    static limit (each a recompilation): the minibatch grows geometrically from level to level,
    the SO(3) grid is order 1 (30 deg) before ``fine_from`` of the march and order 2 (15 deg)
    from the level that reaches it on (default never: the polishing epochs refine the poses at
    a small fraction of the cost of a global 15 deg grid); the shift step is a quarter of the level's resolution
    (at least one pixel).

    Then ``local_epochs`` polishing epochs (``mode`` 'local', :func:`make_local_stage`) at the
    last epoch's limit (the final one) and minibatch size: each image is searched only about its best pose,
    with an angular step ``step_deg`` from ``local_step_deg`` (default half the last global
    grid step) halving every epoch down to ``min_local_step_deg``, and a shift step from half
    the last global one halving down to a quarter pixel. With ``cycles`` > 1 (default 2), the last global
    epoch and the polishing epochs are repeated (cycles - 1) times: a global search with the
    polished map re-assigns particles that the earlier, blurrier map had put at wrong poses
    (local searches cannot move them far).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    nyquist_shell = box // 2 - 1
    final = max(12.0, 2.5 * pixel_size_angstrom) if final_resolution_angstrom is None else final_resolution_angstrom
    start = max(start_resolution_angstrom, final)
    max_shift_px = min(box / 6.0, max(3.0, 0.1 * box)) if max_shift_px is None else float(max_shift_px)
    r0 = min(nyquist_shell, box * pixel_size_angstrom / start)
    r1 = min(nyquist_shell, box * pixel_size_angstrom / final)
    levels = max(1, int(levels))
    tops = [int(min(nyquist_shell, max(2, math.ceil(r0 + (r1 - r0) * (j + 1) / levels)))) for j in range(levels)]
    out = []
    for e in range(epochs):
        f = e / max(epochs - 1, 1)
        r = r0 + (r1 - r0) * f
        j = next(i for i, t in enumerate(tops) if r <= t + 1e-9)
        g = j / max(levels - 1, 1)
        b = int(round(batch_size * (max_batch_size / batch_size) ** g))
        if n_particles is not None:
            b = min(b, n_particles)
        level_res = box * pixel_size_angstrom / tops[j]
        step = max(1.0, 0.25 * level_res / pixel_size_angstrom)
        out.append({"r_limit": float(max(r, 1.0)), "r_static": tops[j],
                    "resolution_angstrom": float(box * pixel_size_angstrom / max(r, 1.0)), "batch_size": b,
                    "order": 1 if (g < fine_from or levels == 1) else 2, "max_shift_px": max_shift_px,
                    "shift_step_px": float(min(step, max(max_shift_px, 1.0))),
                    "target_fraction": float(0.01 * 0.1 ** f), "mode": "global",
                    "step_deg": poses.angular_step_deg(1 if (g < fine_from or levels == 1) else 2)})
    last = out[-1]
    step = 0.5 * last["step_deg"] if local_step_deg is None else float(local_step_deg)
    shift = 0.5 * last["shift_step_px"]
    polish = []
    for _ in range(int(local_epochs)):
        polish.append(dict(last, mode="local", step_deg=float(step), shift_step_px=float(shift), target_fraction=0.0))
        step = max(0.5 * step, float(min_local_step_deg))
        shift = max(0.5 * shift, 0.25)
    out += polish
    for _ in range(max(int(cycles), 1) - 1):
        out += [dict(last)] + [dict(x) for x in polish]
    return out


# ----------------------------------------------------------------------------- start


def initial_volume(box: int, pixel_size_angstrom: float, *, diameter_angstrom: float | None = None,
                   resolution_angstrom: float = 35.0, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    """A featureless start: a soft sphere of ``diameter_angstrom`` (default 0.7 of the box)
    plus ``noise`` times low-passed Gaussian noise inside it (seeded), low-passed to
    ``resolution_angstrom``; unit maximum."""
    diameter_angstrom = 0.7 * box * pixel_size_angstrom if diameter_angstrom is None else diameter_angstrom
    radius_px = 0.5 * diameter_angstrom / pixel_size_angstrom
    sphere = spherical_mask(box, radius_px, soft_width=2.0)
    rng = np.random.default_rng(seed)
    v = sphere * (1.0 + noise * rng.standard_normal((box,) * 3))
    k = np.fft.fftfreq(box, 1.0 / box)
    kx = np.arange(box // 2 + 1)
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    cut = box * pixel_size_angstrom / resolution_angstrom
    filt = np.exp(-0.5 * (r / max(cut, 1.0)) ** 2)
    v = np.fft.irfftn(np.fft.rfftn(v) * filt, s=v.shape, axes=(0, 1, 2))
    return (v / np.abs(v).max()).astype(np.float32)


def _noise_power(data, grid: FourierGrid) -> float:
    """White noise power per pixel pair, E|n|^2: the images' mean power in the outer third
    of the disk (where a molecule's signal is weakest)."""
    radius = np.linalg.norm(grid.freqs, axis=-1)
    outer = radius > 0.66 * grid.radius
    y2 = np.asarray(jnp.sum(jnp.asarray(data)[:, outer] ** 2, -1))
    return float(y2.mean())


def _match_scale(params, particles: Particles, grid: FourierGrid, r_limit: int, sigma2: float, interpolation: str,
                 seed: int, n_sample: int = 256):
    """Scale making the start's projections (random poses, CTF) carry the images' power above
    the noise, inside the first ``r_limit`` shells."""
    n = min(particles.data.shape[0], n_sample)
    inner = np.linalg.norm(grid.freqs, axis=-1) <= r_limit
    data = jnp.asarray(particles.data[:n])
    y2 = float(jnp.mean(jnp.sum(data[:, inner] ** 2, -1)))
    rot = random_rotations(jax.random.PRNGKey(seed + 11), n, data.dtype)
    ctf = None if particles.ctf is None else jax.tree.map(lambda x: jnp.asarray(x)[:n], particles.ctf)
    a = slices(params, rot, grid, interpolation) * ctf_batch(ctf, grid, n, data.dtype)[..., None]
    a2 = float(jnp.mean(jnp.sum(a[:, inner] ** 2, -1)))
    return math.sqrt(max(y2 - sigma2, 0.05 * y2) / max(a2, 1e-30))


# ----------------------------------------------------------------------------- pose stage


def adaptive_temperature(scores, weight, target_fraction, *, iters: int = 24, max_log_t: float = 20.0):
    """Temperature T >= 1 at which the posterior softmax(scores / T) of the real images
    (weight > 0) has, on average, a perplexity exp(entropy) of ``target_fraction`` of the
    candidates; bisection on log T (the entropy grows with T). scores (B, C)."""
    n_cand = scores.shape[-1]
    goal = jnp.log(jnp.maximum(target_fraction * n_cand, 1.0))
    w = weight / jnp.maximum(jnp.sum(weight), 1e-12)
    s = scores - jnp.max(scores, axis=-1, keepdims=True)

    def entropy(log_t):
        logp = jax.nn.log_softmax(s / jnp.exp(log_t), axis=-1)
        return jnp.sum(w * -jnp.sum(jnp.exp(logp) * logp, axis=-1))

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        low = entropy(mid) < goal
        return jnp.where(low, mid, lo), jnp.where(low, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (jnp.zeros((), s.dtype), jnp.asarray(max_log_t, s.dtype)))
    return jnp.exp(0.5 * (lo + hi))


def _shifted(data, shifts_px, grid: FourierGrid):
    """Images (B, P, 2) translated back by per-row shifts (B, K, 2) -> (B, K, P, 2)."""
    ramps = jax.vmap(jax.vmap(lambda t: shift_phase(grid.freqs, t, grid.box)))(shifts_px.astype(data.dtype))
    return conj_multiply(ramps, data[:, None])


def _draw_and_expand(batch: Particles, scores, pose_of, key, args, n_samples: int, grid: FourierGrid):
    """The end of both pose stages: from each image's scores (B, ...) over its candidates, the
    adaptive temperature, ``n_samples`` poses drawn from the tempered posterior, and the batch
    expanded to those B * n_samples rows (images shifted back, weights split evenly).
    ``pose_of(index (B, K))`` -> rotations (B, K, 3, 3) and shifts (B, K, 2) of flat candidate
    indices. Returns (expanded batch, (best rotations, best shifts, max_prob), temperature)."""
    dtype = batch.data.dtype
    b = batch.data.shape[0]
    flat = scores.reshape(b, -1)
    t = jnp.maximum(adaptive_temperature(flat, batch.weight, args["target_fraction"]), 1.0)
    logits = flat / t
    draws = jax.random.categorical(key, logits, axis=-1, shape=(n_samples, b)).T  # (B, K)
    best = jnp.argmax(logits, axis=-1)
    max_prob = jnp.exp(jnp.max(logits, -1) - jax.nn.logsumexp(logits, -1))
    rot, shift = pose_of(draws)
    data = _shifted(batch.data, shift, grid)
    ctf = None if batch.ctf is None else jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), n_samples, 0), batch.ctf)
    expanded = Particles(data=data.reshape((b * n_samples,) + data.shape[2:]),
                         rotations=rot.reshape(b * n_samples, 3, 3), ctf=ctf,
                         weight=jnp.repeat(batch.weight / n_samples, n_samples))
    best_rot, best_shift = pose_of(best[:, None])
    return expanded, (best_rot[:, 0], best_shift[:, 0], max_prob.astype(dtype)), t


def make_pose_stage(grid: FourierGrid, *, order: int, max_shift_px: float, shift_step_px: float, n_samples: int,
                    interpolation: str, chunk: int = 2048, symmetry: str = "C1"):
    """The ab initio pose stage, with the refine driver's slot signature:
    stage(params, batch, rows, key, args) -> (expanded batch of B * n_samples rows, new rows).

    ``rows`` = (rotations, shifts_px, max_prob) of the batch; ``args``: ``pixel_weights`` (P,)
    (multiplicity / sigma^2) and ``target_fraction``. The new rows hold each image's best pose
    and its posterior probability; ``args`` come back with the temperature used as ``T``.
    """
    grid_rot = jnp.asarray(poses.global_grid(order, symmetry))  # an asymmetric unit of the map's group
    grid_shift = jnp.asarray(poses.shift_grid(max_shift_px, shift_step_px))
    n_shift = grid_shift.shape[0]

    def stage(params, batch: Particles, rows, key, args):
        dtype = batch.data.dtype
        b = batch.data.shape[0]
        c = ctf_batch(batch.ctf, grid, b, dtype)
        scores = poses.score_poses(params, batch.data, c, grid_rot.astype(dtype), grid_shift.astype(dtype), grid,
                                   pixel_weights=args["pixel_weights"], interpolation=interpolation, chunk=chunk)
        rot, shift = grid_rot.astype(dtype), grid_shift.astype(dtype)
        return _draw_and_expand(batch, scores, lambda i: (rot[i // n_shift], shift[i % n_shift]), key, args,
                                n_samples, grid)

    return stage


def make_local_stage(grid: FourierGrid, *, local_n: int = 1, shift_n: int = 1, n_samples: int,
                     interpolation: str, chunk: int = 4096):
    """The polishing pose stage: each image is scored only near its best pose so far, over the
    (2 local_n + 1)^3 rotations :func:`jaxcryo.poses.local_rotations` (step ``args['step_deg']``)
    x the (2 shift_n + 1)^2 shifts :func:`jaxcryo.poses.local_shifts` (step
    ``args['shift_step_px']``) about it, and ``n_samples`` poses are drawn from that local
    posterior at the adaptive temperature (``args['target_fraction']`` of the local candidates;
    0 gives T = 1, the Bayesian posterior). Same signature and outputs as
    :func:`make_pose_stage`; the new rows are the local maximum, so each polishing epoch can
    move a pose by up to sqrt(3) local_n steps and the steps can shrink from epoch to epoch
    without recompiling (they are traced)."""

    def stage(params, batch: Particles, rows, key, args):
        dtype = batch.data.dtype
        b = batch.data.shape[0]
        c = ctf_batch(batch.ctf, grid, b, dtype)
        cand_rot = poses.local_rotations(rows[0].astype(dtype), args["step_deg"], local_n)  # (B, L, 3, 3)
        cand_shift = poses.local_shifts(rows[1].astype(dtype), args["shift_step_px"], shift_n)  # (B, S, 2)
        n_shift = cand_shift.shape[1]
        scores = poses.score_local(params, batch.data, c, cand_rot, cand_shift, grid,
                                   pixel_weights=args["pixel_weights"], interpolation=interpolation, chunk=chunk)
        rows_b = jnp.arange(b)[:, None]
        return _draw_and_expand(batch, scores, lambda i: (cand_rot[rows_b, i // n_shift],
                                                          cand_shift[rows_b, i % n_shift]),
                                key, args, n_samples, grid)

    return stage


# ----------------------------------------------------------------------------- epoch


def _make_epoch(problem: Problem, tx, stage, *, batch_size: int, n_probes: int, exact: bool):
    """One pass over the particles: shuffled minibatches, each a pose stage then a volume step."""

    def step(carry, index, particles, args):
        params, opt_state, key, pose_rows = carry
        key, pose_key, probe_key = jax.random.split(key, 3)
        batch = subset(particles, index)
        rows = jax.tree.map(lambda x: x[jnp.maximum(index, 0)], pose_rows)
        expanded, new_rows, temperature = stage(params, batch, rows, pose_key, args)
        where = jnp.where(index >= 0, index, pose_rows[0].shape[0])
        pose_rows = jax.tree.map(lambda s, r: s.at[where].set(r.astype(s.dtype), mode="drop"), pose_rows, new_rows)
        probes = rademacher(probe_key, params, n_probes) if (n_probes and not exact) else None
        value, grad, hvps = value_grad_hvp(params, expanded, problem, probes)
        grad = grad * args["volume_mask"]  # only shells inside the current limit move
        extra = {}
        if exact:
            extra["diag_sample"] = batch_exact_diagonal(expanded, problem.data_only(), params.dtype) \
                + 2.0 * problem.regularizer(params.dtype)
        elif probes is not None:
            extra["diag_sample"] = symmetrize_diagonal(jnp.mean(probes * hvps, axis=0), problem)
        updates, opt_state = tx.update(grad, opt_state, params, value=value, grad=grad,
                                       value_fn=lambda p: loss(p, expanded, problem), **extra)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, key, pose_rows), (value, temperature)

    def epoch(params, opt_state, key, particles, pose_rows, args):
        key, perm_key = jax.random.split(key)
        order = batched(jax.random.permutation(perm_key, particles.weight.shape[0]), batch_size)
        (params, opt_state, key, pose_rows), (values, temps) = jax.lax.scan(
            lambda c, i: step(c, i, particles, args), (params, opt_state, key, pose_rows), order)
        return params, opt_state, key, pose_rows, values, temps

    return epoch


def recentre(volume, rotations, shifts_px):
    """The map moved by whole voxels so that its centre of (positive) mass is at voxel N//2,
    and the particles' shifts changed to match (same images): a translated map fits as well as
    the map, so ab initio leaves it wherever it drifted, and a refine whose shift search is
    about zero would miss it. Returns (volume, shifts_px); shifts + (A m)_xy for a move m (x, y, z)."""
    v = np.asarray(volume, np.float64)
    w = np.clip(v, 0.0, None)
    if w.sum() <= 0:
        return np.asarray(volume), np.asarray(shifts_px)
    c = np.arange(v.shape[0]) - v.shape[0] // 2
    com = [float((w.sum(axis=tuple(j for j in range(3) if j != i)) * c).sum() / w.sum()) for i in range(3)]
    move = [-int(round(x)) for x in com]  # along axes (z, y, x)
    moved = np.roll(v, move, axis=(0, 1, 2)).astype(np.asarray(volume).dtype)
    m_xyz = np.asarray(move[::-1], np.float64)
    shifts = np.asarray(shifts_px, np.float64) + np.einsum("nij,j->ni", np.asarray(rotations, np.float64), m_xyz)[:, :2]
    return moved, shifts.astype(np.asarray(shifts_px).dtype)


def _crop(particles: Particles, full: FourierGrid, small: FourierGrid) -> Particles:
    """Particles restricted to the pixels of a smaller disk (same order as ``small``)."""
    idx = np.searchsorted(full.flat_index, small.flat_index)
    return particles._replace(data=jnp.asarray(particles.data)[:, idx])


def abinitio(particles: Particles, *, box: int, pixel_size_angstrom: float, epochs: int = 8,
             diameter_angstrom: float | None = None, start_resolution_angstrom: float = 35.0,
             final_resolution_angstrom: float | None = None, batch_size: int = 64, max_batch_size: int = 256,
             n_samples: int = 4, fine_from: float = 2.0, method: str | optax.GradientTransformation = "psgd-exact",
             interpolation: str = "trilinear", max_shift_px: float | None = None, lam: float = 1e-3,
             n_probes: int = 1, classes: int = 1, symmetry: str = "C1", seed: int = 0,
             resume: AbInitioState | None = None, callback: Callable[[AbInitioState], Any] | None = None,
             settings: list | None = None, initial=None, local_epochs: int = 4,
             local_step_deg: float | None = None, cycles: int = 2, refine_epochs: int = 12,
             refine_settings: dict | None = None, refine_callback: Callable | None = None,
             refine_resume=None) -> AbInitio:
    """A map and poses from particles alone (see the module docstring for the algorithm).

    Args:
      particles: :class:`Particles` on ``FourierGrid(box)`` (their ``rotations`` are ignored;
        ``data`` with any known shift already undone, else zeros).
      epochs: passes over the particles with global searches; the schedule (:func:`schedule`)
        spreads the frequency march, the minibatch growth and the grid refinement over them.
      diameter_angstrom: particle diameter (the start's sphere and the solvent mask);
        default 0.7 of the box.
      start_resolution_angstrom, final_resolution_angstrom: the frequency march (35 A to
        max(12 A, 2.5 px) by default).
      batch_size, max_batch_size: first and last minibatch size.
      n_samples: poses drawn per image from the tempered posterior in each step.
      fine_from: fraction of the march after which the global SO(3) grid is 15 deg (> 1, the
        default: 30 deg always).
      local_epochs, local_step_deg: polishing epochs after the march (local searches about each
        image's best pose, at the final limit; angular step from ``local_step_deg``, default half
        the global step, halving each epoch; see :func:`schedule`).
      cycles: with > 1, one more global epoch then the polishing epochs again, (cycles - 1)
        times (see :func:`schedule`).
      method: 'psgd' (Hutchinson diagonal), 'psgd-exact' (the exact posterior-weighted
        diagonal of each minibatch), 'sgd', 'adam' or an optax transform.
      max_shift_px: shift search radius in pixels (default a tenth of the box, within 3 px to
        box / 6; the polishing epochs can move a shift beyond it).
      lam: Tikhonov weight.
      classes: only 1 for now.
      symmetry: point group (RELION's symbol, :mod:`jaxcryo.symmetry`): the volume step uses
        each image at its pose composed with every group element (as refine and reconstruct),
        so the map is symmetric by construction, with its symmetry axes RELION's (z for Cn);
        the global pose search scores one pose per orbit (:func:`jaxcryo.poses.global_grid`:
        each image's G equivalent poses would score alike), so about 1/G of the grid.
      refine_epochs: then refine the poses and the map from the ab initio map (at most this many
        epochs of :func:`jaxcryo.refine.refine`, gold-standard, global search first, its stop
        rule; 0: return the SGD map and its poses). The SGD stage leaves about a third of the
        particles at grossly wrong poses at SNR 0.1 (its global grid is 30 deg, its last map
        about 14 A); refine's 15 deg global search from that map's 40 A low-pass places nearly
        all of them (measured on RELION-simulated EMD-1832 particles: median error 2.7 -> 1.2
        deg, within 15 deg 64% -> 96%, for about 100 s more on 2 CPU cores). The map is
        low-passed first (see :func:`_refine_stage`).
        ``refine_settings``: more keyword settings for it (e.g. ``global_order``);
        ``refine_callback`` receives its :class:`jaxcryo.refine.RefineState` after each epoch
        (a checkpoint of the stage) and ``refine_resume`` continues from one; it must come from
        the same SGD result (the CLI keeps it beside the SGD checkpoint, with the same settings).
      resume, callback: continue from / receive an :class:`AbInitioState` after each epoch.
      settings: replace the schedule (a list as :func:`schedule` returns).
      initial: a real (box,)*3 starting map instead of :func:`initial_volume` (e.g. for tests).
    Returns:
      :class:`AbInitio`; history per epoch: ``epoch``, ``loss`` (mean minibatch expected
      loss), ``seconds`` (cumulative, compilation excluded), ``resolution_angstrom`` (the
      limit in use), ``r_limit``, ``batch_size``, ``angular_step_deg``, ``temperature``; with
      the refine stage, ``refine``: its per-epoch history (``epoch``, ``mode``,
      ``angular_step_deg``, ``resolution_angstrom`` of the half-maps' FSC, ``mean_pose_change_deg``,
      ``seconds``) and ``final_resolution_angstrom``, ``wall_seconds``. The volume and poses
      returned are then refine's (its map solved at the refined poses, unmasked).
    """
    if int(classes) != 1:
        raise NotImplementedError(f"classes={classes}: several classes are not implemented yet (use 1)")
    full = FourierGrid(box)
    dtype = jnp.asarray(particles.data).dtype
    n = int(particles.weight.shape[0])
    plan = settings if settings is not None else schedule(
        epochs=epochs, box=box, pixel_size_angstrom=pixel_size_angstrom,
        start_resolution_angstrom=start_resolution_angstrom, final_resolution_angstrom=final_resolution_angstrom,
        batch_size=batch_size, max_batch_size=max_batch_size, n_particles=n, max_shift_px=max_shift_px,
        fine_from=fine_from, local_epochs=local_epochs, local_step_deg=local_step_deg, cycles=cycles)
    given_diameter = diameter_angstrom  # refine's solvent mask: the user's, else refine's own default
    diameter_angstrom = 0.7 * box * pixel_size_angstrom if diameter_angstrom is None else diameter_angstrom
    mask = jnp.asarray(spherical_mask(box, 0.5 * diameter_angstrom / pixel_size_angstrom + 2, soft_width=3.0), dtype)
    sigma2 = _noise_power(particles.data, full)
    if isinstance(method, str):
        tx = make_optimizer(method, box=box, r_max=full.radius, warmup=2, n_probes=n_probes, seed=seed)
        exact, probes = method == "psgd-exact", (n_probes if method == "psgd" else 0)
    else:
        tx, exact, probes = optax.with_extra_args_support(method), False, n_probes

    if resume is None:
        key = jax.random.PRNGKey(seed)
        start = initial_volume(box, pixel_size_angstrom, diameter_angstrom=diameter_angstrom,
                               resolution_angstrom=start_resolution_angstrom, seed=seed) if initial is None else initial
        params = volume_to_ft(jnp.asarray(start, dtype), interpolation)
        params = params * _match_scale(params, particles, full, plan[0]["r_static"], sigma2, interpolation, seed)
        state = AbInitioState(0, params, tx.init(params), key, jnp.broadcast_to(jnp.eye(3, dtype=dtype), (n, 3, 3)),
                              jnp.zeros((n, 2), dtype), jnp.zeros(n, dtype),
                              {"epoch": [], "loss": [], "seconds": [], "resolution_angstrom": [], "r_limit": [],
                               "batch_size": [], "angular_step_deg": [], "temperature": [], "compile_seconds": [0.0]})
    else:
        state = resume
    history = {k: list(v) for k, v in state.history.items()}
    params, opt_state, key = jnp.asarray(state.params), state.opt_state, state.key
    pose_rows = (state.rotations, state.shifts_px, state.max_prob)
    compiled: dict = {}

    @jax.jit
    def masked(p):
        return volume_to_ft(ft_to_volume(p, interpolation) * mask, interpolation)

    for e in range(state.epoch, len(plan)):
        s = plan[e]
        t0 = time.perf_counter()
        small = FourierGrid(box, int(s["r_static"]))
        problem = Problem(grid=small, interpolation=interpolation, lam=lam, symmetry=symmetry)
        mode = s.get("mode", "global")
        tag = (small, s["batch_size"], mode) + ((s["order"], s["max_shift_px"], s["shift_step_px"])
                                                if mode == "global" else ())
        cropped = _crop(particles, full, small)
        inside = np.linalg.norm(small.freqs, axis=-1) <= s["r_limit"] + 1e-6
        args = {"pixel_weights": jnp.asarray(small.multiplicity * inside / sigma2, dtype),
                "volume_mask": jnp.asarray((volume_radius(box) <= s["r_limit"] + 1.0)[..., None], dtype),
                "target_fraction": jnp.asarray(s["target_fraction"], dtype),
                "step_deg": jnp.asarray(s.get("step_deg", poses.angular_step_deg(s["order"])), dtype),
                "shift_step_px": jnp.asarray(s["shift_step_px"], dtype)}
        inputs = (params, opt_state, key, cropped, pose_rows, args)
        # A named method's transform is a function of these settings only, so its compiled epoch
        # can be reused by a later run (a resume, a second seed) in the same process.
        shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(inputs))
        tag = tag + (problem, n_samples, interpolation, probes, exact, shapes)
        cache = _COMPILED if isinstance(method, str) else compiled
        tag = tag + ((method, n_probes) if isinstance(method, str) else ())  # the seed only sets initial states
        if tag not in cache:
            if mode == "global":
                stage = make_pose_stage(small, order=s["order"], max_shift_px=s["max_shift_px"],
                                        shift_step_px=s["shift_step_px"], n_samples=n_samples,
                                        interpolation=interpolation, symmetry=symmetry)
            else:
                stage = make_local_stage(small, n_samples=n_samples, interpolation=interpolation)
            fn = _make_epoch(problem, tx, stage, batch_size=int(s["batch_size"]), n_probes=probes, exact=exact)
            if len(cache) > 16:
                cache.clear()
            cache[tag] = jax.jit(fn).lower(*inputs).compile()
            history["compile_seconds"][0] += time.perf_counter() - t0
            t0 = time.perf_counter()
        params, opt_state, key, pose_rows, values, temps = cache[tag](*inputs)
        params = masked(params)
        jax.block_until_ready(params)
        elapsed = (history["seconds"][-1] if history["seconds"] else 0.0) + time.perf_counter() - t0
        history["epoch"].append(e + 1)
        history["loss"].append(float(jnp.mean(values)))
        history["seconds"].append(elapsed)
        history["resolution_angstrom"].append(float(s["resolution_angstrom"]))
        history["r_limit"].append(float(s["r_limit"]))
        history["batch_size"].append(int(s["batch_size"]))
        history["angular_step_deg"].append(float(s.get("step_deg", poses.angular_step_deg(s["order"]))))
        history["temperature"].append(float(jnp.mean(temps)))
        state = AbInitioState(e + 1, params, opt_state, key, *pose_rows, {k: list(v) for k, v in history.items()})
        if callback is not None:
            callback(state)

    volume, shifts = recentre(np.asarray(ft_to_volume(params, interpolation)), np.asarray(pose_rows[0]),
                              np.asarray(pose_rows[1]))
    final_state = AbInitioState(state.epoch, params, opt_state, key, *pose_rows, history)
    rotations, max_prob = np.asarray(pose_rows[0]), np.asarray(pose_rows[2])
    if refine_epochs > 0:
        volume, rotations, shifts, max_prob, history["refine"] = _refine_stage(
            particles, volume, box=box, pixel_size_angstrom=pixel_size_angstrom, epochs=int(refine_epochs),
            diameter_angstrom=given_diameter, symmetry=symmetry, seed=seed, interpolation=interpolation,
            settings=refine_settings, callback=refine_callback, resume=refine_resume,
            sgd_resolution_angstrom=float(history["resolution_angstrom"][-1]) if history["resolution_angstrom"]
            else start_resolution_angstrom)
    return AbInitio(volume, rotations, shifts, max_prob, history, final_state)


def _refine_stage(particles: Particles, volume, *, box: int, pixel_size_angstrom: float, epochs: int,
                  diameter_angstrom: float | None, symmetry: str, seed: int, interpolation: str, settings: dict | None,
                  callback, sgd_resolution_angstrom: float, resume=None):
    """:func:`jaxcryo.refine.refine` from the ab initio map (global search, then local; its
    defaults otherwise): (map, rotations, shifts_px, max_prob, summary of its history).

    The map is low-passed first to refine's 40 A (wide basins for the 15 deg global search)
    where that keeps at least 8 Fourier shells, else to 1.5 x the SGD's last frequency limit:
    measured at box 64, 5.7 A/px (40 A is shell 9), 40 A placed 95% of the particles within
    15 deg against 93% from 21 A; at box 16, 6 A/px (40 A is shell 2.4) the median error went
    from 7 deg to 61 deg from 40 A, and to 4-5 deg from 21 A."""
    from jaxcryo.refine import refine

    t0 = time.perf_counter()
    lowpass = 40.0 if box * pixel_size_angstrom / 40.0 >= 8.0 else 1.5 * sgd_resolution_angstrom
    kw = dict(epochs=epochs, diameter_angstrom=diameter_angstrom, symmetry=symmetry, seed=seed,
              initial_lowpass_angstrom=lowpass,
              interpolation=interpolation if interpolation in ("nearest", "trilinear") else "trilinear")
    kw.update(settings or {})
    out = refine(particles, volume, box=box, pixel_size_angstrom=pixel_size_angstrom, callback=callback,
                 resume=resume, **kw)
    h = out.reconstruction.history
    summary = {k: list(h[k]) for k in ("epoch", "mode", "angular_step_deg", "resolution_angstrom",
                                        "mean_pose_change_deg", "seconds")}
    summary.update(final_resolution_angstrom=float(out.reconstruction.resolution_angstrom),
                   initial_lowpass_angstrom=float(kw["initial_lowpass_angstrom"]), wall_seconds=time.perf_counter() - t0)
    return (np.asarray(out.reconstruction.volume, np.float32), np.asarray(out.rotations), np.asarray(out.shifts_px),
            np.asarray(out.max_prob), summary)
