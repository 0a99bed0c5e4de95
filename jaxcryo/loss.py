"""The reconstruction objective: weighted least squares in Fourier space plus Tikhonov.

    L(v) = sum_i w_i sum_p m_p s_gp |c_ip (A_i v)_p - y_ip|^2 / sum_i w_i  +  lam ||v||^2

over a minibatch: w_i particle weights (0 for padding), m_p the Hermitian multiplicity of
each half-plane pixel (so the sum equals the one over the full spectrum), s_gp the noise
weights (1/sigma^2 per shell of image i's noise group g; white by default, see
:mod:`jaxcryo.noise`), c the CTF, A_i the slice at pose i. ||v||^2 is the full spectrum's,
(1/2) sum_k m_k |v_k|^2 over the stored half-volume in the units where lam weighs an
interior voxel once: the kx = 0 plane (m_k = 1) gets half the weight, as it gets half the data.

The loss is quadratic, so the gradient and any number of Hessian-vector products share one
forward and one adjoint pass (:func:`value_grad_hvp`).

With a point-group symmetry G (``Problem.symmetry``), every image is compared with the slices at
its pose composed with each group element, A_i g, and its term is the mean over g
(:func:`symmetry_expand`): the map is symmetric by construction, as relion_reconstruct --sym.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward.model import Particles, ctf_batch, slices
from jaxcryo.forward.slicing import INTERPOLATIONS, FourierGrid
from jaxcryo.geometry import half_volume_weights, volume_radius
from jaxcryo.symmetry import canonical_symbol, symmetry_matrices


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of the objective (hashable: a safe jit static argument).

    Attributes:
      grid: the Fourier pixels used (box and r_max).
      interpolation: 'nearest', 'trilinear' or 'nufft'.
      lam: Tikhonov weight on ||v||^2 (per interior voxel of the half-volume; the kx = 0 and
        Nyquist planes, which the full spectrum holds once, get half).
      shell_weights: optional noise weights 1/sigma^2 per Fourier shell (index round(|k|)):
        a tuple (one spectrum for all images) or a tuple of G tuples (one per noise group,
        indexed by ``Particles.noise_group``), e.g. from
        :func:`jaxcryo.noise.shell_weights_from_sigma2`.
      shell_lam: optional extra Tikhonov weight per Fourier shell of the volume (a tuple,
        index round(|k|)): a Wiener-style prior, e.g. from :func:`wiener_shell_lam`.
      symmetry: point group in RELION's notation ('C1', 'C4', 'D2', 'T', 'O', 'I', ...; see
        :mod:`jaxcryo.symmetry`); each image is used at its pose composed with every element.
    """

    grid: FourierGrid
    interpolation: str = "trilinear"
    lam: float = 0.0
    shell_weights: tuple | None = None
    shell_lam: tuple | None = None
    symmetry: str = "C1"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        object.__setattr__(self, "symmetry", canonical_symbol(self.symmetry))

    @property
    def n_noise_groups(self) -> int:
        """How many noise spectra ``shell_weights`` holds (1 when white or a single tuple)."""
        if self.shell_weights is None or np.ndim(self.shell_weights) == 1:
            return 1
        return len(self.shell_weights)

    @property
    def group_pixel_weights(self) -> np.ndarray:
        """(G, P) multiplicity times noise weight of each pixel, for each noise group."""
        m = self.grid.multiplicity
        if self.shell_weights is None:
            return m[None].copy()
        table = np.asarray(self.shell_weights, np.float64)
        table = table[None] if table.ndim == 1 else table
        shells = np.rint(np.linalg.norm(self.grid.freqs, axis=-1)).astype(int)
        return m[None] * table[:, np.minimum(shells, table.shape[1] - 1)]

    @property
    def pixel_weights(self) -> np.ndarray:
        """(P,) multiplicity times noise weight of each pixel (one noise group only; with several
        use :func:`image_pixel_weights`)."""
        if self.n_noise_groups > 1:
            raise ValueError(f"this Problem has {self.n_noise_groups} noise groups; "
                             "use image_pixel_weights(problem, batch)")
        return self.group_pixel_weights[0]

    def data_only(self) -> "Problem":
        """The same problem without the Tikhonov term."""
        return dataclasses.replace(self, lam=0.0, shell_lam=None)

    def regularizer(self, dtype=jnp.float32):
        """The Tikhonov weight per parameter, (N, N, N//2+1, 1) (broadcasts over (re, im)):
        (lam + shell_lam[round(|k|)]) times m_k / 2, m_k the voxel's Hermitian multiplicity.

        A stored voxel with 0 < kx < N/2 stands for itself and its conjugate mate, and so
        receives the data of both; one on the kx = 0 (or kx = N/2) plane stands for itself
        only. Weighting the prior by m_k / 2 keeps data and prior in the same ratio for every
        voxel (the full spectrum's ||v||^2), so lam means the same on every plane.
        """
        lam = np.full(self.grid.volume_shape, float(self.lam))
        if self.shell_lam is not None:
            shells = np.rint(volume_radius(self.grid.box)).astype(int)
            per_shell = np.asarray(self.shell_lam, np.float64)
            lam = lam + per_shell[np.minimum(shells, len(per_shell) - 1)]
        return jnp.asarray((lam * 0.5 * half_volume_weights(self.grid.box))[..., None], dtype)

    def zeros(self, dtype=jnp.float32):
        """A zero volume in this problem's parametrisation, (N, N, N//2+1, 2)."""
        return jnp.zeros(self.grid.volume_shape + (2,), dtype)


def _stack_channels(params, probes):
    """params (..., 2) and probes (k, ..., 2) -> one volume (..., 2 + 2k)."""
    if probes is None:
        return params
    return jnp.concatenate([params] + [probes[j] for j in range(probes.shape[0])], axis=-1)


def symmetry_expand(batch: Particles, problem: Problem) -> Particles:
    """The batch with each image repeated for every element g of ``problem.symmetry``.

    B rows -> B G rows (row b G + j is image b at pose A_b g_j, RELION's A times the group
    matrix), every field repeated and the weights divided by G, so that sums over the rows are
    each image's mean over the group and sum(weight) is unchanged. C1 returns ``batch`` itself.
    """
    ops = symmetry_matrices(problem.symmetry)
    g = ops.shape[0]
    if g == 1:
        return batch
    out = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), g, axis=0), batch)
    rot = jnp.einsum("bij,gjk->bgik", batch.rotations, jnp.asarray(ops, batch.rotations.dtype))
    return out._replace(rotations=rot.reshape(-1, 3, 3), weight=out.weight / g)


def forward(volume, batch: Particles, problem: Problem):
    """CTF-modulated slices (B, P, C) of a pair volume (N, N, H, C), at the batch's own poses
    (the loss functions apply the symmetry first, with :func:`symmetry_expand`)."""
    s = slices(volume, batch.rotations, problem.grid, problem.interpolation)
    return s * ctf_batch(batch.ctf, problem.grid, batch.rotations.shape[0], s.dtype)[..., None]


def image_pixel_weights(problem: Problem, batch: Particles, dtype=jnp.float32):
    """(B, P) weight of each pixel of each image: multiplicity m_p times the noise weight
    1/sigma^2 of the pixel's shell in the image's noise group (``batch.noise_group``; group 0
    when None). The weights a Gaussian likelihood gives |c A v - y|^2, for the loss and for
    scoring poses alike. Particle weights are not included.

    Raises:
      ValueError: the problem has several noise groups and the batch has no noise_group.
    """
    table = jnp.asarray(problem.group_pixel_weights, dtype)  # (G, P)
    n = batch.weight.shape[0]
    if table.shape[0] == 1:
        return jnp.broadcast_to(table[0], (n, table.shape[1]))
    if batch.noise_group is None:
        raise ValueError(f"the Problem has {table.shape[0]} noise groups but the particles have no noise_group")
    return table[jnp.clip(batch.noise_group, 0, table.shape[0] - 1)]


def _scale(batch: Particles, problem: Problem, dtype, weight_total=None):
    """Per-pixel, per-image weights (B, P, 1) including 1/sum(w).

    ``weight_total`` replaces sum(w) when ``batch`` is one device's part of a larger minibatch
    (the data-parallel driver passes the minibatch's total weight, summed across devices).
    """
    w = batch.weight.astype(dtype)
    total = jnp.sum(w) if weight_total is None else jnp.asarray(weight_total, dtype)
    total = jnp.maximum(total, jnp.asarray(1e-12, dtype))
    return (w / total)[:, None, None] * image_pixel_weights(problem, batch, dtype)[..., None]


def loss(params, batch: Particles, problem: Problem, *, weight_total=None):
    """The objective on a minibatch (scalar). params: (N, N, N//2+1, 2) real pairs.

    ``weight_total``: normalise by this instead of sum(batch.weight) (see :func:`_scale`).
    """
    batch = symmetry_expand(batch, problem)
    r = forward(params, batch, problem) - batch.data
    data_term = jnp.sum(_scale(batch, problem, params.dtype, weight_total) * r * r)
    return data_term + jnp.sum(problem.regularizer(params.dtype) * params * params)


def per_image_loss(params, batch: Particles, problem: Problem):
    """Unweighted data term of each image, (B,): sum_p m_p s_gp |c A v - y|^2 (with a symmetry,
    its mean over the group's poses A g)."""
    n = batch.weight.shape[0]
    batch = symmetry_expand(batch, problem)
    r = forward(params, batch, problem) - batch.data
    pw = image_pixel_weights(problem, batch, params.dtype)
    return jnp.sum(pw[..., None] * r * r, axis=(1, 2)).reshape(n, -1).mean(1)


def value_grad_hvp(params, batch: Particles, problem: Problem, probes=None, *, weight_total=None):
    """Loss, gradient and Hessian-vector products in one forward and one adjoint pass.

    Args:
      params: (N, N, H, 2) pairs.
      probes: optional (k, N, N, H, 2) directions z_j.
      weight_total: normalise by this instead of sum(batch.weight) (one device's share of a
        minibatch; see :mod:`jaxcryo.distributed`).
    Returns:
      (loss, grad, hvps) with hvps of shape (k, N, N, H, 2) (None without probes).
    """
    k = 0 if probes is None else probes.shape[0]
    batch = symmetry_expand(batch, problem)
    volume = _stack_channels(params, probes)
    model, vjp = jax.vjp(lambda v: forward(v, batch, problem), volume)
    scale = _scale(batch, problem, params.dtype, weight_total)
    resid = model[..., :2] - batch.data
    lam = problem.regularizer(params.dtype)
    value = jnp.sum(scale * resid * resid) + jnp.sum(lam * params * params)
    cot = 2.0 * scale * jnp.concatenate([resid, model[..., 2:]], axis=-1)
    (back,) = vjp(cot)
    grad = back[..., :2] + 2.0 * lam * params
    if k == 0:
        return value, grad, None
    hvps = jnp.stack([back[..., 2 + 2 * j: 4 + 2 * j] for j in range(k)]) + 2.0 * lam * probes
    return value, grad, hvps


def subset(particles: Particles, index) -> Particles:
    """Rows ``index`` of a particle set; negative indices give zero-weight padding."""
    safe = jnp.maximum(index, 0)
    taken = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[safe], particles)
    return taken._replace(weight=jnp.where(index >= 0, taken.weight, 0).astype(taken.weight.dtype))


def batched(index, batch_size: int):
    """Row indices (n,) -> (ceil(n / batch_size), batch_size), the last batch padded with -1
    (rows that :func:`subset` turns into zero-weight padding)."""
    n = index.shape[0]
    n_batches = -(-n // batch_size)
    return jnp.pad(index, (0, n_batches * batch_size - n), constant_values=-1).reshape(n_batches, batch_size)


def sum_over_batches(fn, particles: Particles, batch_size: int, init):
    """Sum of ``fn(batch)`` (a pytree shaped like ``init``) over a whole particle set, taken in
    fixed batches of at most ``batch_size`` rows under one ``lax.scan``."""
    n = particles.weight.shape[0]

    def body(acc, idx):
        return jax.tree.map(jnp.add, acc, fn(subset(particles, idx))), None

    total, _ = jax.lax.scan(body, init, batched(jnp.arange(n), int(min(batch_size, n))))
    return total


def data_loss_sum(params, particles: Particles, problem: Problem, batch_size: int):
    """(sum_i w_i * data term_i, sum_i w_i) over a whole particle set, scanned in fixed batches."""
    total = sum_over_batches(lambda b: jnp.sum(b.weight * per_image_loss(params, b, problem)), particles,
                             batch_size, jnp.zeros((), params.dtype))
    return total, jnp.sum(jnp.asarray(particles.weight).astype(params.dtype))
