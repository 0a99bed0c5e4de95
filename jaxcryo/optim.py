"""optax transforms: the paper's Hutchinson-preconditioned SGD (Algorithm 1) and recipes.

``scale_by_hutchinson`` is an ``optax.GradientTransformationExtraArgs``: it chains with any
optax transform, and its curvature comes as a keyword extra argument of ``update``:

* ``hvp_fn=`` a callable z -> H z on the current minibatch (probes drawn from the state's key),
* ``loss_fn=`` a callable params -> scalar loss (H z then comes from jvp of grad), or
* ``diag_sample=`` a precomputed z * Hz (the driver computes it in the same pass as the
  gradient; see :func:`jaxcryo.loss.value_grad_hvp`).

Example::

    tx = optax.chain(jaxcryo.scale_by_hutchinson(beta=0.9, alpha=1e-4), optax.sgd(1.0))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, loss_fn=lambda p: loss(p, batch))
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcryo.curvature import hvp as _hvp, rademacher


class ScaleByHutchinsonState(NamedTuple):
    """State of :func:`scale_by_hutchinson`.

    count: int32 steps taken; n_samples: int32 curvature samples averaged so far;
    key: PRNG key for the probes; mean: running mean of the samples z * Hz;
    diag: the blended estimate D (the preconditioner is 1 / max(|D|, alpha)).
    """

    count: jnp.ndarray
    n_samples: jnp.ndarray
    key: jnp.ndarray
    mean: Any
    diag: Any


def scale_by_hutchinson(*, beta: float = 0.9, alpha: float = 1e-6, n_probes: int = 1,
                        update_every: int = 1, average: str = "mean", warmup: int = 0, seed: int = 0,
                        init_diag=None, init_samples: int = 1,
                        ) -> optax.GradientTransformationExtraArgs:
    """Scale updates by the inverse of a Hutchinson estimate of the Hessian diagonal.

    Algorithm 1 of Toader, Brubaker & Lederman (arXiv 2311.16100): on each refresh step take
    the sample s = mean_j z_j * H z_j (Rademacher z_j, current minibatch), fold it into
    the running mean m of all samples so far (``average='mean'``) and blend
    D <- beta D + (1 - beta) m (D starts at the first m); the update is g / max(|D|, alpha).
    ``average='ema'`` is the OASIS-style variant D <- beta D + (1 - beta) s.

    Args:
      beta: blend factor of the estimate (the paper: 0.9).
      alpha: floor of |D| (the paper: 1 / most voxels in one Fourier shell; see
        :func:`jaxcryo.geometry.default_alpha`).
      n_probes: Rademacher probes per refresh step.
      update_every: refresh the estimate every k steps (k = 1: every step).
      average: 'mean' (Algorithm 1) or 'ema' (OASIS).
      warmup: the first ``warmup`` steps only gather samples and return zero updates, so that
        the first real step uses an average of several samples rather than one noisy one.
      seed: PRNG seed for the probes.
      init_diag: optional first estimate of diag(H) (a pytree like the params), e.g. the exact
        diagonal (:func:`jaxcryo.curvature.exact_diagonal`); it enters the running mean as
        ``init_samples`` samples, and the first step already uses it (no warm-up needed).
        :func:`seed_hutchinson` does the same to an existing state (e.g. vmapped half-sets).
    """
    if average not in ("mean", "ema"):
        raise ValueError(f"average must be 'mean' or 'ema', got {average!r}")

    def init_fn(params):
        zeros = optax.tree.zeros_like(params)
        state = ScaleByHutchinsonState(count=jnp.zeros([], jnp.int32), n_samples=jnp.zeros([], jnp.int32),
                                       key=jax.random.PRNGKey(seed), mean=zeros, diag=zeros)
        return state if init_diag is None else seed_hutchinson(state, init_diag, init_samples)

    def sample(state, params, hvp_fn, loss_fn):
        if hvp_fn is None:
            if loss_fn is None:
                raise ValueError("scale_by_hutchinson.update needs hvp_fn=, loss_fn= or diag_sample=")
            hvp_fn = lambda z: _hvp(loss_fn, params, z)  # noqa: E731
        key = jax.random.fold_in(state.key, state.count)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))

        def one(j):
            z = treedef.unflatten([rademacher(jax.random.fold_in(k, j), x) for k, x in zip(keys, leaves)])
            return jax.tree.map(lambda a, b: a * b, z, hvp_fn(z))

        samples = jax.lax.map(one, jnp.arange(n_probes))
        return jax.tree.map(lambda s: s.mean(0), samples)

    def fold(state, s):
        n = state.n_samples + 1
        # Until the first real step D is the plain mean of the samples so far (no blend):
        # blending from one noisy sample would keep that sample's noise for ~1/(1-beta) steps.
        first = state.n_samples < max(warmup, 1)
        mean = jax.tree.map(lambda m, x: m + (x - m) / n.astype(x.dtype), state.mean, s)
        target = mean if average == "mean" else s
        diag = jax.tree.map(lambda d, t: jnp.where(first, t, beta * d + (1 - beta) * t), state.diag, target)
        return state._replace(n_samples=n, mean=mean, diag=diag)

    def update_fn(updates, state, params=None, *, hvp_fn: Callable | None = None,
                  loss_fn: Callable | None = None, diag_sample=None, **extra_args):
        del extra_args
        refresh = (state.count % update_every) == 0
        if diag_sample is not None:
            new = fold(state, diag_sample)
            state = jax.tree.map(lambda a, b: jnp.where(refresh, a, b), new, state)
        else:
            state = jax.lax.cond(refresh, lambda st: fold(st, sample(st, params, hvp_fn, loss_fn)),
                                 lambda st: st, state)
        live = (state.count >= warmup).astype(jnp.result_type(*jax.tree.leaves(updates)))
        updates = jax.tree.map(lambda g, d: live * g / jnp.maximum(jnp.abs(d), alpha).astype(g.dtype),
                               updates, state.diag)
        return updates, state._replace(count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def has_hutchinson(opt_state) -> bool:
    """Whether an optax state tree holds a :func:`scale_by_hutchinson` state."""
    is_state = lambda x: isinstance(x, ScaleByHutchinsonState)  # noqa: E731
    return any(is_state(x) for x in jax.tree.leaves(opt_state, is_leaf=is_state))


def seed_hutchinson(opt_state, diag, n_samples: int = 1):
    """Start every :func:`scale_by_hutchinson` state inside ``opt_state`` from the estimate ``diag``.

    The estimate D and the running mean become ``diag`` (cast to their dtype), counted as
    ``n_samples`` samples of the running mean: later Hutchinson samples s_t then move the mean
    by (s_t - mean) / (n_samples + t). Works on any optax state tree (a chain, vmapped states
    with a leading half-set axis when ``diag`` has it too). Typical first estimate: the exact
    full-data diagonal, one back-projection of squared interpolation weights times CTF^2
    (:func:`jaxcryo.curvature.exact_diagonal`, nearest and trilinear).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    is_state = lambda x: isinstance(x, ScaleByHutchinsonState)  # noqa: E731

    def seed(s):
        if not is_state(s):
            return s
        d = jax.tree.map(lambda m, x: jnp.broadcast_to(jnp.asarray(x, m.dtype), m.shape), s.mean, diag)
        # two buffers: the driver donates the state, and one buffer donated twice is an error
        return s._replace(n_samples=jnp.full_like(s.n_samples, n_samples), mean=d,
                          diag=jax.tree.map(lambda x: jnp.array(x, copy=True), d))

    return jax.tree.map(seed, opt_state, is_leaf=is_state)


class ScaleByDiagonalState(NamedTuple):
    """State of :func:`scale_by_diagonal` (it keeps nothing that changes)."""


def scale_by_diagonal(diag, *, alpha: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """Scale updates by 1 / max(|diag|, alpha) for a fixed, precomputed diagonal (psgd-exact)."""
    def init_fn(params):
        del params
        return ScaleByDiagonalState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return jax.tree.map(lambda g, d: g / jnp.maximum(jnp.abs(d), alpha).astype(g.dtype),
                            updates, diag), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _only_value_fn_args(tx: optax.GradientTransformationExtraArgs):
    """Wrap optax's line search so it ignores the extra args meant for other transforms.

    optax's backtracking line search refuses keyword args its ``value_fn`` does not take; in
    a chain it receives ``hvp_fn``/``diag_sample`` too, which are not for it.
    """
    def update_fn(updates, state, params=None, *, value, grad, value_fn, **extra_args):
        import inspect
        names = inspect.signature(value_fn).parameters
        kept = {k: v for k, v in extra_args.items() if k in names}
        return tx.update(updates, state, params, value=value, grad=grad, value_fn=value_fn, **kept)

    def init_fn(params):
        # optax starts some counters weak-typed and returns them strong from update, which
        # makes a jitted step trace twice (optax issue #1171): start them strong.
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), tx.init(params))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def armijo(*, initial_step: float = 10.0, c: float = 0.99, decrease_factor: float = 0.5,
           increase_factor: float = float("inf"), max_backtracking_steps: int = 15,
           ) -> optax.GradientTransformationExtraArgs:
    """Backtracking (Armijo) line search starting from at most ``initial_step``.

    With the default ``increase_factor=inf`` every step restarts at ``initial_step`` (the
    paper's search); a finite factor starts from the last accepted step times the factor
    (capped at ``initial_step``), which saves most of the backtracking evaluations.
    Expects extra args ``value``, ``grad`` and ``value_fn`` (optax's convention). Feed it the
    descent direction (already negated), e.g. after ``optax.scale(-1.0)``.
    """
    return optax.chain(
        optax.scale(initial_step),
        _only_value_fn_args(optax.scale_by_backtracking_linesearch(
            max_backtracking_steps=max_backtracking_steps, slope_rtol=c,
            decrease_factor=decrease_factor, increase_factor=increase_factor, max_learning_rate=1.0)),
    )


def precon_sgd(learning_rate: float | None = None, *, beta: float = 0.9, alpha: float = 1e-6,
               n_probes: int = 1, update_every: int = 1, average: str = "mean",
               linesearch: bool = True, initial_step: float = 10.0, c: float = 0.99,
               seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """The paper's preconditioned SGD: Hutchinson diagonal, then a step.

    With ``linesearch=True`` (the paper's recipe) the step comes from an Armijo search that
    starts at ``initial_step`` (10) with sufficient-decrease constant ``c`` (0.99); update
    needs ``value``, ``grad`` and ``value_fn`` then. Otherwise the step is ``learning_rate``
    (default 1.0, a Newton-like step on the diagonal model). Paper defaults: beta 0.9,
    one probe a step, alpha = 1 / (most voxels in one Fourier shell).
    """
    pre = scale_by_hutchinson(beta=beta, alpha=alpha, n_probes=n_probes, update_every=update_every,
                              average=average, seed=seed)
    if linesearch:
        return optax.chain(pre, optax.scale(-1.0), armijo(initial_step=initial_step, c=c))
    return optax.chain(pre, optax.scale(-(1.0 if learning_rate is None else learning_rate)))
