"""Refinement benchmarks: ``pose``, the pose stage's throughput; ``epochs``, refine's time and
quality by epoch on particles whose true poses are known.

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

Refine by epoch: ``jc.refine`` on a STAR file and a reference (e.g. the set made by
``benchmarks/refine_vs_relion.py``: RELION-simulated particles and the 40 A low-pass of the
truth), once per volume-step method, recording after every epoch the search in use, the
half-map resolution, the median angular error of the poses to the truth, the FSC of the map to
the truth and the seconds so far (compilation excluded, reported apart):

    python benchmarks/refine.py epochs --star /tmp/refine_vs_relion/particles.star \
        --reference /tmp/refine_vs_relion/ref.mrc --truth-star /tmp/refine_vs_relion/sim/particles.star \
        --truth-map /tmp/refine_vs_relion/sim/truth.mrc --methods psgd sgd
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

from jaxcryo import poses
from jaxcryo.forward import FourierGrid, make_ctf_params, volume_to_ft
from jaxcryo.forward.model import ctf_batch
from jaxcryo.simulate import synthetic_molecule


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
    search = jax.jit(lambda v, d, c, r, t: poses.search_top_k(v, d, c, r, t, grid, k=4, r_limit=r_limit,
                                                              interpolation=interpolation, chunk=chunk,
                                                              precision=precision))
    t_search, _ = timeit(search, vol, data, ctf, rot, sh, repeats=repeats)
    # local search: 27 rotations x 9 shifts around each image's own pose
    cand_r = poses.local_rotations(rot[:batch], poses.angular_step_deg(order) / 2, 1)
    cand_s = poses.local_shifts(jnp.zeros((batch, 2)), shift_step / 2, 1)
    local = jax.jit(lambda v, d, c, r, t: poses.score_local(v, d, c, r, t, grid, r_limit=r_limit,
                                                            interpolation=interpolation, chunk=chunk,
                                                            precision=precision))
    t_local, _ = timeit(local, vol, data, ctf, cand_r, cand_s, repeats=repeats)
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
        "search_top_k_s": t_search, "search_top_k_comparisons_per_s": comparisons / t_search,
        "local_candidates": [int(cand_r.shape[1]), int(cand_s.shape[1])], "local_s": t_local,
        "local_comparisons_per_s": float(batch) * cand_r.shape[1] * cand_s.shape[1] / t_local,
        "memory_bytes_estimate": poses.memory_bytes(batch, m, s, grid, r_limit=r_limit,
                                                    interpolation=interpolation, chunk=chunk),
    }


def refine_by_epoch(args):
    """jc.refine once per method; per epoch: search, resolution, pose error and FSC to the truth."""
    import dataclasses

    import jaxcryo as jc
    from jaxcryo.forward.model import ft_to_volume
    from jaxcryo.fsc import fsc
    from jaxcryo.io import read_map
    from jaxcryo.pipeline import load_particles, open_particles
    from jaxcryo.reconstruct import half_sets
    from jaxcryo.refine import rotation_angle_deg

    table, stack = open_particles(args.star, require_poses=False)
    with stack:
        box, px, n = stack.box_size, float(table.pixel_size_angstrom[0]), len(table)
        grid = FourierGrid(box)
        particles = load_particles(dataclasses.replace(table, shifts_angstrom=np.zeros((n, 2))), stack, grid)
    reference, _ = read_map(args.reference)
    truth = np.asarray(read_map(args.truth_map)[0], np.float64)
    truth_table, _ = open_particles(args.truth_star, require_poses=True)
    where = {int(name.split("@")[0]): i for i, name in enumerate(truth_table.image_names)}
    order = np.array([where[int(name.split("@")[0])] for name in table.image_names])
    true_rot = np.asarray(jc.geometry.euler_to_matrix(truth_table.euler_deg[order]), np.float64)
    groups = half_sets(n, halves=True, seed=0)
    runs = {}
    for method in args.methods:
        rows = []

        def on_epoch(state):
            rot = np.zeros((n, 3, 3))
            for gi, members in enumerate(groups):
                keep = members >= 0
                rot[members[keep]] = np.asarray(state.poses.rotations[gi])[keep]
            err = rotation_angle_deg(rot, true_rot)
            h = state.recon.history
            vol = np.asarray(ft_to_volume(state.recon.params.mean(0), "trilinear"), np.float64)
            curve = np.asarray(fsc(vol, truth))
            rows.append({"epoch": h["epoch"][-1], "mode": h["mode"][-1], "angular_step_deg": h["angular_step_deg"][-1],
                         "r_limit": h["r_limit"][-1], "resolution_angstrom": h["resolution_angstrom"][-1],
                         "median_angle_error_deg": float(np.median(err)),
                         "fsc_to_truth_mean": float(curve[1:box // 2 - 1].mean()), "seconds": h["seconds"][-1]})
            print(method, rows[-1], flush=True)

        result = jc.refine(particles, reference, box=box, pixel_size_angstrom=px, method=method, callback=on_epoch)
        runs[method] = {"by_epoch": rows, "compile_seconds": result.reconstruction.history.get("compile_seconds")}
    out = {"machine": machine(), "load_average_1_5_15": os.getloadavg(), "star": os.path.abspath(args.star),
           "n_particles": n, "box": box, "pixel_size": px, "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"refine_epochs_{args.tag or jax.default_backend()}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["pose", "epochs"], help="which benchmark to run")
    ap.add_argument("--star", help="epochs: particle STAR file (poses ignored)")
    ap.add_argument("--reference", help="epochs: starting map")
    ap.add_argument("--truth-star", help="epochs: STAR file with the true poses (same image names)")
    ap.add_argument("--truth-map", help="epochs: the true map")
    ap.add_argument("--methods", nargs="+", default=["psgd", "sgd"], help="epochs: volume-step methods")
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
    if args.part == "epochs":
        if not all((args.star, args.reference, args.truth_star, args.truth_map)):
            ap.error("epochs needs --star, --reference, --truth-star and --truth-map")
        return refine_by_epoch(args)

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
             "fraction of matmul rate (best) | projection share | streamed top-k comparisons/s | "
             "local (27 x 9) comparisons/s | rel. error vs loop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['box']} | {r['r_limit']:g} | {r['pixels_used']} | {r['batch']} | {r['rotations']} | "
                     f"{r['shifts']} | {r['comparisons_per_s']:.3g} | {r['score_gflops']:.3g} | "
                     f"{r['matmul_gflops']:.3g} | {r['fraction_of_matmul_rate']:.2f} "
                     f"({r['fraction_of_matmul_rate_best']:.2f}) | "
                     f"{r['projection_fraction']:.2f} | {r['search_top_k_comparisons_per_s']:.3g} | "
                     f"{r['local_comparisons_per_s']:.3g} | {r['rel_error_dense_vs_loop']:.1e} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, f"pose_stage_{tag}.md"), "w") as f:
        f.write(f"Pose-stage throughput on {result['machine']['processor']} ({result['machine']['jax_backend']}, "
                f"{result['machine']['cpu_count']} CPUs, "
                f"load average before {load_before[0]:.1f}).\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
