"""Build the notebooks from this script, so that their code is reviewable as plain Python.

    python notebooks/build_notebooks.py        # writes notebooks/0*_*.ipynb, without outputs

Each notebook opens with a SIZE switch: 'small' runs in well under a minute on a 2-core CPU
(and is what tests/test_notebooks.py executes); 'full' is the paper-sized run for a GPU/TPU.
"""
from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SIZE_CELL = '''SIZE = "small"  # "small": CPU, under a minute; "full": the paper's sizes, for a GPU/TPU'''

QUICKSTART = [
    new_markdown_cell("""# jaxcryo quickstart

Simulate particles of a synthetic molecule (random poses, CTF, noise), reconstruct the map with
the paper's preconditioned SGD (`psgd`), and look at the map and at the FSC between
independently reconstructed half-maps."""),
    new_code_cell(SIZE_CELL),
    new_code_cell('''import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxcryo
from jaxcryo.forward import FourierGrid

cfg = {"small": dict(box=32, n_images=2000, epochs=4, batch_size=128),
       "full": dict(box=128, n_images=50000, epochs=10, batch_size=256)}[SIZE]
box = cfg["box"]
pixel_size_angstrom = 2.0 * 64 / box
print(jax.devices(), cfg)'''),
    new_markdown_cell("## Simulate\nA pseudo-atomic chain, projected at uniformly random poses, with CTF, shifts and noise (SNR 0.1)."),
    new_code_cell('''truth = jaxcryo.synthetic_molecule(box, pixel_size_angstrom=pixel_size_angstrom)
sim = jaxcryo.simulate_particles(truth, cfg["n_images"], pixel_size_angstrom=pixel_size_angstrom, snr=0.1,
                                 interpolation="trilinear")
particles = jaxcryo.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / pixel_size_angstrom,
                                      jax.tree.map(jnp.asarray, sim.ctf), FourierGrid(box))
fig, ax = plt.subplots(1, 4, figsize=(12, 3))
for i, a in enumerate(ax):
    a.imshow(sim.images[i], cmap="gray"); a.set_axis_off()
fig.suptitle("four particle images")
plt.show()'''),
    new_markdown_cell("## Reconstruct\nTwo half-sets, each reconstructed independently (gold standard); the whole epoch is one compiled function."),
    new_code_cell('''t0 = time.perf_counter()
rec = jaxcryo.reconstruct(particles, box=box, pixel_size_angstrom=pixel_size_angstrom, method="psgd",
                          epochs=cfg["epochs"], batch_size=cfg["batch_size"], lam=1e-4)
print(f"{time.perf_counter() - t0:.1f} s (compile {rec.history['compile_seconds']:.1f} s)")
for e, l, s in zip(rec.history["epoch"], rec.history["loss"], rec.history["seconds"]):
    print(f"epoch {e}: loss {l:.4f}  ({s:.1f} s)")
print(f"half-map resolution (FSC 0.143): {rec.resolution_angstrom:.2f} A")'''),
    new_markdown_cell("## The map and the FSC"),
    new_code_cell('''fsc_truth = jaxcryo.fsc(rec.volume, truth)
freq = np.arange(len(rec.fsc)) / (box * pixel_size_angstrom)
fig, ax = plt.subplots(1, 3, figsize=(14, 4))
ax[0].imshow(truth.sum(0), cmap="gray"); ax[0].set_title("truth (projection)")
ax[1].imshow(rec.volume.sum(0), cmap="gray"); ax[1].set_title("reconstruction (projection)")
ax[2].plot(freq, rec.fsc, label="half-map FSC")
ax[2].plot(freq, fsc_truth, label="FSC to truth")
ax[2].axhline(0.143, color="gray", ls=":")
ax[2].set(xlabel="spatial frequency (1/A)", ylabel="FSC"); ax[2].legend()
plt.show()
assert fsc_truth[box // 4] > 0.5, "the map should match the truth at half Nyquist"'''),
]

CONDITIONING = [
    new_markdown_cell("""# Conditioning of the reconstruction Hessian

For nearest-neighbour slicing the Hessian is diagonal: a voxel's entry counts the image pixels
that land on it. The origin is hit by every image, a voxel at radius R by a fraction ~3/(4R) of
them, so the condition number over the ball of radius R grows like 4R/3. The paper's bound is
kappa(R) >= (N + lam) / (N p + lam), p = voxels in the central disk / voxels in the ball.
Below: the bound, the exact kappa (checked against a brute-force count of plane hits), the
effect of the CTF and of trilinear interpolation, and what a diagonal preconditioner removes."""),
    new_code_cell(SIZE_CELL),
    new_code_cell('''import jax
import matplotlib.pyplot as plt
import numpy as np

from jaxcryo import conditioning as cond

cfg = {"small": dict(box=24, n_images=3000, probes=8), "full": dict(box=128, n_images=50000, probes=32)}[SIZE]
box, n = cfg["box"], cfg["n_images"]
lam = 1e-4
print(jax.devices(), cfg)'''),
    new_markdown_cell("## The bound: p(R) counted on the grid, and its approximation 3/(4R)"),
    new_code_cell('''radii, p, p_approx = cond.disk_ball_ratio(box // 2 - 2)
plt.figure(figsize=(5, 3.5))
plt.plot(radii, cond.kappa_lower_bound(p), "o-", label="bound, counted p")
plt.plot(radii, cond.kappa_lower_bound(p_approx), "--", label="bound, p = 3/(4R)")
plt.xlabel("R"); plt.ylabel("kappa lower bound (lam = 0)"); plt.legend(); plt.show()'''),
    new_markdown_cell("## Empirical kappa for uniform orientations"),
    new_code_cell('''uniform = cond.uniform_particles(n, seed=0)
uniform_ctf = cond.uniform_particles(n, seed=0, with_ctf=True)
reports = {
    "nearest, no CTF": cond.conditioning_report(uniform, box, interpolation="nearest", lam=lam),
    "nearest, CTF": cond.conditioning_report(uniform_ctf, box, interpolation="nearest", lam=lam),
    "trilinear, CTF": cond.conditioning_report(uniform_ctf, box, interpolation="trilinear", lam=lam,
                                               n_probes=cfg["probes"]),
}
display(cond.plot_reports(reports, title=f"box {box}, {n} images"))
rep = reports["nearest, no CTF"]
print(" R   kappa   bound")
for r in rep["radius"]:
    print(f"{r:2d} {rep['kappa'][r]:7.2f} {rep['bound_counted'][r]:7.2f}")
assert all(k >= b for k, b in zip(rep["kappa"][1:], rep["bound_counted"][1:]))'''),
    new_markdown_cell("## An independent check: count the plane hits by brute force (numpy, no symmetry used)"),
    new_code_cell('''hits = cond.brute_force_hits(np.asarray(uniform.rotations), box)
k_ref = cond.kappa_from_hits(hits, box)
plain = cond.conditioning_report(uniform, box, interpolation="nearest", lam=0.0)
rel = np.max(np.abs(np.asarray(plain["kappa"]) - k_ref) / k_ref)
print(f"max relative difference of kappa(R): {rel:.2e}")
assert rel < 0.2'''),
    new_markdown_cell("""## After preconditioning

The spread of diag(P H) per shell: the exact diagonal removes it completely (by construction);
the Hutchinson estimate leaves its sampling noise, which shrinks as probes accumulate."""),
    new_code_cell('''tri = reports["trilinear, CTF"]
last = tri["radius"][-1]
print(f"kappa of diag(H) over the ball R <= {last}: {tri['kappa'][last]:.1f}")
print(f"  after the exact preconditioner:      {tri['kappa_after_exact'][last]:.2f}")
print(f"  after the Hutchinson preconditioner: {tri['kappa_after_hutchinson'][last]:.2f} ({cfg['probes']} probes)")
print(f"95th/5th percentile spread in shell {last}: raw {tri['spread90_raw'][last]:.2f}, "
      f"Hutchinson-preconditioned {tri['spread90_hutchinson'][last]:.2f}")
he = tri["hutchinson_error"]
plt.figure(figsize=(5, 3.5))
plt.loglog(he["probes"], he["relative_error"], "o-", label="Hutchinson")
plt.loglog(he["probes"], he["relative_error"][0] / np.sqrt(he["probes"]), ":", label="1/sqrt(k)")
plt.xlabel("probes"); plt.ylabel("relative error of diag(H)"); plt.legend(); plt.show()'''),
    new_markdown_cell("## Preferred orientations\nMostly top views: some voxels are never seen, and kappa explodes (only lam keeps it finite)."),
    new_code_cell('''from jaxcryo.geometry import euler_to_matrix
rng = np.random.default_rng(0)
euler = np.stack([rng.uniform(-180, 180, n), np.abs(rng.normal(0, 20, n)), rng.uniform(-180, 180, n)], -1)
top = cond.pose_particles(np.asarray(euler_to_matrix(euler)))
top_rep = cond.conditioning_report(top, box, interpolation="nearest", lam=lam)
plt.figure(figsize=(5, 3.5))
plt.semilogy(rep["radius"], rep["kappa"], label="uniform")
plt.semilogy(top_rep["radius"], top_rep["kappa"], label="preferred views")
plt.xlabel("R"); plt.ylabel("kappa"); plt.legend(); plt.show()'''),
]

CONVERGENCE = [
    new_markdown_cell("""# Convergence: sgd, psgd and psgd composed with stock optax transforms

The loss is quadratic, so its minimiser can be computed once to high accuracy (Jacobi-PCG,
`least_squares`). Every method is measured by its loss gap L - L* and its FSC against that
optimum. jaxcryo's preconditioner is an optax transform: it composes with momentum and step
schedules from optax unchanged."""),
    new_code_cell(SIZE_CELL),
    new_code_cell('''import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jaxcryo
from jaxcryo.forward import FourierGrid
from jaxcryo.geometry import default_alpha
from jaxcryo.reconstruct import least_squares, make_full_loss

cfg = {"small": dict(box=20, n_images=1000, epochs=4, batch_size=50),
       "full": dict(box=128, n_images=50000, epochs=10, batch_size=256)}[SIZE]
box, lam = cfg["box"], 1e-4
pixel_size_angstrom = 2.0 * 64 / box
print(jax.devices(), cfg)'''),
    new_code_cell('''truth = jaxcryo.synthetic_molecule(box, pixel_size_angstrom=pixel_size_angstrom)
sim = jaxcryo.simulate_particles(truth, cfg["n_images"], pixel_size_angstrom=pixel_size_angstrom, snr=0.1,
                                 interpolation="trilinear")
particles = jaxcryo.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / pixel_size_angstrom,
                                      jax.tree.map(jnp.asarray, sim.ctf), FourierGrid(box))
problem = jaxcryo.Problem(grid=FourierGrid(box), interpolation="trilinear", lam=lam)
x_opt, info = least_squares(particles, problem, iters=300, tol=1e-6)
loss_opt = float(jax.jit(make_full_loss(problem, 512))(x_opt, particles))
print(info, "L* =", loss_opt)'''),
    new_markdown_cell("""## The methods

* `sgd` and `psgd` (Algorithm 1) as named methods, each with the paper's Armijo line search;
* psgd's preconditioner chained with `optax.trace` (momentum) and an `optax.exponential_decay`
  step that halves every epoch: large early steps, then a shrinking noise floor;
* the same preconditioner in front of `optax.adam`."""),
    new_code_cell('''steps_per_epoch = -(-cfg["n_images"] // cfg["batch_size"])
alpha = default_alpha(box)
methods = {
    "sgd": "sgd",
    "psgd": "psgd",
    "psgd + momentum + decay": optax.chain(
        jaxcryo.scale_by_hutchinson(beta=0.9, alpha=alpha), optax.trace(decay=0.9),
        optax.scale_by_learning_rate(optax.exponential_decay(0.02, steps_per_epoch, 0.5))),
    "psgd + adam": optax.chain(jaxcryo.scale_by_hutchinson(beta=0.9, alpha=alpha), optax.adam(1e-2)),
}
runs = {}
for name, method in methods.items():
    curves = []
    rec = jaxcryo.reconstruct(particles, box=box, pixel_size_angstrom=pixel_size_angstrom, method=method,
                              epochs=cfg["epochs"], batch_size=cfg["batch_size"], lam=lam, halves=False,
                              callback=lambda s: curves.append(jaxcryo.fsc_ft(s.params[0], x_opt)))
    runs[name] = dict(gap=np.asarray(rec.history["loss"]) - loss_opt, seconds=rec.history["seconds"], fsc=curves)
    print(f"{name:26s} gap by epoch: " + " ".join(f"{g:.3g}" for g in runs[name]["gap"])
          + f"   ({rec.history['seconds'][-1]:.1f} s + {rec.history['compile_seconds']:.1f} s compile)")'''),
    new_code_cell('''r_max = box // 2 - 1
high = np.arange(int(np.ceil(0.75 * r_max)), r_max + 1)
fig, ax = plt.subplots(1, 3, figsize=(15, 4))
for name, r in runs.items():
    epochs = np.arange(1, len(r["gap"]) + 1)
    ax[0].semilogy(epochs, r["gap"], "o-", label=name)
    ax[1].semilogy(r["seconds"], r["gap"], "o-", label=name)
    ax[2].plot(epochs, [np.mean(f[high]) for f in r["fsc"]], "o-", label=name)
ax[0].set(xlabel="epoch", ylabel="L - L*", title="loss gap"); ax[0].legend()
ax[1].set(xlabel="seconds", ylabel="L - L*", title="loss gap by wall time")
ax[2].set(xlabel="epoch", ylabel="mean FSC to optimum, high shells", title="FSC, shells 3/4 r_max .. r_max")
plt.show()
for name, r in runs.items():
    assert r["gap"][-1] < r["gap"][0], name  # every method makes progress on the same objective
fsc_high = {name: float(np.mean(r["fsc"][-1][high])) for name, r in runs.items()}
print("FSC to the optimum in the high shells, last epoch:", fsc_high)
assert fsc_high["psgd"] >= fsc_high["sgd"] - 0.01'''),
]

REFINE = [
    new_markdown_cell("""# Refinement with unknown poses

`jaxcryo.refine` refines a map and every particle's pose from a starting reference, as RELION's
3D auto-refine does: two half-sets, each scored against its own half-map (gold standard) over
rotations x shifts (a global search on an SO(3) grid, then local searches at halving steps), the
top poses of each image kept with their posterior weights, and the map updated by the paper's
preconditioned SGD on those weighted poses. Here: simulate particles, start from the truth
low-passed to 40 A, and watch the resolution and the pose error epoch by epoch, for the
volume step run by `psgd` and by plain `sgd`."""),
    new_code_cell(SIZE_CELL),
    new_code_cell('''import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import jaxcryo
from jaxcryo.forward import FourierGrid
from jaxcryo.reconstruct import half_sets
from jaxcryo.refine import rotation_angle_deg

cfg = {"small": dict(box=24, pixel_size=8.0, n_images=160, snr=1.0, epochs=4, global_order=1, batch_size=40),
       "full": dict(box=128, pixel_size=2.0, n_images=50000, snr=0.1, epochs=15, global_order=2, batch_size=256)}[SIZE]
box, px = cfg["box"], cfg["pixel_size"]
print(jax.devices(), cfg)'''),
    new_markdown_cell("## Simulate\nRandom poses, CTF, shifts and noise; the poses are then thrown away."),
    new_code_cell('''truth = jaxcryo.synthetic_molecule(box, pixel_size_angstrom=px)
sim = jaxcryo.simulate_particles(truth, cfg["n_images"], pixel_size_angstrom=px, snr=cfg["snr"], max_shift_px=1.5)
n = cfg["n_images"]
unposed = jaxcryo.prepare_particles(sim.images, np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3)),
                                    np.zeros((n, 2), np.float32), sim.ctf, FourierGrid(box))
groups = half_sets(n)  # the half-sets refine draws (same seed)'''),
    new_markdown_cell("## Refine from the truth low-passed to 40 A, with psgd and with sgd in the volume step"),
    new_code_cell('''def run(method):
    errors = []

    def track(state):  # median angular error of the current best poses, per epoch
        err = rotation_angle_deg(np.asarray(state.poses.rotations), sim.rotations[np.maximum(groups, 0)])
        errors.append(float(np.median(err[groups >= 0])))

    t0 = time.perf_counter()
    out = jaxcryo.refine(unposed, truth, box=box, pixel_size_angstrom=px, initial_lowpass_angstrom=40.0,
                         epochs=cfg["epochs"], global_order=cfg["global_order"], batch_size=cfg["batch_size"],
                         method=method, callback=track)
    h = out.reconstruction.history
    print(f"{method}: {time.perf_counter() - t0:.1f} s, compile {h['compile_seconds']:.1f} s")
    for e, mode, res, step, err in zip(h["epoch"], h["mode"], h["resolution_angstrom"], h["angular_step_deg"], errors):
        print(f"  epoch {e} {mode:6s} step {step:5.2f} deg  half-map resolution {res:5.1f} A  "
              f"median pose error {err:5.2f} deg")
    return out, errors


runs = {"psgd": run("psgd")}'''),
    new_code_cell('''runs["sgd"] = run("sgd")'''),
    new_markdown_cell("## Resolution and pose error by epoch"),
    new_code_cell('''fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
for method, (out, errors) in runs.items():
    h = out.reconstruction.history
    a.plot(h["epoch"], h["resolution_angstrom"], "o-", label=method)
    b.semilogy(h["epoch"], errors, "o-", label=method)
b.plot(h["epoch"], h["angular_step_deg"], "k--", label="angular step")
a.set(xlabel="epoch", ylabel="half-map resolution (A)", title="resolution")
b.set(xlabel="epoch", ylabel="median pose error (deg)", title="poses")
a.legend(); b.legend(); fig.tight_layout(); plt.show()
out = runs["psgd"][0]
print("FSC to the truth (psgd), shells 1..N/2:", np.round(jaxcryo.fsc(out.reconstruction.volume, truth)[1:], 2))'''),
]


def write(cells, name: str) -> str:
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    path = os.path.join(HERE, name)
    nbformat.validate(nb)
    with open(path, "w") as f:
        nbformat.write(nb, f)
    return path


def main() -> None:
    for cells, name in ((QUICKSTART, "01_quickstart.ipynb"), (CONDITIONING, "02_conditioning.ipynb"),
                        (CONVERGENCE, "03_convergence.ipynb"), (REFINE, "04_refine.ipynb")):
        print("wrote", write(cells, name))


if __name__ == "__main__":
    main()
