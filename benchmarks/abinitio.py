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

Against RELION 3.1's SGD initial model on particles with known true poses (e.g. made by
relion_project from an EMDB map): runs ``jaxcryo abinitio PARTICLES.star --out DIR/init.mrc``
with its defaults (plus any ``--abinitio-args``) and scores the poses it found, and RELION's
(the ``_data.star`` of ``relion_refine --sgd --denovo_3dref``, its wall time given with
``--relion-seconds``), by the median angular error to the truth after the best global rotation
(either hand); the JSON names the machine and the load average before and after::

    python benchmarks/abinitio.py --particles parts.star --truth sim/particles.star \
        --relion-data relion_sgd/run_it300_data.star --relion-seconds 5400 --work /tmp/ab
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402
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
            # the SGD stage alone: the methods compared are its volume step (the refine stage is the same for all)
            out = abinitio(particles, box=box, pixel_size_angstrom=px, settings=plan, method=method, seed=seed,
                           callback=record, refine_epochs=0)
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


def star_rotations(path):
    """Image names and rotation matrices (n, 3, 3) of a particle STAR file."""
    import starfile

    from jaxcryo.geometry import euler_to_matrix

    d = starfile.read(path, always_dict=True)
    df = d["particles"] if "particles" in d else next(iter(d.values()))
    names = [str(x) for x in df["rlnImageName"]]
    euler = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64)
    return names, np.asarray(euler_to_matrix(euler))


def _image_key(name: str) -> tuple:
    index, _, stack = name.partition("@")
    return int(index), os.path.basename(stack)


def star_errors(found_star, truth_star) -> dict:
    """Median (and spread) of the angular errors of a STAR's poses to the truth after the best
    global rotation, either hand; rows matched by image (index, stack file name)."""
    names, found = star_rotations(found_star)
    tnames, truth = star_rotations(truth_star)
    keys, tkeys = [_image_key(x) for x in names], [_image_key(t) for t in tnames]
    if not set(keys) <= set(tkeys) and len({k[1] for k in keys}) == 1 and len({k[1] for k in tkeys}) == 1:
        keys, tkeys = [k[0] for k in keys], [k[0] for k in tkeys]  # one stack each, named differently
    where = {k: i for i, k in enumerate(tkeys)}
    missing = [n for n, k in zip(names, keys) if k not in where]
    if missing:
        raise SystemExit(f"{found_star}: {len(missing)} images not in {truth_star} (e.g. {missing[0]})")
    idx = np.array([where[k] for k in keys])
    err, flipped = pose_errors_deg(found, truth[idx])
    return {"n": int(len(err)), "median_error_deg": float(np.median(err)), "mean_error_deg": float(err.mean()),
            "fraction_within_15_deg": float(np.mean(err < 15.0)), "mirror_hand": bool(flipped)}


def versus_relion(args) -> dict:
    """jaxcryo abinitio (CLI, defaults) on a STAR with known truth, against RELION's SGD poses."""
    from jaxcryo import cli

    if args.jaxcryo_work:  # a run made before (e.g. by the command line, timed there)
        args.work = args.jaxcryo_work
        out = os.path.join(args.work, "init.mrc")
        wall = args.jaxcryo_seconds
        load = [float(x) for x in (args.jaxcryo_load or "nan nan nan").replace(",", " ").split()]
        load_before, load_after = load[:1], load[-1:]
    else:
        os.makedirs(args.work, exist_ok=True)
        out = os.path.join(args.work, "init.mrc")
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        rc = cli.main(["abinitio", args.particles, "--out", out, "--quiet"] + list(args.abinitio_args))
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        if rc != 0:
            raise SystemExit(f"jaxcryo abinitio failed with status {rc}")
    with open(os.path.join(args.work, "history.json")) as fh:
        hist = json.load(fh)
    jc_row = {"wall_seconds": wall, "compile_seconds": hist["compile_seconds"],
              "load_average_before": load_before, "load_average_after": load_after,
              "command": f"jaxcryo abinitio {args.particles} --out {out} " + " ".join(args.abinitio_args),
              **star_errors(os.path.join(args.work, "init_particles.star"), args.truth)}
    report = {"particles": os.path.abspath(args.particles), "truth": os.path.abspath(args.truth),
              "machine": machine(), "jaxcryo": jc_row}
    if args.relion_data:
        report["relion"] = {"data_star": os.path.abspath(args.relion_data), "wall_seconds": args.relion_seconds,
                            "load_average": args.relion_load, "note": args.relion_note,
                            **star_errors(args.relion_data, args.truth)}
    return report


def versus_table(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Ab initio against RELION 3.1 SGD ({os.path.basename(report['particles'])})", "",
             f"Machine: {m['platform']}, {m['cpu_count']} CPUs, JAX {m['jax']} on {m['backend']}.", "",
             "| program | median error (deg) | within 15 deg | wall s | load average |", "|---|---|---|---|---|"]
    j = report["jaxcryo"]
    lines.append(f"| jaxcryo abinitio | {j['median_error_deg']:.1f} | {j['fraction_within_15_deg']:.2f} | "
                 f"{j['wall_seconds']:.0f} | {j['load_average_before'][0]:.1f} -> {j['load_average_after'][0]:.1f} |")
    if "relion" in report:
        r = report["relion"]
        secs = "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| RELION 3.1 SGD{note} | {r['median_error_deg']:.1f} | {r['fraction_within_15_deg']:.2f} | {secs} | "
                     f"{r['load_average'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--particles", default=None, metavar="STAR",
                    help="compare with RELION instead: particles with known truth (poses ignored by abinitio)")
    ap.add_argument("--truth", default=None, metavar="STAR", help="the particles' true poses (same image names)")
    ap.add_argument("--relion-data", default=None, metavar="STAR", help="RELION SGD's _data.star on these particles")
    ap.add_argument("--relion-seconds", type=float, default=None, help="RELION's wall time (s)")
    ap.add_argument("--relion-load", default=None, help="load average during the RELION run (text)")
    ap.add_argument("--relion-note", default=None, help="e.g. 'iteration 120 of 300 (unfinished)'")
    ap.add_argument("--jaxcryo-work", default=None, metavar="DIR",
                    help="score a finished jaxcryo run in DIR (init_particles.star, history.json) instead of "
                         "running it; give its --jaxcryo-seconds and --jaxcryo-load")
    ap.add_argument("--jaxcryo-seconds", type=float, default=None)
    ap.add_argument("--jaxcryo-load", default=None)
    ap.add_argument("--abinitio-args", nargs=argparse.REMAINDER, default=[],
                    help="extra jaxcryo abinitio arguments (last on the line)")
    ap.add_argument("--work", default="abinitio_vs_relion", help="folder for jaxcryo's outputs")
    ap.add_argument("--tag", default="heldout", help="results file name: abinitio_vs_relion_<tag>")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.particles:
        if not args.truth:
            ap.error("--particles needs --truth")
        report = versus_relion(args)
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"abinitio_vs_relion_{args.tag}")
        with open(base + ".json", "w") as fh:
            json.dump(report, fh, indent=1)
        text = versus_table(report)
        with open(base + ".md", "w") as fh:
            fh.write(text)
        print(text)
        return 0
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
