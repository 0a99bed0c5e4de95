"""psgd composed with optax momentum: where the momentum goes and what it costs (issue 11).

Box 32, 4,000 simulated images (SNR 0.1, CTF), trilinear, batch 128, lam 1e-4, the driver's
defaults (per-epoch iterate averaging; every Hutchinson state seeded with the exact diagonal).
Each chain runs through jaxcryo.reconstruct (one half-set); the loss gap L - L* is against the
Jacobi-PCG optimum.

    python benchmarks/composition.py [--epochs 6]

Writes benchmarks/results/composition_small.json (machine and load average included).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from convergence import machine, make_data  # noqa: E402
from jaxcryo.forward import FourierGrid  # noqa: E402
from jaxcryo.geometry import default_alpha  # noqa: E402
from jaxcryo.loss import Problem  # noqa: E402
from jaxcryo.optim import armijo, scale_by_hutchinson  # noqa: E402
from jaxcryo.reconstruct import least_squares, make_full_loss, reconstruct  # noqa: E402


def chains(box: int) -> dict:
    """name -> optax transform (or the driver's method name)."""
    a = default_alpha(box)
    pre = lambda: scale_by_hutchinson(alpha=a)  # noqa: E731
    search = lambda: armijo(initial_step=10.0, c=0.9, increase_factor=2.0)  # noqa: E731  (the driver's)
    return {
        "psgd": "psgd",
        "hutch>trace.9>lr.003": optax.chain(pre(), optax.trace(0.9), optax.scale(-0.003)),
        "hutch>trace.9>lr.03": optax.chain(pre(), optax.trace(0.9), optax.scale(-0.03)),
        "hutch>trace.9>lr.1": optax.chain(pre(), optax.trace(0.9), optax.scale(-0.1)),
        "hutch>lr.3": optax.chain(pre(), optax.scale(-0.3)),
        "hutch>lr1": optax.chain(pre(), optax.scale(-1.0)),
        "hutch>trace.9>armijo": optax.chain(pre(), optax.trace(0.9), optax.scale(-1.0), search()),
        "hutch>armijo>trace.9": optax.chain(pre(), optax.scale(-1.0), search(), optax.trace(0.9)),
        "hutch>armijo>trace.5": optax.chain(pre(), optax.scale(-1.0), search(), optax.trace(0.5)),
        "hutch>trace.5>armijo": optax.chain(pre(), optax.trace(0.5), optax.scale(-1.0), search()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    box, n = 32, 4000
    particles, _, pixel = make_data(box, n, volume_path=None, snr=0.1, seed=0)
    problem = Problem(grid=FourierGrid(box), interpolation="trilinear", lam=1e-4)
    x_opt, _ = least_squares(particles, problem, iters=300, batch_size=512, tol=1e-6)
    best = float(jax.jit(make_full_loss(problem, 512))(x_opt, particles))
    gaps = {}
    for name, tx in chains(box).items():
        rec = reconstruct(particles, box=box, pixel_size_angstrom=pixel, method=tx, epochs=args.epochs, halves=False)
        gaps[name] = [v - best for v in rec.history["loss"]]
        print(f"{name:24s}", " ".join(f"{g:.3g}" for g in gaps[name]), flush=True)
    out = {"box": box, "n_images": n, "snr": 0.1, "batch_size": 128, "lam": 1e-4, "epochs": args.epochs,
           "loss_gap": gaps, "machine": machine(), "load_average": os.getloadavg()}
    with open(os.path.join(args.out, "composition_small.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
