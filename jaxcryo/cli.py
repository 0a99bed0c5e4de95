"""The ``jaxcryo`` command line: argument parsing -> io -> reconstruct. No maths here."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _demo(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    import jaxcryo as jc
    from jaxcryo.forward.slicing import FourierGrid
    from jaxcryo.io import write_map

    os.makedirs(args.out, exist_ok=True)
    box, px = args.box, args.pixel_size
    print(f"jaxcryo demo: {args.n_images} particles of a synthetic molecule, box {box}, "
          f"{px} A/px, SNR {args.snr}, CTF and shifts, known poses")
    t0 = time.perf_counter()
    truth = jc.synthetic_molecule(box, pixel_size_angstrom=px, seed=args.seed)
    sim = jc.simulate_particles(truth, args.n_images, pixel_size_angstrom=px, snr=args.snr, seed=args.seed)
    grid = FourierGrid(box)
    particles = jc.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / px, sim.ctf, grid)
    print(f"  simulated in {time.perf_counter() - t0:.1f} s")
    truth_ft = np.asarray(jc.volume_to_ft(jnp.asarray(truth)))
    shell = slice(box // 4 - 2, box // 4 + 1)  # around half Nyquist

    results = {}
    for method in ("sgd", "psgd"):
        fsc_by_epoch = []

        def track(state):
            fsc_by_epoch.append(float(jc.fsc_ft(np.asarray(state.params).mean(0), truth_ft)[shell].mean()))

        rec = jc.reconstruct(particles, box=box, pixel_size_angstrom=px, method=method, epochs=args.epochs,
                             batch_size=args.batch_size, seed=args.seed, callback=track)
        results[method] = (rec, fsc_by_epoch)
        write_map(os.path.join(args.out, f"map_{method}.mrc"), rec.volume, voxel_size_angstrom=px)
    write_map(os.path.join(args.out, "truth.mrc"), truth, voxel_size_angstrom=px)

    print(f"\n{'epoch':>5} | {'loss sgd':>10} {'loss psgd':>10} | {'FSC@N/2 sgd':>11} {'FSC@N/2 psgd':>12}")
    for e in range(args.epochs):
        (rs, fs), (rp, fp) = results["sgd"], results["psgd"]
        print(f"{e + 1:>5} | {rs.history['loss'][e]:>10.4f} {rp.history['loss'][e]:>10.4f} | "
              f"{fs[e]:>11.3f} {fp[e]:>12.3f}")
    for method, (rec, _) in results.items():
        print(f"  {method}: {rec.history['seconds'][-1]:.1f} s for {args.epochs} epochs "
              f"(+{rec.history['compile_seconds']:.1f} s compile), half-map resolution "
              f"{rec.resolution_angstrom:.2f} A (FSC 0.143)")
    _plot_demo(results, os.path.join(args.out, "convergence.png"))
    summary = {m: {"loss": r.history["loss"], "seconds": r.history["seconds"], "fsc_half_nyquist": f,
                   "resolution_angstrom": r.resolution_angstrom} for m, (r, f) in results.items()}
    with open(os.path.join(args.out, "demo.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"  wrote {args.out}/map_sgd.mrc, map_psgd.mrc, truth.mrc, convergence.png, demo.json")
    return 0


def _plot_demo(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, (rec, fsc_by_epoch) in results.items():
        a.semilogy(rec.history["epoch"], rec.history["loss"], "o-", label=method)
        b.plot(rec.history["epoch"], fsc_by_epoch, "o-", label=method)
    a.set(xlabel="epoch", ylabel="full-data loss", title="loss")
    b.set(xlabel="epoch", ylabel="FSC to truth near N/4", title="accuracy", ylim=(0, 1))
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcryo", description="Cryo-EM reconstruction with known poses by preconditioned SGD (JAX).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="simulate a synthetic molecule, reconstruct with sgd and psgd, compare",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--box", type=int, default=48, help="box size (pixels)")
    demo.add_argument("--pixel-size", type=float, default=2.5, help="pixel size (Angstrom)")
    demo.add_argument("--n-images", type=int, default=4000, help="number of particles")
    demo.add_argument("--snr", type=float, default=0.2, help="signal-to-noise ratio (variance)")
    demo.add_argument("--epochs", type=int, default=6, help="passes over the data")
    demo.add_argument("--batch-size", type=int, default=128, help="images per step")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    from jaxcryo.io import InputError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"jaxcryo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
