"""optax on jaxcryo's real-pair parameters, and the transform contract of the Hutchinson
preconditioner (after optax/contrib/_common_test.py): extra args, one compile, dtypes,
convergence on an ill-conditioned quadratic, chaining, every curvature input, refresh cadence."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_particles, make_problem, random_pairs
from jaxcryo.curvature import power_iteration
from jaxcryo.loss import loss
from jaxcryo.optim import (ScaleByHutchinsonState, armijo, has_hutchinson, precon_sgd, scale_by_diagonal,
                           scale_by_hutchinson, seed_hutchinson)

# ---------------------------------------------------------------- stock optax on the cryo loss


@pytest.fixture(scope="module")
def cryo():
    rng = np.random.default_rng(5)
    problem = make_problem(8, "trilinear", lam=1e-3)
    batch = make_particles(rng, problem, 6)
    f = jax.jit(lambda p: loss(p, batch, problem))
    params = 0.1 * random_pairs(rng, problem.grid.volume_shape + (2,))
    lipschitz = float(power_iteration(jax.jit(lambda z: jax.jvp(jax.grad(f), (params,), (z,))[1]),
                                      jax.random.PRNGKey(0), params, iters=30))
    return f, params, lipschitz


def _run(tx, f, params, steps, extra=lambda p, v, g: {}):
    @jax.jit
    def step(p, state):
        v, g = jax.value_and_grad(f)(p)
        updates, state = tx.update(g, state, p, **extra(p, v, g))
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def test_sgd_direction_is_minus_grad_and_not_conjugated(cryo):
    """With real (re, im) parameters the gradient is the steepest-descent direction, imaginary
    parts included: its inner product with any direction is the directional derivative."""
    f, params, lipschitz = cryo
    grad = jax.grad(f)(params)
    tx = optax.sgd(0.5 / lipschitz)
    updates, _ = tx.update(grad, tx.init(params), params)
    np.testing.assert_allclose(updates, -(0.5 / lipschitz) * grad, rtol=1e-6)
    rng = np.random.default_rng(0)
    for part in (0, 1):  # real parts only, then imaginary parts only
        d = np.zeros(params.shape, np.float32)
        d[..., part] = rng.standard_normal(params.shape[:-1])
        h = 1e-2
        slope = (float(f(params + h * d)) - float(f(params - h * d))) / (2 * h)
        np.testing.assert_allclose(slope, float(jnp.vdot(grad, d)), rtol=2e-3)
    assert float(f(optax.apply_updates(params, updates))) < float(f(params))


@pytest.mark.parametrize("name", ["sgd", "adam", "lbfgs"])
def test_stock_optax_decreases_the_loss(cryo, name):
    f, params, lipschitz = cryo
    if name == "sgd":
        tx, extra = optax.sgd(1.0 / lipschitz), lambda p, v, g: {}
    elif name == "adam":
        tx, extra = optax.adam(0.1), lambda p, v, g: {}
    else:
        tx, extra = optax.lbfgs(), lambda p, v, g: dict(value=v, grad=g, value_fn=f)
    start = float(f(params))
    end = float(f(_run(tx, f, params, 10 if name == "lbfgs" else 15, extra)))
    assert end < 0.75 * start, (name, start, end)


# ---------------------------------------------------------------- a toy ill-conditioned quadratic


H = {"a": jnp.logspace(0, 3, 12), "b": jnp.linspace(2.0, 50.0, 8).reshape(2, 4)}
TARGET = {"a": jnp.linspace(-1.0, 1.0, 12), "b": jnp.ones((2, 4))}


def _quadratic(params):
    return sum(0.5 * jnp.sum(h * (p - t) ** 2) for h, p, t in
               zip(jax.tree.leaves(H), jax.tree.leaves(params), jax.tree.leaves(TARGET)))


def _hvp_fn(z):
    return jax.tree.map(lambda h, v: h.astype(v.dtype) * v, H, z)


def _zeros(dtype=jnp.float32):
    return jax.tree.map(lambda t: jnp.zeros(t.shape, dtype), TARGET)


def _all_inputs(p, v, g):
    """Every extra argument either transform may use, plus one nobody knows."""
    return dict(value=v, grad=g, value_fn=_quadratic, loss_fn=_quadratic, unknown_extra_arg=3)


TRANSFORMS = {
    "scale_by_hutchinson": lambda: optax.chain(scale_by_hutchinson(alpha=1e-8), optax.scale(-1.0)),
    "precon_sgd": lambda: precon_sgd(alpha=1e-8, c=1e-4),
    "precon_sgd_fixed_step": lambda: precon_sgd(1.0, alpha=1e-8, linesearch=False),
}
# optax's backtracking line search initialises info.num_linesearch_steps as a weak-typed 0 and
# returns a strong int32 from update (optax issue #1171); jaxcryo.optim.armijo starts it strong,
# so a jitted precon_sgd step traces once.


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_contract_single_compile(name):
    tx = TRANSFORMS[name]()
    traces = []

    @jax.jit
    def step(p, state):
        traces.append(1)  # runs only while tracing
        v, g = jax.value_and_grad(_quadratic)(p)
        updates, state = tx.update(g, state, p, **_all_inputs(p, v, g))
        return optax.apply_updates(p, updates), state

    params, state = _zeros(), tx.init(_zeros())
    for _ in range(4):
        params, state = step(params, state)
    assert len(traces) == 1


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_contract_extra_args_and_convergence(name):
    tx = TRANSFORMS[name]()
    traces = []

    @jax.jit
    def step(p, state):
        traces.append(1)  # runs only while tracing
        v, g = jax.value_and_grad(_quadratic)(p)
        updates, state = tx.update(g, state, p, **_all_inputs(p, v, g))
        return optax.apply_updates(p, updates), state

    params, state = _zeros(), tx.init(_zeros())
    start = float(_quadratic(params))
    for _ in range(6):
        params, state = step(params, state)
    assert len(traces) <= 2
    # Armijo from step 10 halves to 1.25 x the Newton step: each step leaves 1/16 of the error
    assert float(_quadratic(params)) < 1e-6 * start


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_contract_preserves_dtype(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        dtype = jnp.dtype(dtype)
        tx = TRANSFORMS[name]()
        params = _zeros(dtype)
        state = tx.init(params)
        for _ in range(2):
            v, g = jax.value_and_grad(_quadratic)(params)
            updates, state = tx.update(g, state, params, **_all_inputs(params, v, g))
            assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
            params = optax.apply_updates(params, updates)
        assert all(p.dtype == dtype for p in jax.tree.leaves(params))
        hutch = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByHutchinsonState))
                 if isinstance(s, ScaleByHutchinsonState)]
        assert len(hutch) == 1
        assert all(x.dtype == dtype for x in jax.tree.leaves((hutch[0].mean, hutch[0].diag)))


def test_preconditioning_beats_sgd_with_the_same_line_search():
    """Condition number 1000: the diagonal preconditioner solves it, plain gradient steps crawl."""
    start = float(_quadratic(_zeros()))
    psgd = _run(precon_sgd(alpha=1e-8, c=1e-4), _quadratic, _zeros(), 10, _all_inputs)
    sgd = _run(optax.chain(optax.scale(-1.0), armijo(c=1e-4)), _quadratic, _zeros(), 10, _all_inputs)
    assert float(_quadratic(psgd)) < 1e-8 * start
    assert float(_quadratic(sgd)) > 1e-3 * start


def test_chains_with_momentum_clipping_and_schedules():
    tx = optax.chain(scale_by_hutchinson(alpha=1e-8), optax.clip_by_global_norm(5.0), optax.trace(decay=0.3),
                     optax.scale_by_schedule(optax.exponential_decay(0.8, 10, 0.9)), optax.scale(-1.0))
    start = float(_quadratic(_zeros()))
    out = _run(tx, _quadratic, _zeros(), 40, lambda p, v, g: dict(loss_fn=_quadratic))
    assert float(_quadratic(out)) < 1e-4 * start


def test_every_curvature_input_gives_the_true_diagonal():
    """On a diagonal quadratic z * Hz = diag(H) for any Rademacher z: all three inputs agree exactly."""
    params = _zeros()
    grads = jax.grad(_quadratic)(params)
    tx = scale_by_hutchinson(alpha=1e-8, n_probes=2)
    inputs = dict(hvp_fn=dict(hvp_fn=_hvp_fn), loss_fn=dict(loss_fn=_quadratic), diag_sample=dict(diag_sample=H))
    for name, kwargs in inputs.items():
        updates, state = tx.update(grads, tx.init(params), params, **kwargs)
        for got, want in zip(jax.tree.leaves(state.diag), jax.tree.leaves(H)):
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
        for u, g, h in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), jax.tree.leaves(H)):
            np.testing.assert_allclose(u, g / h, rtol=1e-6, err_msg=name)
        assert int(state.count) == 1 and int(state.n_samples) == 1
    with pytest.raises(ValueError, match="hvp_fn"):
        tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("path", ["diag_sample", "hvp_fn"])
def test_update_every_refreshes_only_every_k_steps(path):
    tx = scale_by_hutchinson(beta=0.5, alpha=1e-8, update_every=3)
    params = {"x": jnp.zeros(4)}
    state = tx.init(params)
    diags, samples = [], []
    for t in range(7):
        scale = float(t + 1)
        kwargs = (dict(diag_sample={"x": scale * jnp.ones(4)}) if path == "diag_sample"
                  else dict(hvp_fn=lambda z, s=scale: jax.tree.map(lambda v: s * v, z)))
        _, state = tx.update({"x": jnp.ones(4)}, state, params, **kwargs)
        diags.append(float(state.diag["x"][0]))
        samples.append(int(state.n_samples))
    assert samples == [1, 1, 1, 2, 2, 2, 3]
    assert diags[0] == diags[1] == diags[2] and diags[3] == diags[4] == diags[5]
    # refreshes at steps 0, 3, 6 with samples 1, 4, 7 (mean of samples: 1, 2.5, 4)
    np.testing.assert_allclose([diags[0], diags[3], diags[6]], [1.0, 1.75, 2.875])


def test_average_mean_and_ema_follow_their_recurrences():
    beta = 0.5
    s = [2.0, 6.0, 1.0]
    mean_d = [s[0]]
    ema_d = [s[0]]
    for t in (1, 2):
        mean_d.append(beta * mean_d[-1] + (1 - beta) * np.mean(s[: t + 1]))
        ema_d.append(beta * ema_d[-1] + (1 - beta) * s[t])
    for average, want in (("mean", mean_d), ("ema", ema_d)):
        tx = scale_by_hutchinson(beta=beta, alpha=1e-8, average=average)
        params = jnp.zeros(3)
        state = tx.init(params)
        for t in range(3):
            updates, state = tx.update(jnp.ones(3), state, params, diag_sample=s[t] * jnp.ones(3))
            np.testing.assert_allclose(state.diag, want[t], rtol=1e-6, err_msg=average)
            np.testing.assert_allclose(updates, 1.0 / want[t], rtol=1e-6, err_msg=average)
    assert mean_d[2] != ema_d[2]
    with pytest.raises(ValueError):
        scale_by_hutchinson(average="median")


def test_alpha_floors_the_estimate():
    tx = scale_by_hutchinson(alpha=0.5)
    updates, _ = tx.update(jnp.ones(3), tx.init(jnp.zeros(3)), jnp.zeros(3),
                           diag_sample=jnp.array([0.01, -4.0, 2.0]))
    np.testing.assert_allclose(updates, [2.0, 0.25, 0.5])


def test_scale_by_diagonal():
    diag = {"a": jnp.array([1.0, -4.0, 1e-6]), "b": jnp.array([[2.0]])}
    tx = scale_by_diagonal(diag, alpha=1e-2)
    grads = {"a": jnp.ones(3), "b": jnp.ones((1, 1))}
    updates, state = tx.update(grads, tx.init(grads), None, unknown_extra_arg=1)
    np.testing.assert_allclose(updates["a"], [1.0, 0.25, 100.0])
    np.testing.assert_allclose(updates["b"], [[0.5]])
    chained = optax.chain(scale_by_diagonal(H), optax.scale(-1.0))
    out = _run(chained, _quadratic, _zeros(), 1)
    assert float(_quadratic(out)) < 1e-10 * float(_quadratic(_zeros()))


# ---------------------------------------------------------------- a first estimate (init_diag / seed_hutchinson)


def test_init_diag_is_used_at_once_and_counts_as_init_samples():
    """The first update already divides by init_diag (no warm-up), and later samples enter the
    running mean with the init counted as ``init_samples`` samples: mean = (n0 D0 + s) / (n0 + 1)."""
    beta, n0 = 0.5, 3
    d0 = {"x": jnp.array([2.0, 4.0, 8.0])}
    tx = scale_by_hutchinson(beta=beta, alpha=1e-8, init_diag=d0, init_samples=n0)
    params = {"x": jnp.zeros(3)}
    state = tx.init(params)
    assert int(state.n_samples) == n0
    s = jnp.array([10.0, 0.0, 8.0])
    updates, state = tx.update({"x": jnp.ones(3)}, state, params, diag_sample={"x": s})
    mean = (n0 * d0["x"] + s) / (n0 + 1)
    want = beta * d0["x"] + (1 - beta) * mean
    np.testing.assert_allclose(state.mean["x"], mean, rtol=1e-6)
    np.testing.assert_allclose(state.diag["x"], want, rtol=1e-6)
    np.testing.assert_allclose(updates["x"], 1.0 / want, rtol=1e-6)
    with pytest.raises(ValueError, match="n_samples"):
        seed_hutchinson(state, d0, 0)


def test_seed_hutchinson_reaches_states_inside_chains_and_vmapped_halves():
    tx = optax.chain(optax.clip(10.0), scale_by_hutchinson(alpha=1e-8), optax.trace(0.5), optax.scale(-1.0))
    params = jnp.zeros((2, 3))  # two half-sets, vmapped
    state = jax.vmap(tx.init)(params)
    assert has_hutchinson(state) and not has_hutchinson(jax.vmap(optax.sgd(1.0).init)(params))
    d0 = jnp.array([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    seeded = seed_hutchinson(state, d0, 5)
    hutch = seeded[1]
    np.testing.assert_array_equal(hutch.diag, d0)
    np.testing.assert_array_equal(hutch.n_samples, [5, 5])
    # two buffers (the driver donates the whole state; one buffer donated twice fails)
    assert hutch.mean.unsafe_buffer_pointer() != hutch.diag.unsafe_buffer_pointer()
    g = jnp.ones((2, 3))
    updates, _ = jax.vmap(lambda u, st, p: tx.update(u, st, p, diag_sample=jnp.asarray(d0[0])))(g, seeded, params)
    # the first sample d0[0] pulls half-set 1's estimate down, but D was d0 before it
    np.testing.assert_allclose(updates[0], -1.0 / d0[0], rtol=1e-6)
    assert np.all(np.asarray(-1.0 / updates[1]) < np.asarray(d0[1]))


@pytest.fixture(scope="module")
def small_set():
    import jaxcryo as jc
    from jaxcryo.forward.slicing import FourierGrid
    box, px = 16, 4.0
    truth = jc.synthetic_molecule(box, pixel_size_angstrom=px, seed=2)
    sim = jc.simulate_particles(truth, 600, pixel_size_angstrom=px, snr=0.1, seed=3)
    particles = jc.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / px, sim.ctf, FourierGrid(box))
    return box, px, particles


def _losses(small_set, method, epochs=2, **kw):
    import jaxcryo as jc
    box, px, particles = small_set
    rec = jc.reconstruct(particles, box=box, pixel_size_angstrom=px, method=method, epochs=epochs, batch_size=64,
                         halves=False, seed=1, **kw)
    return rec.history


def test_driver_seeds_psgd_with_the_exact_diagonal(small_set):
    """An exact first estimate worth 10^9 samples never moves: psgd then follows psgd-exact step
    for step (its brute-force twin); with the default weight its first epoch beats sgd's."""
    frozen = _losses(small_set, "psgd", init_samples=10**9)
    exact = _losses(small_set, "psgd-exact")
    np.testing.assert_allclose(frozen["loss"], exact["loss"], rtol=1e-4)
    assert frozen["init_seconds"] > 0
    seeded = _losses(small_set, "psgd", epochs=1)["loss"][0]
    sgd = _losses(small_set, "sgd", epochs=1)["loss"][0]
    assert seeded < sgd, (seeded, sgd)


def test_momentum_composes_before_the_line_search_not_after():
    """Where optax momentum goes in a chain with the Armijo search (README, composition with optax).

    Before the search (scale_by_hutchinson -> trace -> scale(-1) -> armijo) the search tests the
    step that is taken: it converges like psgd. After it (... -> armijo -> trace) the accepted
    step is then inflated by up to 1/(1 - decay) and overshoots: no better than plain sgd."""
    start = float(_quadratic(_zeros()))

    def final(*steps, n=10):
        return float(_quadratic(_run(optax.chain(*steps), _quadratic, _zeros(), n, _all_inputs))) / start

    pre = lambda: scale_by_hutchinson(alpha=1e-8)  # noqa: E731
    search = lambda: armijo(c=0.5)  # noqa: E731
    assert final(pre(), optax.scale(-1.0), search()) < 1e-8
    assert final(pre(), optax.trace(0.5), optax.scale(-1.0), search()) < 1e-8
    assert final(pre(), optax.trace(0.9), optax.scale(-1.0), search()) < 1e-5
    assert final(pre(), optax.scale(-1.0), search(), optax.trace(0.9)) > 1e-2
    assert final(optax.scale(-1.0), search()) > 1e-3  # plain sgd, for scale
