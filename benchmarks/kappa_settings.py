"""Condition numbers of the Hessian's diagonal for the settings the README and the demo use.

kappa(R) = max / min of diag(H) over the Fourier ball |k| <= R (jaxcryo.conditioning.kappa_by_radius),
trilinear slicing, uniformly random poses, CTF (defocus 1-2.5 um, AC 0.1), lam 1e-4, n images.

    python benchmarks/kappa_settings.py 4000 32:4.0 48:2.5 64:1.5 128:1.0   # box:pixel_size pairs

Writes benchmarks/results/kappa_known.json (machine and load average included).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from convergence import machine  # noqa: E402
from jaxcryo.conditioning import exact_hessian_diagonal, kappa_by_radius, uniform_particles  # noqa: E402
from jaxcryo.forward import FourierGrid  # noqa: E402
from jaxcryo.loss import Problem  # noqa: E402


def main(argv) -> int:
    n = int(argv[0])
    rows = []
    for spec in argv[1:]:
        box, px = int(spec.split(":")[0]), float(spec.split(":")[1])
        particles = uniform_particles(n, seed=0, with_ctf=True, pixel_size_angstrom=px)
        problem = Problem(grid=FourierGrid(box), interpolation="trilinear", lam=1e-4)
        kappa = kappa_by_radius(exact_hessian_diagonal(particles, problem, 256), box, None, 1e-4)
        row = {"box": box, "pixel_size_angstrom": px, "n_images": n, "R": len(kappa) - 1,
               "kappa_half_radius": float(kappa[len(kappa) // 2]), "kappa_last_shell": float(kappa[-1]),
               "kappa_by_radius": [float(k) for k in kappa]}
        print({k: v for k, v in row.items() if k != "kappa_by_radius"}, flush=True)
        rows.append(row)
    out = os.path.join(os.path.dirname(__file__), "results", "kappa_known.json")
    with open(out, "w") as f:
        json.dump({"machine": machine(), "load_average": os.getloadavg(), "settings": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
