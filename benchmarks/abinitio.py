"""Ab initio benchmark: pose consistency with the truth and time, by epoch, for each volume-step
optimizer (psgd: Hutchinson diagonal; sgd: plain gradient; psgd-exact: the exact
posterior-weighted diagonal of each minibatch), on particles simulated from a synthetic molecule.

Correctness first: each epoch's poses are compared with the truth after the best global
rotation, either hand (:func:`jaxcryo.abinitio.pose_errors_deg`); compilation is timed apart
(``compile_seconds``) and the epoch times exclude it. "Time to a map refine can finish from"
is the run time (compilation excluded) of the first epoch whose median angular error is below
the global grid's step (30 deg at HEALPix order 1): from there, refine's local searches
converge (its global search at 15 deg is not needed).

    python benchmarks/abinitio.py --size small --seeds 0 1   # box 16, 240 particles: ~2 min on 2 CPU cores

Writes benchmarks/results/abinitio_<size>.{json,md} with the machine named.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxcryo as jc  # noqa: E402
from jaxcryo.abinitio import abinitio, pose_errors_deg, schedule  # noqa: E402
from jaxcryo.forward import FourierGrid  # noqa: E402

SIZES = {
    # the tests' regime: box 16, 240 particles, SNR 3, 30 deg grid, one compilation per method
    "small": dict(box=16, pixel_size_angstrom=6.0, n_images=240, snr=3.0, epochs=10, batch_size=24,
                  max_batch_size=24, levels=1, fine_from=2.0, final_resolution_angstrom=14.0, max_shift_px=1.0),
    # harder: SNR 1, box 20, growing minibatches over two levels
    "small-snr1": dict(box=20, pixel_size_angstrom=5.0, n_images=300, snr=1.0, epochs=12, batch_size=24,
                       max_batch_size=48, levels=2, fine_from=2.0, final_resolution_angstrom=14.0, max_shift_px=1.5),
    # for a GPU machine: SNR 0.1 as the held-out test, 15 deg grid in the last third
    "medium": dict(box=48, pixel_size_angstrom=3.0, n_images=4000, snr=0.1, epochs=12, batch_size=64,
                   max_batch_size=256, levels=3, fine_from=0.6, final_resolution_angstrom=12.0, max_shift_px=2.0),
}
METHODS = ("psgd", "sgd", "psgd-exact")


def machine() -> dict:
    """Where this ran: platform and JAX devices."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def run(size: str, methods, seeds) -> dict:
    cfg = SIZES[size]
    box, px, n = cfg["box"], cfg["pixel_size_angstrom"], cfg["n_images"]
    truth = jc.synthetic_molecule(box, pixel_size_angstrom=px, seed=3)
    sim = jc.simulate_particles(truth, n, pixel_size_angstrom=px, snr=cfg["snr"], seed=4,
                                max_shift_px=0.5 * cfg["max_shift_px"],
                                interpolation="trilinear")
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3))
    particles = jc.prepare_particles(sim.images, eye, np.zeros((n, 2), np.float32), sim.ctf, FourierGrid(box))
    plan = schedule(epochs=cfg["epochs"], box=box, pixel_size_angstrom=px,
                    final_resolution_angstrom=cfg["final_resolution_angstrom"], batch_size=cfg["batch_size"],
                    max_batch_size=cfg["max_batch_size"], n_particles=n, fine_from=cfg["fine_from"],
                    max_shift_px=cfg["max_shift_px"], levels=cfg["levels"])
    results = []
    for method in methods:
        for seed in seeds:
            errors = []

            def record(state):
                err, _ = pose_errors_deg(np.asarray(state.rotations), sim.rotations)
                errors.append(float(np.median(err)))

            t0 = time.perf_counter()
            out = abinitio(particles, box=box, pixel_size_angstrom=px, settings=plan, method=method, seed=seed,
                           callback=record)
            wall = time.perf_counter() - t0
            h = out.history
            grid_step = h["angular_step_deg"][0]
            ready = next((i for i, e in enumerate(errors) if e < grid_step), None)
            err, flipped = pose_errors_deg(out.rotations, sim.rotations)
            results.append({
                "method": method, "seed": seed, "wall_seconds": wall, "compile_seconds": h["compile_seconds"][0],
                "epoch": h["epoch"], "seconds": h["seconds"], "resolution_angstrom": h["resolution_angstrom"],
                "angular_step_deg": h["angular_step_deg"], "temperature": h["temperature"], "loss": h["loss"],
                "median_error_deg": errors, "final_median_error_deg": float(np.median(err)),
                "final_fraction_within_grid_step": float(np.mean(err < h["angular_step_deg"][-1])),
                "mirror_hand": bool(flipped),
                "seconds_to_refinable": None if ready is None else h["seconds"][ready],
                "epochs_to_refinable": None if ready is None else ready + 1})
            r = results[-1]
            print(f"{method:10s} seed {seed}: median error by epoch "
                  f"{' '.join(f'{e:.0f}' for e in errors)} deg; final {r['final_median_error_deg']:.1f} deg; "
                  f"refinable after {r['epochs_to_refinable']} epochs / {r['seconds_to_refinable']} s; "
                  f"compile {r['compile_seconds']:.0f} s", flush=True)
    return {"size": size, "config": cfg, "machine": machine(), "results": results}


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Ab initio benchmark ({report['size']})", "",
             f"Machine: {m['platform']}, {m['cpu_count']} CPUs, JAX {m['jax']} on {m['backend']}.",
             f"Config: {json.dumps(report['config'])}", "",
             "| method | seed | median error by epoch (deg) | final median (deg) | within grid step | "
             "epochs / s to < grid step | run s | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['method']} | {r['seed']} | {' '.join(f'{e:.0f}' for e in r['median_error_deg'])} | "
                     f"{r['final_median_error_deg']:.1f} | {r['final_fraction_within_grid_step']:.2f} | "
                     f"{r['epochs_to_refinable']} / "
                     f"{'-' if r['seconds_to_refinable'] is None else format(r['seconds_to_refinable'], '.1f')} | "
                     f"{r['seconds'][-1]:.1f} | {r['compile_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    report = run(args.size, args.methods, args.seeds)
    os.makedirs(args.out, exist_ok=True)
    backend = report["machine"]["backend"]
    tag = f"abinitio_{args.size}" + ("" if backend == "cpu" else f"_{backend}")
    with open(os.path.join(args.out, tag + ".json"), "w") as fh:
        json.dump(report, fh, indent=1)
    text = table(report)
    with open(os.path.join(args.out, tag + ".md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
