"""Epoch time against device count and against data-set size, with peak memory per process.

Each configuration runs in its own process (the forced CPU device count is fixed at start-up,
and peak memory is per process). Correctness first: every device count must reproduce the
one-device losses (float32 rounding) before its time is reported. Epoch times are from
``reconstruct``'s history (the epoch is compiled ahead of the first one), the median of the
epochs after the first.

    python benchmarks/scaling.py [--box 32] [--base 1000] [--devices 1 2 4] [--scales 1 2 5 10]
                                 [--epochs 4] [--batch 256] [--out benchmarks/results]

On a machine with real accelerators (GPUs) pass ``--real``: device counts then select the
first N real devices instead of forcing CPU devices.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def child(args):
    """One run: random particles (seeded), reconstruct, print one JSON line."""
    import jax

    import jaxcryo as jc

    n, box, devices = args.n, args.box, args.devices[0]
    grid = jc.FourierGrid(box)
    rng = np.random.default_rng(0)
    rotations = np.asarray(jc.random_rotations(jax.random.PRNGKey(0), n))
    ctf = jc.make_ctf_params(n, pixel_size_angstrom=1.5, defocus_u_angstrom=rng.uniform(1e4, 2.5e4, n),
                             dtype=np.float32)
    ctf = jax.tree.map(np.asarray, ctf)
    data = rng.standard_normal((n, grid.n_pixels, 2)).astype(np.float32)
    particles = jc.Particles(data=data, rotations=rotations, ctf=ctf, weight=np.ones(n, np.float32))
    r = jc.reconstruct(particles, box=box, pixel_size_angstrom=1.5, method="psgd", epochs=args.epochs,
                       batch_size=args.batch, seed=0, devices=devices)
    secs = np.diff([0.0] + r.history["seconds"])
    epoch_s = float(np.median(secs[1:])) if len(secs) > 1 else float(secs[0])
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((r.state.params, r.state.opt_state)))
    print(json.dumps({
        "devices": devices, "n_particles": n, "box": box, "batch": args.batch,
        "epoch_seconds": epoch_s, "epoch_seconds_all": [float(s) for s in secs],
        "images_per_second": n / epoch_s, "microseconds_per_particle": 1e6 * epoch_s / n,
        "compile_seconds": r.history["compile_seconds"], "loss": r.history["loss"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "particle_bytes": int(data.nbytes + rotations.nbytes), "replicated_state_bytes_per_device": int(state_bytes),
        "device_kind": jax.devices()[0].device_kind, "jax_devices": jax.device_count(),
    }))


def run_child(devices, n, args):
    env = dict(os.environ)
    if not args.real:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, HERE, "--child", "--n", str(n), "--devices", str(devices), "--box", str(args.box),
           "--batch", str(args.batch), "--epochs", str(args.epochs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{cmd} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(args):
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}
    try:
        import jax
        info["jax"] = jax.__version__
    except ImportError:
        pass
    info["devices"] = "real accelerators" if args.real else "forced CPU devices (XLA_FLAGS) sharing the cores above"
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--base", type=int, default=1000, help="particles at scale 1")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--real", action="store_true", help="use real devices, not forced CPU devices")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--name", default=None, help="result file stem (default scaling_<backend>)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    t0 = time.perf_counter()
    by_devices = [run_child(d, args.base, args) for d in args.devices]
    ref = np.asarray(by_devices[0]["loss"])
    for r in by_devices:  # correctness first
        err = float(np.max(np.abs(np.asarray(r["loss"]) - ref) / np.abs(ref)))
        r["loss_rel_diff_vs_first"] = err
        if err > 1e-5:
            raise SystemExit(f"{r['devices']} devices: losses differ from {args.devices[0]} device(s) by {err:.1e}")
    by_size = [run_child(args.devices[0], s * args.base, args) for s in args.scales]
    result = {"benchmark": "scaling", "machine": machine(args), "settings": vars(args) | {"child": None},
              "method": "psgd", "by_devices": by_devices, "by_particles": by_size,
              "wall_seconds": time.perf_counter() - t0}
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or f"scaling_{'real' if args.real else 'cpu'}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)

    lines = [f"# Scaling: box {args.box}, batch {args.batch}, psgd ({result['machine']['devices']})", "",
             f"Machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
             f"{result['machine']['platform']}", "",
             "| devices | particles | epoch s | images/s | us/particle | peak RSS MiB | loss rel. diff |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in by_devices:
        lines.append(f"| {r['devices']} | {r['n_particles']} | {r['epoch_seconds']:.3f} | {r['images_per_second']:.0f} "
                     f"| {r['microseconds_per_particle']:.1f} | {r['peak_rss_mib']:.0f} | {r['loss_rel_diff_vs_first']:.1e} |")
    lines += ["", "| particles | devices | epoch s | images/s | us/particle | peak RSS MiB | data MiB |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in by_size:
        lines.append(f"| {r['n_particles']} | {r['devices']} | {r['epoch_seconds']:.3f} | {r['images_per_second']:.0f} "
                     f"| {r['microseconds_per_particle']:.1f} | {r['peak_rss_mib']:.0f} | {r['particle_bytes'] / 2**20:.1f} |")
    lines += ["", f"Replicated volume + optimizer state per device: "
                  f"{by_devices[0]['replicated_state_bytes_per_device'] / 2**20:.2f} MiB (both half-maps)."]
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
