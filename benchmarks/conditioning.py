"""Conditioning of the reconstruction Hessian by Fourier radius (the paper's kappa figure, extended).

Cases, each for uniformly random orientations unless said otherwise:
  nearest, no CTF   exact diagonal (the Hessian is diagonal: this is the true kappa), checked
                    against an independent brute-force count of plane hits (numpy);
  nearest, CTF      exact diagonal;
  trilinear, no CTF / CTF   exact diagonal of the (non-diagonal) Hessian and its Hutchinson
                    estimate, with the estimate's relative error as probes accumulate;
  preferred views   nearest, no CTF, tilt concentrated near 0 (a common pathology);
  --star FILE       the poses (and CTF) of a particle STAR file.
For each: kappa(R) over the ball, the bound (N + lam)/(N p + lam), the per-shell spread of
diag(H), and of diag(P H) for the exact and the Hutchinson preconditioner.

    python benchmarks/conditioning.py --size small     # box 32, CPU, about a minute
    python benchmarks/conditioning.py --size medium    # box 64, CPU, a few minutes
    python benchmarks/conditioning.py --size full      # box 64 and 128 (GPU advised)

Writes benchmarks/results/conditioning_<size>.{json,png,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402
from jaxcryo.conditioning import (brute_force_hits, conditioning_report, kappa_from_hits,  # noqa: E402
                                  particles_from_table, plot_reports, pose_particles, uniform_particles)
from jaxcryo.geometry import euler_to_matrix  # noqa: E402

SIZES = {
    # box: (n_images, hutchinson probes)
    "small": {32: (10000, 16)},
    "medium": {64: (20000, 4)},
    "full": {64: (50000, 32), 128: (50000, 16)},
}



def preferred_view_particles(n: int, seed: int = 0, tilt_sigma_deg: float = 20.0):
    """Poses with tilt ~ |N(0, sigma)| (mostly top views), rot and psi uniform."""
    rng = np.random.default_rng(seed)
    euler = np.stack([rng.uniform(-180, 180, n), np.abs(rng.normal(0, tilt_sigma_deg, n)) % 180,
                      rng.uniform(-180, 180, n)], -1)
    return pose_particles(np.asarray(euler_to_matrix(euler)))


def brute_force_check(particles, box: int) -> dict:
    """kappa(R) from an independent numpy count of hits (nearest, no CTF) vs the library."""
    t0 = time.perf_counter()
    hits = brute_force_hits(np.asarray(particles.rotations), box)
    ref = kappa_from_hits(hits, box)
    return {"kappa_brute_force": ref.tolist(), "seconds": time.perf_counter() - t0}


def markdown(results: dict) -> str:
    lines = [f"# Conditioning ({results['size']})", "",
             f"Machine: {results['machine']['platform']}, {results['machine']['cpu_count']} CPUs, "
             f"JAX {results['machine']['jax']} on {results['machine']['backend']}.", ""]
    for box, cases in results["boxes"].items():
        first = next(iter(cases.values()))
        r_all = first["radius"]
        picks = sorted({r_all[len(r_all) // 4], r_all[len(r_all) // 2], r_all[(3 * len(r_all)) // 4], r_all[-1]})
        lines += [f"## box {box}, lam {first['lam']:g}", "",
                  "kappa(R) over the ball round(|k|) <= R (Hermitian-volume diagonal, per image):", "",
                  "| case | images | " + " | ".join(f"R={r}" for r in picks)
                  + f" | kappa(P_exact H) | kappa(P_hutch H) | shell {picks[-1]}: max/min H | p95/p5 H "
                  "| max/min P_hutch H | p95/p5 P_hutch H |",
                  "|---|---|" + "---|" * len(picks) + "---|---|---|---|---|---|"]
        last = picks[-1]
        for name, rep in cases.items():
            hut = "kappa_after_hutchinson" in rep
            lines.append(f"| {name} | {rep['n_images']} | " + " | ".join(f"{rep['kappa'][r]:.3g}" for r in picks)
                         + f" | {rep['kappa_after_exact'][last]:.3g} | "
                         + (f"{rep['kappa_after_hutchinson'][last]:.3g}" if hut else "-")
                         + f" | {rep['spread_raw'][last]:.3g} | {rep['spread90_raw'][last]:.3g} | "
                         + (f"{rep['spread_hutchinson'][last]:.3g} | {rep['spread90_hutchinson'][last]:.3g}"
                            if hut else "- | -") + " |")
        blank = " |" * 7
        lines.append("| bound, counted p | | " + " | ".join(f"{first['bound_counted'][r]:.3g}" for r in picks)
                     + blank)
        lines.append("| bound, p = 3/(4R) | | " + " | ".join(f"{first['bound_approx'][r]:.3g}" for r in picks)
                     + blank)
        lines += ["", "kappa(P H): max/min of diag(P H) over the ball at the largest R; P_exact = 1/max(diag, alpha) "
                  "(1 unless alpha floors empty voxels); P_hutch from the full-data Hutchinson estimate. "
                  "The bound applies to nearest, no CTF (with CTF the origin is no longer the largest entry)."]
        check = cases.get("nearest, no CTF", {}).get("brute_force")
        if check:
            lines += ["", f"Independent brute-force count of plane hits vs the library (nearest, no CTF, lam 0): "
                          f"max relative difference of kappa(R) {check['max_relative_difference']:.2e} "
                          f"over R = 0..{r_all[-1]}."]
        for name, rep in cases.items():
            if "hutchinson_error" in rep:
                he = rep["hutchinson_error"]
                lines += ["", f"Hutchinson relative error of diag(H), {name}: "
                          + ", ".join(f"{p} probes {e:.3f}" for p, e in zip(he["probes"], he["relative_error"]))]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=tuple(SIZES), default="small")
    ap.add_argument("--lam", type=float, default=1e-4)
    ap.add_argument("--star", default=None, help="optional particle STAR file: condition its poses too")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {"size": args.size, "machine": machine(), "boxes": {}}
    t_start = time.perf_counter()
    for box, (n, probes) in SIZES[args.size].items():
        cases = {}
        setups = [
            ("nearest, no CTF", uniform_particles(n, seed=0), "nearest", 0),
            ("nearest, CTF", uniform_particles(n, seed=0, with_ctf=True), "nearest", 0),
            ("trilinear, no CTF", uniform_particles(n, seed=0), "trilinear", probes),
            ("trilinear, CTF", uniform_particles(n, seed=0, with_ctf=True), "trilinear", probes),
            ("preferred views (nearest)", preferred_view_particles(n), "nearest", 0),
        ]
        if args.star:
            from jaxcryo.io import read_particles
            star_parts, _ = particles_from_table(read_particles(args.star), box)
            setups.append((f"STAR {os.path.basename(args.star)}", star_parts, "nearest", 0))
        for name, parts, interp, k in setups:
            t0 = time.perf_counter()
            rep = conditioning_report(parts, box, interpolation=interp, lam=args.lam, n_probes=k)
            rep["seconds"] = time.perf_counter() - t0
            if name == "nearest, no CTF":
                # The independent check runs without lam: the hits themselves.
                plain = conditioning_report(parts, box, interpolation=interp, lam=0.0)
                rep["brute_force"] = brute_force_check(parts, box)
                bf = rep["brute_force"]
                bf["kappa_library_lam0"] = plain["kappa"]
                k_lib, k_ref = np.asarray(plain["kappa"]), np.asarray(bf["kappa_brute_force"])
                bf["max_relative_difference"] = float(np.max(np.abs(k_lib - k_ref) / k_ref))
            cases[name] = rep
            print(f"box {box} {name}: kappa(R_max) = {rep['kappa'][-1]:.3g} "
                  f"(bound {rep['bound_counted'][-1]:.3g}), {rep['seconds']:.1f} s", flush=True)
        results["boxes"][str(box)] = cases
        plot_reports(cases, os.path.join(args.out, f"conditioning_{args.size}_box{box}.png"),
                     title=f"box {box}, {n} images, lam {args.lam:g}")
    results["seconds"] = time.perf_counter() - t_start
    with open(os.path.join(args.out, f"conditioning_{args.size}.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(args.out, f"conditioning_{args.size}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
