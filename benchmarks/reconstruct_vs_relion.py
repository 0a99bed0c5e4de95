"""Wall time and FSC to the truth: `jaxcryo reconstruct` against `relion_reconstruct --ctf`.

Both are timed as a user runs them (a fresh process: start-up, reading the STAR and the stack,
compilation, the reconstruction, writing the map), back to back and repeated, because the CPU
may be shared: the load average is recorded before every run. The FSC to the truth is the
mean over shells 1 .. N/2 - 2 of the FSC between the written map and the simulated truth.

    python benchmarks/reconstruct_vs_relion.py --volume /path/emd_1832.map --n-images 20000 \\
        --work /tmp/rvr --out benchmarks/results/reconstruct_vs_relion_cpu.json

The particles are simulated once (``jaxcryo simulate --volume MAP --snr 0.1``) into --work
and reused when present.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import cpu_model  # noqa: E402
ROOT = os.path.dirname(HERE)


def _run(cmd, cwd=None, env=None) -> tuple[float, str]:
    """Run a command; (wall seconds, output). The child's CPU seconds go to ``_run.cpu``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    _run.cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return wall, out.stdout + out.stderr


def _fsc_to_truth(path, truth) -> dict:
    from jaxcryo.fsc import fsc
    from jaxcryo.io import read_map

    vol, _ = read_map(path)
    curve = np.asarray(fsc(np.asarray(vol, np.float64), truth))
    n = truth.shape[0]
    return {"mean": float(curve[1:n // 2 - 1].mean()), "at_quarter_nyquist": float(curve[n // 4]),
            "high_shells_mean": float(curve[n // 4:n // 2 - 1].mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume", default="/work/shared/data/emd_1832.map")
    ap.add_argument("--n-images", type=int, default=20000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--work", default="/tmp/reconstruct_vs_relion")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["normal"], help="jaxcryo --method values to time")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reconstruct_vs_relion_cpu.json"))
    args = ap.parse_args(argv)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    jaxcryo = [sys.executable, "-m", "jaxcryo.cli"]
    os.makedirs(args.work, exist_ok=True)
    star = os.path.join(args.work, "particles.star")
    if not os.path.exists(star):
        _run(jaxcryo + ["simulate", "--volume", args.volume, "--n-images", str(args.n_images), "--snr",
                        str(args.snr), "--out", args.work, "--quiet"], env=env)
    from jaxcryo.io import read_map
    truth, px = read_map(os.path.join(args.work, "truth.mrc"))
    truth = np.asarray(truth, np.float64)
    relion = shutil.which("relion_reconstruct")

    # jaxcryo twice: without JAX's persistent compilation cache (a first run: everything compiled)
    # and with a cache warmed by one untimed run (what every later run of the same box sees).
    cache = os.path.join(args.work, "xla_cache")
    cold, warm = dict(env, JAXCRYO_CACHE_DIR=""), dict(env, JAXCRYO_CACHE_DIR=cache)
    for m in args.methods:
        out = os.path.join(args.work, f"warmup_{m}", "map.mrc")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        _run(jaxcryo + ["reconstruct", star, "--out", out, "--method", m, "--quiet"], env=warm)
    runs = []
    for rep in range(args.repeats):
        jobs = [(f"jaxcryo {m}{tag}", m, e) for m in args.methods
                for tag, e in ((", no compilation cache", cold), (", warm compilation cache", warm))]
        jobs += [("relion_reconstruct --ctf", None, None)] if relion else []
        for name, method, job_env in jobs:
            load = os.getloadavg()
            if method is not None:
                out = os.path.join(args.work, f"jc_{method}", "map.mrc")
                shutil.rmtree(os.path.dirname(out), ignore_errors=True)
                os.makedirs(os.path.dirname(out))
                wall, log = _run(jaxcryo + ["reconstruct", star, "--out", out, "--method", method, "--quiet"],
                                 env=job_env)
                with open(os.path.join(os.path.dirname(out), "history.json")) as fh:
                    hist = json.load(fh)
                extra = {"history_seconds": hist["seconds"], "compile_seconds": hist.get("compile_seconds"),
                         "summary": log.strip().splitlines()[-1]}
            else:
                out = os.path.join(args.work, "relion.mrc")
                wall, log = _run([relion, "--i", star, "--o", out, "--ctf"], cwd=args.work)
                extra = {}
            runs.append({"repeat": rep, "program": name, "wall_seconds": wall, "cpu_seconds": _run.cpu,
                         "load_average_before": list(load),
                         "fsc_to_truth": _fsc_to_truth(out, truth), **extra})
            print(f"{name:28s} {wall:7.1f} s (CPU {_run.cpu:6.1f} s)  FSC to truth {runs[-1]['fsc_to_truth']['mean']:.4f}  "
                  f"(load {load[0]:.1f})", flush=True)

    summary = {}
    for name in dict.fromkeys(r["program"] for r in runs):
        mine = [r for r in runs if r["program"] == name]
        summary[name] = {"wall_seconds_median": float(np.median([r["wall_seconds"] for r in mine])),
                         "wall_seconds_min": float(np.min([r["wall_seconds"] for r in mine])),
                         "cpu_seconds_median": float(np.median([r["cpu_seconds"] for r in mine])),
                         "fsc_to_truth_mean": float(np.mean([r["fsc_to_truth"]["mean"] for r in mine]))}
    ref = summary.get("relion_reconstruct --ctf")
    if ref:
        for name, s in summary.items():
            s["wall_ratio_to_relion_median"] = s["wall_seconds_median"] / ref["wall_seconds_median"]
            s["cpu_ratio_to_relion_median"] = s["cpu_seconds_median"] / ref["cpu_seconds_median"]
            # per repeat: each run against the RELION run right after it (same load)
            pairs = [(a["wall_seconds"], b["wall_seconds"]) for a in runs for b in runs
                     if a["program"] == name and b["program"] == "relion_reconstruct --ctf"
                     and a["repeat"] == b["repeat"]]
            s["wall_ratio_to_relion_per_repeat"] = [x / y for x, y in pairs]
    result = {"machine": {"node": platform.node(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                          "note": "CPU shared with other jobs: see each run's load average"},
              "data": {"volume": os.path.basename(args.volume), "n_images": args.n_images, "snr": args.snr,
                       "box": int(truth.shape[0]), "pixel_size_angstrom": float(px)},
              "fsc_to_truth": "mean over shells 1 .. N/2 - 2 of FSC(map, truth)",
              "runs": runs, "summary": summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
