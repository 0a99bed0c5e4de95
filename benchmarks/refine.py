"""Refinement benchmarks. Part 1 (this file's ``pose`` part): pose-stage throughput.

Pose stage: image-pose comparisons per second of :func:`jaxcryo.poses.score_poses` (B images
x M rotations x S shifts at a frequency limit r_limit), against this machine's matmul rate
measured with a plain ``jnp.dot`` of the same shape as the cross term, (B*S, 2P') x (2P', M).
Checks correctness first (dense scores against the brute-force loop on a slice of the
problem), compiles before timing, times with block_until_ready, and writes JSON (machine and
load average named) plus a Markdown table.

    python benchmarks/refine.py pose [--box 32 64] [--r-limit 8 16] [--batch 32] [--order 2]
        [--shift-max 2] [--shift-step 1] [--chunk 512] [--repeats 3] [--out benchmarks/results]

Timings are medians (and bests) of ``repeats`` calls; on a shared machine the load average
before and after is recorded beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo import poses
from jaxcryo.forward import FourierGrid, make_ctf_params, volume_to_ft
from jaxcryo.forward.model import ctf_batch
from jaxcryo.simulate import synthetic_molecule


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    dev = jax.devices()[0]
    return {"platform": platform.platform(), "processor": cpu_model(),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(), "device": str(dev.device_kind),
            "n_devices": jax.device_count(), "jax": jax.__version__}


def timeit(fn, *args, repeats):
    """Median and best wall time of ``repeats`` calls after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times))


def pose_stage(box, r_limit, batch, order, shift_max, shift_step, chunk, interpolation, repeats, precision=None):
    """Time one global pose search; returns a dict of figures."""
    pixel_size = 2.0
    grid = FourierGrid(box)
    vol = volume_to_ft(jnp.asarray(synthetic_molecule(box, pixel_size_angstrom=pixel_size)), interpolation)
    key = jax.random.PRNGKey(0)
    data = jax.random.normal(key, (batch, grid.n_pixels, 2), jnp.float32)
    ctf_params = jax.tree.map(jnp.asarray, make_ctf_params(batch, pixel_size_angstrom=pixel_size,
                                                           defocus_u_angstrom=np.linspace(1e4, 2e4, batch)))
    ctf = ctf_batch(ctf_params, grid, batch, jnp.float32)
    rot = jnp.asarray(poses.so3_grid(order))
    sh = jnp.asarray(poses.shift_grid(shift_max, shift_step))
    m, s = rot.shape[0], sh.shape[0]
    p = poses.score_pixels(grid, r_limit).size

    score = jax.jit(lambda v, d, c, r, t: poses.score_poses(v, d, c, r, t, grid, r_limit=r_limit,
                                                            interpolation=interpolation, chunk=chunk,
                                                            precision=precision))
    # correctness first: two images, a few rotations and shifts, against the explicit loop
    few_r, few_s = rot[:: max(1, m // 3)][:3], sh[:2]
    dense = np.asarray(poses.score_poses(vol, data[:2], ctf[:2], few_r, few_s, grid, r_limit=r_limit,
                                         interpolation=interpolation, precision=precision))
    loop = poses.brute_force_scores(vol, data[:2], ctf[:2], few_r, few_s, grid, r_limit=r_limit,
                                    interpolation=interpolation)
    rel_err = float(np.abs(dense - loop).max() / np.abs(loop).max())

    t_score, best_score = timeit(score, vol, data, ctf, rot, sh, repeats=repeats)
    pix = poses._PixelSet(grid.box, grid.freqs[poses.score_pixels(grid, r_limit)])
    size = min(chunk, m)
    padded = jnp.concatenate([rot, jnp.broadcast_to(jnp.eye(3), (-m % size, 3, 3))]).reshape(-1, size, 3, 3)
    project = jax.jit(lambda v, r: jax.lax.map(poses._projector(v, pix, interpolation), r))
    t_project, _ = timeit(project, vol, padded, repeats=repeats)
    lhs = jax.random.normal(key, (batch * s, 2 * p), jnp.float32)
    rhs = jax.random.normal(key, (2 * p, m), jnp.float32)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision))
    t_dot, best_dot = timeit(dot, lhs, rhs, repeats=repeats)
    flops_dot = 2.0 * batch * s * 2 * p * m
    flops_score = flops_dot + 2.0 * batch * p * m  # cross term + norm term
    comparisons = float(batch) * m * s
    return {
        "box": box, "r_limit": r_limit, "pixels_used": int(p), "batch": batch, "healpix_order": order,
        "angular_step_deg": poses.angular_step_deg(order), "rotations": int(m), "shifts": int(s),
        "chunk": chunk, "interpolation": interpolation, "precision": str(precision),
        "rel_error_dense_vs_loop": rel_err,
        "score_s": t_score, "comparisons_per_s": comparisons / t_score,
        "score_s_best": best_score, "comparisons_per_s_best": comparisons / best_score,
        "score_gflops": flops_score / t_score / 1e9,
        "projection_s": t_project, "projection_fraction": t_project / t_score,
        "matmul_s_same_shape": t_dot, "matmul_gflops": flops_dot / t_dot / 1e9,
        "matmul_comparisons_per_s": comparisons / t_dot,
        "fraction_of_matmul_rate": t_dot / t_score, "fraction_of_matmul_rate_best": best_dot / best_score,
        "scratch_bytes_estimate": int(4 * (2 * batch * s * p + min(chunk, m) * p * (4 + 3 * 8 + 2 * 8)
                                           + batch * s * min(chunk, m) + 2 * batch * s * m)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["pose"], help="which benchmark to run")
    ap.add_argument("--box", type=int, nargs="+", default=[32])
    ap.add_argument("--r-limit", type=float, nargs="+", default=[8.0],
                    help="frequency limit in Fourier pixels, one per box or one for all")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--shift-max", type=float, default=2.0)
    ap.add_argument("--shift-step", type=float, default=1.0)
    ap.add_argument("--chunk", type=int, default=512, help="rotations per scan step (CPU: ~512 keeps them in cache)")
    ap.add_argument("--interpolation", default="trilinear")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--highest", action="store_true", help="float32 matmuls at HIGHEST precision (GPU: no TF32)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="file name suffix (default: the JAX backend)")
    args = ap.parse_args(argv)

    precision = jax.lax.Precision.HIGHEST if args.highest else None
    load_before = os.getloadavg()
    if len(args.r_limit) not in (1, len(args.box)):
        ap.error("--r-limit takes one value or one per --box")
    limits = args.r_limit * len(args.box) if len(args.r_limit) == 1 else args.r_limit
    rows = [pose_stage(box, r_limit, args.batch, args.order, args.shift_max, args.shift_step, args.chunk,
                       args.interpolation, args.repeats, precision)
            for box, r_limit in zip(args.box, limits)]
    result = {"machine": machine(), "load_average_1_5_15_before": load_before,
              "load_average_1_5_15_after": os.getloadavg(), "results": rows}
    tag = args.tag or jax.default_backend()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pose_stage_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| box | r_limit | P' | B | M | S | comparisons/s | pose-stage GFLOP/s | matmul GFLOP/s | "
             "fraction of matmul rate (best) | projection share | rel. error vs loop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['box']} | {r['r_limit']:g} | {r['pixels_used']} | {r['batch']} | {r['rotations']} | "
                     f"{r['shifts']} | {r['comparisons_per_s']:.3g} | {r['score_gflops']:.3g} | "
                     f"{r['matmul_gflops']:.3g} | {r['fraction_of_matmul_rate']:.2f} "
                     f"({r['fraction_of_matmul_rate_best']:.2f}) | "
                     f"{r['projection_fraction']:.2f} | {r['rel_error_dense_vs_loop']:.1e} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, f"pose_stage_{tag}.md"), "w") as f:
        f.write(f"Pose-stage throughput on {result['machine']['processor']} ({result['machine']['jax_backend']}, "
                f"{result['machine']['cpu_count']} CPUs, "
                f"load average before {load_before[0]:.1f}).\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
