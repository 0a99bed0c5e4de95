"""Images per second for loss+grad and for grad+HVP, per box size and interpolation.

Checks correctness first (the fused pass against jax.grad and jvp-of-grad), compiles before
timing, times with block_until_ready, and writes JSON (machine named) plus a Markdown table.

    python benchmarks/throughput.py [--boxes 64 128] [--batch 128] [--repeats 5] [--out benchmarks/results]

"naive" is what autodiff gives without exploiting structure: jax.value_and_grad of the loss,
then a separate jvp-of-grad HVP (two forward and two adjoint passes). "fused" is
jaxcryo.loss.value_grad_hvp: one forward and one adjoint pass over stacked channels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

import jaxcryo as jc  # noqa: E402
from jaxcryo.curvature import hvp
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.loss import Problem, loss, value_grad_hvp



def timeit(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(box, interpolation, batch, repeats):
    key = jax.random.PRNGKey(0)
    grid = FourierGrid(box)
    problem = Problem(grid=grid, interpolation=interpolation, lam=1e-4)
    rot = jc.random_rotations(key, batch)
    ctf = jc.make_ctf_params(batch, pixel_size_angstrom=1.5, defocus_u_angstrom=np.linspace(1e4, 2e4, batch))
    data = jax.random.normal(key, (batch, grid.n_pixels, 2))
    particles = jc.Particles(data=data, rotations=rot, ctf=jax.tree.map(jnp.asarray, ctf), weight=jnp.ones(batch))
    params = 0.1 * jax.random.normal(jax.random.PRNGKey(1), grid.volume_shape + (2,))
    z = jax.random.rademacher(jax.random.PRNGKey(2), (1,) + params.shape, dtype=params.dtype)

    loss_grad = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, problem)))
    naive = jax.jit(lambda p, b, zz: (loss_grad(p, b), hvp(lambda q: loss(q, b, problem), p, zz[0])))
    fused_grad = jax.jit(lambda p, b: value_grad_hvp(p, b, problem)[:2])
    fused = jax.jit(lambda p, b, zz: value_grad_hvp(p, b, problem, zz))

    # correctness first
    (v0, g0), h0 = naive(params, particles, z)
    v1, g1, h1 = fused(params, particles, z)
    scale = lambda a: float(jnp.max(jnp.abs(a))) + 1e-30  # noqa: E731
    err = {"loss": abs(float(v1 - v0)) / abs(float(v0)), "grad": scale(g1 - g0) / scale(g0),
           "hvp": scale(h1[0] - h0) / scale(h0)}
    assert all(e < 1e-3 for e in err.values()), err

    out = {"box": box, "interpolation": interpolation, "batch": batch, "rel_error_fused_vs_autodiff": err}
    out["loss_grad_naive_img_s"] = batch / timeit(loss_grad, params, particles, repeats=repeats)
    out["loss_grad_fused_img_s"] = batch / timeit(fused_grad, params, particles, repeats=repeats)
    out["grad_hvp_naive_img_s"] = batch / timeit(naive, params, particles, z, repeats=repeats)
    out["grad_hvp_fused_img_s"] = batch / timeit(fused, params, particles, z, repeats=repeats)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--interpolations", nargs="+", default=["nearest", "trilinear", "nufft"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    rows = []
    for box in args.boxes:
        for interp in args.interpolations:
            if interp == "nufft" and jax.default_backend() != "cpu":
                continue  # the PyPI jax-finufft wheel is CPU-only
            r = bench(box, interp, args.batch, args.repeats)
            rows.append(r)
            print(f"box {box:4d} {interp:9s}  loss+grad {r['loss_grad_fused_img_s']:9.0f} img/s "
                  f"(naive {r['loss_grad_naive_img_s']:8.0f})   grad+HVP {r['grad_hvp_fused_img_s']:9.0f} img/s "
                  f"(naive {r['grad_hvp_naive_img_s']:8.0f})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = jax.default_backend()
    with open(os.path.join(args.out, f"throughput_{tag}.json"), "w") as fh:
        json.dump({"machine": machine(), "results": rows}, fh, indent=1)
    with open(os.path.join(args.out, f"throughput_{tag}.md"), "w") as fh:
        fh.write(f"Machine: {machine()}\n\n| box | interpolation | loss+grad img/s (naive) | grad+HVP img/s (naive) |\n"
                 "|---|---|---|---|\n")
        for r in rows:
            fh.write(f"| {r['box']} | {r['interpolation']} | {r['loss_grad_fused_img_s']:.0f} "
                     f"({r['loss_grad_naive_img_s']:.0f}) | {r['grad_hvp_fused_img_s']:.0f} "
                     f"({r['grad_hvp_naive_img_s']:.0f}) |\n")


if __name__ == "__main__":
    main()
