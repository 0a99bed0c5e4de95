"""Curvature toolkit: Hessian-vector products, Hutchinson and exact diagonals, conditioning.

Nothing here builds a dense Hessian: probes are mapped in chunks, and the exact diagonal of
the slice operator is a back-projection of squared interpolation weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward.model import Particles, ctf_batch
from jaxcryo.forward.slicing import slice_stencil
from jaxcryo.loss import Problem, _scale, sum_over_batches, symmetry_expand
from jaxcryo.symmetry import symmetry_matrices


def hvp(fun, params, vector, *args):
    """Hessian-vector product of a scalar ``fun(params, *args)``: jvp of grad (forward-over-reverse)."""
    return jax.jvp(lambda p: jax.grad(fun)(p, *args), (params,), (vector,))[1]


def rademacher(key, like, n=None):
    """Random +-1 array(s) shaped like ``like`` (with a leading axis n if given)."""
    shape = like.shape if n is None else (n,) + like.shape
    return jax.random.rademacher(key, shape, dtype=like.dtype)


def hutchinson_diagonal(hvp_fn, key, like, n_probes: int, chunk: int = 1):
    """Hutchinson's estimate of diag(H): mean over Rademacher z of z * Hz.

    Args:
      hvp_fn: z -> H z for arrays shaped like ``like``.
      n_probes: number of probes; evaluated ``chunk`` at a time (vmapped) under lax.map.
    Returns:
      (mean, std_of_mean) arrays shaped like ``like``.
    """
    if n_probes % chunk:
        raise ValueError(f"n_probes ({n_probes}) must be a multiple of chunk ({chunk})")
    zs = rademacher(key, like, n_probes).reshape((n_probes // chunk, chunk) + like.shape)
    samples = jax.lax.map(lambda zc: zc * jax.vmap(hvp_fn)(zc), zs).reshape((n_probes,) + like.shape)
    mean = samples.mean(0)
    std = samples.std(0, ddof=1) / np.sqrt(n_probes) if n_probes > 1 else jnp.zeros_like(mean)
    return mean, std


def batch_exact_diagonal(batch: Particles, problem: Problem, dtype=jnp.float32):
    """Exact diag(H) of the minibatch loss for nearest/trilinear slicing, (N, N, H, 2).

    Each pixel contributes 2 m_p s_p c^2 w_k^2 to each voxel k it reads (real and imaginary
    parts alike): the back-projection of squared weights. For nearest this equals H @ ones.
    With a symmetry, at every pose A g of the group (each with weight 1/G).
    """
    if problem.interpolation == "nufft":
        raise ValueError("the exact diagonal is available for nearest and trilinear slicing; "
                         "use hutchinson_diagonal for nufft")
    batch = symmetry_expand(batch, problem)
    scale = _scale(batch, problem, dtype)[..., 0]  # (B, P)
    c2 = ctf_batch(batch.ctf, problem.grid, batch.rotations.shape[0], dtype) ** 2
    index, weight, _ = jax.vmap(
        lambda r: slice_stencil(r.astype(dtype), problem.grid, problem.interpolation))(batch.rotations)
    values = (2.0 * scale * c2)[..., None] * weight * weight  # (B, P, K)
    n_vox = int(np.prod(problem.grid.volume_shape))
    d = jnp.zeros(n_vox, dtype).at[index.reshape(-1)].add(values.reshape(-1)).reshape(problem.grid.volume_shape)
    return jnp.stack([d, d], -1) + 2.0 * problem.regularizer(dtype)


def symmetrize_diagonal(diag, problem: Problem):
    """Mean of a diagonal (N, N, H[, C]) over ``problem.symmetry``: entry k becomes the mean
    over g of the entries at g k (trilinear reads, Hermitian fold k -> -k for kx < 0).

    The Hessian of the symmetric objective is invariant under the group, so its diagonal (per
    Fourier coefficient) is too; a Hutchinson estimate is not, and preconditioning with it
    would make the iterates lose the symmetry that every gradient has. Entries are taken per
    coefficient (the kx = 0 and kx = N/2 planes count once, the rest of the half volume twice,
    as their parameters stand for one or two coefficients). C1: ``diag`` itself.
    """
    mats = symmetry_matrices(problem.symmetry)
    if mats.shape[0] == 1:
        return diag
    from jaxcryo.geometry import volume_freqs

    box = problem.grid.box
    dtype = diag.dtype
    extra = diag.shape[3:]
    freqs = volume_freqs(box)
    half = box // 2 + 1
    mult = np.where((freqs[..., 0] == 0) | ((box % 2 == 0) & (freqs[..., 0] == box // 2)), 1.0, 2.0)
    mult = jnp.asarray(mult.reshape(mult.shape + (1,) * len(extra)), dtype)
    per_coef = diag / mult
    freqs = jnp.asarray(freqs, dtype)

    def read(g):
        q = freqs @ g.T
        q = jnp.where(q[..., :1] < 0, -q, q)  # the Hermitian mate: same diagonal entry
        f = jnp.floor(q)
        t = q - f
        f = f.astype(jnp.int32)
        out = jnp.zeros_like(per_coef)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    w = ((t[..., 0] if dx else 1 - t[..., 0]) * (t[..., 1] if dy else 1 - t[..., 1])
                         * (t[..., 2] if dz else 1 - t[..., 2]))
                    x = jnp.clip(f[..., 0] + dx, 0, half - 1)
                    y = (f[..., 1] + dy) % box
                    z = (f[..., 2] + dz) % box
                    out = out + w.reshape(w.shape + (1,) * len(extra)) * per_coef[z, y, x]
        return out

    total = jax.lax.fori_loop(0, mats.shape[0], lambda j, acc: acc + read(jnp.asarray(mats, dtype)[j]),
                              jnp.zeros_like(per_coef))
    return total / mats.shape[0] * mult


def exact_diagonal(particles: Particles, problem: Problem, batch_size: int = 256, dtype=jnp.float32):
    """Exact diag(H) of the full-data objective (all particles, weights normalised once)."""
    total_w = jnp.maximum(jnp.sum(particles.weight), 1e-12)
    data = problem.data_only()
    acc = sum_over_batches(lambda b: (jnp.sum(b.weight) / total_w) * batch_exact_diagonal(b, data, dtype),
                           particles, batch_size, jnp.zeros(problem.grid.volume_shape + (2,), dtype))
    return acc + 2.0 * problem.regularizer(dtype)


def power_iteration(hvp_fn, key, like, iters: int = 30):
    """Largest eigenvalue of a PSD operator z -> Hz by power iteration (scalar)."""
    def body(_, v):
        w = hvp_fn(v)
        return w / jnp.linalg.norm(w)
    v = jax.lax.fori_loop(0, iters, body, jax.random.normal(key, like.shape, like.dtype))
    return jnp.vdot(v, hvp_fn(v)).real


def radial_profile(diag, box: int, reduce: str = "mean"):
    """Reduce a half-volume array (N, N, H[, 2]) over Fourier shells round(|k|) -> (n_shells,)."""
    from jaxcryo.geometry import shell_index, volume_radius
    d = np.asarray(diag)
    if d.ndim == 4:
        d = d[..., 0]
    shells = shell_index(volume_radius(box)).ravel()
    d = d.ravel()
    n = shells.max() + 1
    out = np.full(n, np.nan)
    fn = {"mean": np.mean, "min": np.min, "max": np.max}[reduce]
    for s in range(n):
        sel = d[shells == s]
        if sel.size:
            out[s] = fn(sel)
    return out


def condition_by_radius(diag, box: int, r_max: int | None = None):
    """kappa(R) = max / min of a diagonal over all voxels with |k| <= R, for R = 0 .. r_max.

    For nearest slicing without CTF the Hessian is diagonal, so this is the condition number of
    the problem restricted to the ball of radius R (the paper's kappa as a function of radius).
    """
    hi = np.fmax.accumulate(radial_profile(diag, box, "max"))
    lo = np.fmin.accumulate(radial_profile(diag, box, "min"))
    r_max = box // 2 - 1 if r_max is None else r_max
    return (hi / lo)[: r_max + 1]


def shell_spread(diag, box: int, r_max: int | None = None):
    """max / min of a diagonal within each Fourier shell (1 = perfectly isotropic), per shell."""
    r_max = box // 2 - 1 if r_max is None else r_max
    return (radial_profile(diag, box, "max") / radial_profile(diag, box, "min"))[: r_max + 1]
