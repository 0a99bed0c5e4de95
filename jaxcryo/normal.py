"""The normal equations of the known-pose objective: one pass over the particles, then no image.

With fixed poses the data term of :func:`jaxcryo.loss.loss` is quadratic in the volume,

    D(v) = sum_i w_i sum_p a_p |c_ip (A_i v)_p - y_ip|^2 / W,   a_p = m_p s_p,  W = sum_i w_i,

so one pass accumulates everything it depends on: the back-projection of the CTF-weighted data
``b = A^T W c y`` and the normal operator ``M = A^T W c^2 A``. For trilinear slicing M couples
each voxel to its 26 neighbours only (the 8 corners a pixel reads are a unit cube apart): a
27-point stencil of real coefficients per voxel; for nearest slicing it is diagonal. After the
pass, every loss value, gradient, Hessian-vector product and the exact Hessian diagonal costs a
few volume-sized operations, and a conjugate-gradient solve needs no image at all.

The half-spectrum subtlety. The parameters are the half volume (N, N, N//2+1) as (re, im)
pairs, and a slice reads a voxel with kx < 0 as ``conj V(-k)``: in these parameters the
operator is real-linear but not complex-linear near kx = 0. Here the stencil lives on the FULL
grid (N, N, N) (kx < 0 included, indices modulo N), where slicing is complex-linear with real
weights; the map from the half parameters to the full grid (:func:`expand`: copy, and mirror
with conjugation for kx < 0) and its real adjoint (:func:`expand_adjoint`) carry everything to
and from pairs. With r_max <= N//2 - 1 every corner a pixel reads lies in kx, ky, kz in
[-(N//2 - 1), N//2], N distinct values, so the modulo-N grid aliases nothing.

Accumulation cost. The 64 corner pairs of a pixel have separable weights: along each axis the
products of (1 - f, f) take three values, (1 - f)^2, f (1 - f), f^2. So each pixel adds 27
moments (and 8 corner weights times its data) to ONE row of a table indexed by its base voxel
floor(k): one scatter of 43-float rows per pixel, turned into the stencil by rolls afterwards.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxcryo.forward.model import Particles, ctf_batch
from jaxcryo.loss import Problem, _scale, batched, subset, symmetry_expand

__all__ = ["NormalEquations", "accumulate", "expand", "expand_adjoint", "apply", "diagonal", "rhs",
           "value_and_grad", "combine", "cg", "solve"]


class NormalEquations(NamedTuple):
    """What the data term of a particle set depends on (a pytree of arrays; sums over particles).

    Attributes:
      stencil: (S, S, S, N, N, N) real coefficients of M on the full grid, S = 3 (trilinear) or
        1 (nearest): ``(M F)(q) = sum_d stencil[d + S//2][q] F(q + d)`` (indices [z, y, x],
        modulo N). Unnormalised: sums of w_i a_p c^2 w_k w_l.
      rhs: (N, N, N, 2) full-grid back-projection b = sum w_i a_p c y w_k as (re, im) pairs.
      weight_total: sum_i w_i (the loss divides by it).
      data_norm: sum_i w_i sum_p a_p |y_ip|^2 (the loss's constant).
    """

    stencil: jnp.ndarray
    rhs: jnp.ndarray
    weight_total: jnp.ndarray
    data_norm: jnp.ndarray


def _check(problem: Problem):
    if problem.interpolation not in ("nearest", "trilinear"):
        raise ValueError("the normal equations are built for nearest and trilinear slicing, "
                         f"got interpolation={problem.interpolation!r}")
    if problem.grid.radius > problem.grid.box // 2 - 1:
        raise ValueError(f"the normal equations need r_max <= N//2 - 1 = {problem.grid.box // 2 - 1}, "
                         f"got {problem.grid.radius}")


def _batch_rows(batch: Particles, problem: Problem, dtype):
    """One batch's scatter: flat base-voxel indices (B*P,), rows (B*P, K) and sum w a |y|^2."""
    batch = symmetry_expand(batch, problem)  # each image at A g for every group element, weight / G
    grid = problem.grid
    n = grid.box
    b = batch.rotations.shape[0]
    a = _scale(batch, problem, dtype, weight_total=jnp.ones((), dtype))[..., 0]  # (B, P): w_i a_p
    c = ctf_batch(batch.ctf, grid, b, dtype)
    y = batch.data.astype(dtype)
    pts = jnp.einsum("pi,bij->bpj", jnp.asarray(grid.freqs, dtype), batch.rotations.astype(dtype)[:, :2, :])
    if problem.interpolation == "nearest":
        base = jnp.round(pts)
        moments = (a * c * c)[..., None]  # (B, P, 1)
        corners = ((a * c)[..., None] * y)  # (B, P, 2)
    else:
        base = jnp.floor(pts)
        f = pts - base  # (B, P, 3) as (x, y, z)
        mom = jnp.stack([(1 - f) ** 2, f * (1 - f), f * f], -1)  # (B, P, 3 axes, 3)
        lin = jnp.stack([1 - f, f], -1)  # (B, P, 3 axes, 2)
        # (ez, ey, ex) and (oz, oy, ox) orders, matching the [z, y, x] array layout
        moments = (mom[:, :, 2, :, None, None] * mom[:, :, 1, None, :, None] * mom[:, :, 0, None, None, :])
        moments = moments.reshape(b, -1, 27) * (a * c * c)[..., None]
        weights = (lin[:, :, 2, :, None, None] * lin[:, :, 1, None, :, None] * lin[:, :, 0, None, None, :])
        corners = (weights.reshape(b, -1, 8)[..., None] * ((a * c)[..., None] * y)[:, :, None, :]).reshape(b, -1, 16)
    q = base.astype(jnp.int32) % n
    index = (q[..., 2] * n + q[..., 1]) * n + q[..., 0]
    rows = jnp.concatenate([moments, corners], -1)
    norm = jnp.sum(a[..., None] * y * y)
    return index.reshape(-1), rows.reshape(-1, rows.shape[-1]), norm


def _axis_moments_to_offsets(t, axis: int):
    """Along moment axis ``axis`` (0, 1, 2 for z, y, x) turn the three moment sums on the base
    grid into stencil offsets d = -1, 0, +1 on the voxel grid (spatial axis 3 + axis)."""
    sp = 3 + axis
    t0, t1, t2 = (jnp.take(t, i, axis=axis) for i in range(3))
    shifted = lambda x: jnp.roll(x, 1, axis=sp - 1)  # value at q - 1  # noqa: E731
    return jnp.stack([shifted(t1), t0 + shifted(t2), t1], axis=axis)


def _finalize(table, norm, weight_total, problem: Problem) -> NormalEquations:
    n = problem.grid.box
    if problem.interpolation == "nearest":
        stencil = table[:, 0].reshape(1, 1, 1, n, n, n)
        rhs = table[:, 1:3].reshape(n, n, n, 2)
    else:
        t = jnp.moveaxis(table[:, :27].reshape(n, n, n, 3, 3, 3), (3, 4, 5), (0, 1, 2))
        for axis in range(3):
            t = _axis_moments_to_offsets(t, axis)
        stencil = t
        corners = table[:, 27:].reshape(n, n, n, 2, 2, 2, 2)
        rhs = sum(jnp.roll(corners[:, :, :, oz, oy, ox], (oz, oy, ox), axis=(0, 1, 2))
                  for oz, oy, ox in itertools.product((0, 1), repeat=3))
    return NormalEquations(stencil=stencil, rhs=rhs, weight_total=weight_total, data_norm=norm)


def accumulate(particles: Particles, problem: Problem, batch_size: int = 256, *, axis_name: str | None = None,
               dtype=None) -> NormalEquations:
    """One pass over a particle set: the normal equations of its data term.

    Args:
      particles: (n, ...) rows; zero-weight rows (padding) contribute nothing.
      problem: grid, interpolation ('nearest' or 'trilinear', r_max <= N//2 - 1) and noise
        weights (``pixel_weights``); lam and shell_lam are not used here (see :func:`solve`).
      batch_size: images per scatter (memory ~ batch_size * P * 43 floats).
      axis_name: inside ``shard_map``, the mesh axis the rows are split over: the sums are
        psum-ed, so every device returns the whole set's equations.
    Pure; jit it (or the caller's function) once.
    """
    _check(problem)
    dtype = particles.data.dtype if dtype is None else dtype
    n = problem.grid.box
    k = 1 + 2 if problem.interpolation == "nearest" else 27 + 16  # moments + corner data per row
    init = (jnp.zeros((n ** 3, k), dtype), jnp.zeros((), dtype))

    rows_n = particles.weight.shape[0]

    def body(acc, idx):  # scatter straight into the carried table (no whole-table add per batch)
        # The barrier materialises the rows: fused into the scatter, XLA (CPU) recomputes the
        # CTF and moments per scattered element (measured 6x slower).
        index, rows, norm = jax.lax.optimization_barrier(_batch_rows(subset(particles, idx), problem, dtype))
        return (acc[0].at[index].add(rows), acc[1] + norm), None

    (table, norm), _ = jax.lax.scan(body, init, batched(jnp.arange(rows_n), int(min(batch_size, rows_n))))
    weight_total = jnp.sum(jnp.asarray(particles.weight).astype(dtype))
    if axis_name is not None:
        table, norm, weight_total = jax.lax.psum((table, norm, weight_total), axis_name)
    return _finalize(table, norm, weight_total, problem)


# ------------------------------------------------------------------ half <-> full grid


def _mirror(x):
    """x[z, y, ...] -> x[-z, -y, ...] (indices modulo N) on the first two axes."""
    return jnp.roll(jnp.flip(x, (0, 1)), 1, axis=(0, 1))


def expand(pairs):
    """Half pairs (N, N, N//2+1, 2) -> full complex grid (N, N, N): F(k) = V(k) for kx >= 0,
    conj V(-k) for kx < 0 (what slices read). Real-linear."""
    n, h = pairs.shape[0], pairs.shape[2]
    v = pairs[..., 0] + 1j * pairs[..., 1]
    neg = jnp.conj(_mirror(v)[:, :, n - h:0:-1])  # x index n - m for m = n - h .. 1
    return jnp.concatenate([v, neg], axis=2)


def expand_adjoint(full):
    """The real adjoint of :func:`expand`: full complex (N, N, N) -> half pairs (N, N, N//2+1, 2)."""
    n = full.shape[0]
    h = n // 2 + 1
    half = full[:, :, :h] + _onto_half(jnp.conj(_mirror(full[:, :, h:][:, :, ::-1])), n)
    return jnp.stack([half.real, half.imag], -1)


def _onto_half(extra, n):
    """Place (N, N, N - N//2 - 1) values on x = 1 .. N - N//2 - 1 of a half grid (zeros
    elsewhere); a pad rather than an indexed add, which XLA (CPU) ran 40x slower here."""
    h = n // 2 + 1
    return jnp.pad(extra, ((0, 0), (0, 0), (1, 2 * h - 1 - n)))


def _stencil_apply(stencil, full):
    """(M F)(q) = sum_d stencil[d][q] F(q + d), indices modulo N: shifted windows of a
    wrap-padded copy, one tap per step of a ``lax.fori_loop`` (measured on CPU at box 64: 6x
    faster than 27 unrolled taps, which XLA fused badly, and a smaller program to compile)."""
    s = stencil.shape[0]
    r = s // 2
    n = full.shape[0]
    padded = jnp.pad(full, r, mode="wrap")
    taps = stencil.reshape((s ** 3,) + stencil.shape[3:])
    offsets = jnp.asarray(list(itertools.product(range(s), repeat=3)), jnp.int32)

    def tap(t, out):
        window = jax.lax.dynamic_slice(padded, (offsets[t, 0], offsets[t, 1], offsets[t, 2]), (n, n, n))
        return out + taps[t] * window

    return jax.lax.fori_loop(0, s ** 3, tap, jnp.zeros_like(full))


def combine(*eqs: NormalEquations) -> NormalEquations:
    """The equations of the union of disjoint particle sets (everything is a sum over particles)."""
    return jax.tree.map(lambda *xs: sum(xs), *eqs)


def _complex(pairs):
    return pairs[..., 0] + 1j * pairs[..., 1]


def apply(neq: NormalEquations, v):
    """H v of the data term (Hessian of D, normalised by the total weight), pairs -> pairs.
    Equals the data term's HVP from :func:`jaxcryo.loss.value_grad_hvp` on the whole set."""
    scale = 2.0 / jnp.maximum(neq.weight_total, 1e-12)
    return (scale * expand_adjoint(_stencil_apply(neq.stencil, expand(v)))).astype(v.dtype)


def rhs(neq: NormalEquations, dtype=None):
    """The data term's right-hand side r, H x = r at its minimum: -grad D(0), pairs."""
    dtype = neq.rhs.dtype if dtype is None else dtype
    scale = 2.0 / jnp.maximum(neq.weight_total, 1e-12)
    return (scale * expand_adjoint(_complex(neq.rhs))).astype(dtype)


def diagonal(neq: NormalEquations):
    """Exact diag of the data term's Hessian in pairs (N, N, N//2+1, 2) (re and im alike).

    A half voxel with kx >= 1 appears twice on the full grid (k and its conjugate mate -k,
    never stencil neighbours), kx = 0 once."""
    s = neq.stencil.shape[0]
    centre = neq.stencil[s // 2, s // 2, s // 2]
    n = centre.shape[0]
    h = n // 2 + 1
    d = centre[:, :, :h] + _onto_half(_mirror(centre[:, :, h:][:, :, ::-1]), n)
    d = 2.0 * d / jnp.maximum(neq.weight_total, 1e-12)
    return jnp.stack([d, d], -1)


def value_and_grad(neq: NormalEquations, params, reg):
    """The full objective (data term + Tikhonov/Wiener) and its gradient from the equations:
    equal to :func:`jaxcryo.loss.loss` on the whole particle set, and its gradient.

    reg: the Tikhonov weight per parameter, ``problem.regularizer(dtype)`` (an array, so that a
    new Wiener prior does not recompile)."""
    w = jnp.maximum(neq.weight_total, 1e-12)
    full = expand(params)
    mf = _stencil_apply(neq.stencil, full)
    b = _complex(neq.rhs)
    quad = jnp.sum(jnp.real(jnp.conj(full) * mf))
    lin = jnp.sum(jnp.real(jnp.conj(b) * full))
    value = (quad - 2.0 * lin + neq.data_norm) / w + jnp.sum(reg * params * params)
    grad = (2.0 / w) * expand_adjoint(mf - b) + 2.0 * reg * params
    return value.astype(params.dtype), grad.astype(params.dtype)


# ------------------------------------------------------------------ the solve


def cg(neq: NormalEquations, reg, x0, *, iters, tol):
    """Jacobi-preconditioned conjugate gradients on (H_data + 2 reg) x = r (pure; jit/vmap it).

    reg: the Tikhonov weight per parameter (scalar or broadcastable to pairs, e.g.
    ``Problem.regularizer``). Stops after ``iters`` iterations or when |residual| <= tol |r|.
    Returns (x, iterations, relative residual).
    """
    b = rhs(neq, x0.dtype)
    diag = diagonal(neq).astype(x0.dtype) + 2.0 * reg
    inv = 1.0 / jnp.maximum(diag, 1e-12 * jnp.max(diag))

    def op(v):
        return apply(neq, v) + 2.0 * reg * v

    bnorm = jnp.maximum(jnp.linalg.norm(b), 1e-30)
    r = b - op(x0)
    z = inv * r
    state = (x0, r, z, jnp.vdot(r, z), jnp.zeros((), jnp.int32))

    def cond(s):
        return (s[4] < iters) & (jnp.linalg.norm(s[1]) > tol * bnorm)

    def body(s):
        x, r, p, rz, k = s
        hp = op(p)
        alpha = rz / jnp.vdot(p, hp)
        x, r = x + alpha * p, r - alpha * hp
        z = inv * r
        rz_new = jnp.vdot(r, z)
        return x, r, z + (rz_new / rz) * p, rz_new, k + 1

    x, r, _, _, k = jax.lax.while_loop(cond, body, state)
    return x, k, jnp.linalg.norm(r) / bnorm


def solve(neq: NormalEquations, problem: Problem, *, iters: int = 100, tol: float = 1e-5, x0=None):
    """Minimise the full objective of ``problem`` (its lam and shell_lam included) given the
    data term's normal equations, by Jacobi-preconditioned CG (jitted). Returns (pairs, info)
    with info = {'iters', 'relative_residual'}."""
    dtype = neq.rhs.dtype
    x0 = problem.zeros(dtype) if x0 is None else jnp.asarray(x0, dtype)
    x, k, rel = _cg_jit(neq, problem.regularizer(dtype), x0, jnp.asarray(iters), jnp.asarray(tol, dtype))
    return x, {"iters": int(k), "relative_residual": float(rel)}


@jax.jit
def _cg_jit(neq, reg, x0, iters, tol):
    return cg(neq, reg, x0, iters=iters, tol=tol)

