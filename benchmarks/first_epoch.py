"""psgd's first epoch: how the Hutchinson estimate starts (issue 11). Usage: first_epoch.py BOX N EPOCHS K1,K2,.. [x [y]]
(K: init_samples variants; x: skip the warm-up variant; y: skip psgd-exact). Run from the repository root."""
import sys, time, json
sys.path.insert(0, "benchmarks")
import jax
from convergence import make_data, least_squares, make_full_loss, fractional_epochs_to
from jaxcryo.loss import Problem
from jaxcryo.forward import FourierGrid
from jaxcryo.reconstruct import reconstruct
box, n, epochs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
snr = 0.1
particles, _, pixel = make_data(box, n, volume_path=None, snr=snr, seed=0)
problem = Problem(grid=FourierGrid(box), interpolation="trilinear", lam=1e-4)
x_opt, info = least_squares(particles, problem, iters=300, batch_size=512, tol=1e-6)
L = float(jax.jit(make_full_loss(problem, 512))(x_opt, particles))
variants = dict(sgd=dict(method="sgd"))
if len(sys.argv) < 6: variants.update(psgd_warm8=dict(init_samples=0, warmup=8))
for k in sys.argv[4].split(","):
    variants[f"psgd_init{k}"] = dict(init_samples=int(k))
if len(sys.argv) < 7: variants["psgd-exact"] = dict(method="psgd-exact")
out = {}
for name, kw in variants.items():
    kw = dict(dict(method="psgd"), **kw)
    t0 = time.perf_counter()
    rec = reconstruct(particles, box=box, pixel_size_angstrom=pixel, epochs=epochs, halves=False, **kw)
    gap = [v - L for v in rec.history["loss"]]
    out[name] = dict(gap=gap, seconds=rec.history["seconds"], init=rec.history.get("init_seconds"))
    print(name, " ".join(f"{g:.3g}" for g in gap), f"| {rec.history['seconds'][-1]:.1f}s init {rec.history.get('init_seconds')}", flush=True)
t = out["sgd"]["gap"][-1]
for name, r in out.items():
    print(name, "epochs to sgd final:", fractional_epochs_to(r["gap"], t))
json.dump(out, open(f"benchmarks/results/first_epoch_box{box}_raw.json", "w"))
