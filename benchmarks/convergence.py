"""Convergence of sgd, psgd and friends to the least-squares optimum (the paper's Fig. 4, extended).

Simulated particles (CTF, SNR 0.1, random poses and shifts) of a synthetic molecule, or of a
real map given with --volume. The converged least-squares solution is computed once by
Jacobi-preconditioned CG to a relative residual of 1e-6 (jaxcryo.reconstruct.least_squares);
every method is then measured against it:

  sgd          plain gradient + Armijo line search (initial step 10, c 0.9, the driver's default)
  psgd         Algorithm 1: Hutchinson running mean, beta 0.9, alpha = 1/(max shell count), + Armijo
  psgd-exact   the exact full-data diagonal as preconditioner, + Armijo
  psgd-warmup  psgd as it was before the exact first estimate: 8 warm-up steps with no update,
               the estimate built from Hutchinson samples alone (init_samples=0)
  oasis        scale_by_hutchinson(average='ema'): single-sample exponential average, + Armijo
  adam         optax.adam (learning rate --adam-lr)
  psgd+momentum  scale_by_hutchinson -> optax.trace(0.9) -> fixed step (--momentum-lr); stock
               optax transform composed with jaxcryo's preconditioner
  psgd+momentum+decay  the same with an optax.exponential_decay step (--decay-lr, halved each epoch)

Every method runs through jaxcryo.reconstruct with its defaults: each epoch ends at the mean
of its iterates. Per epoch: loss gap L - L*, FSC against the optimum per shell, wall seconds (compiled epochs,
warm-up excluded), and for Hutchinson methods the relative error of the running estimate
against the exact diagonal. Summary: epochs to sgd's final loss, epochs to FSC 0.8/0.9/0.95
in the high shells (mean over shells 3/4 r_max .. r_max). Then a sweep of psgd's settings
(beta, alpha, batch size, probes per step, Armijo c) and the accuracy of the full-data
Hutchinson estimate as probes accumulate.

    python benchmarks/convergence.py --size small    # box 32, 4000 images: minutes on 2 CPU cores
    python benchmarks/convergence.py --size medium   # box 64, 10000 images (CPU, tens of minutes)
    python benchmarks/convergence.py --size full     # box 64 and 128, 50000 images (GPU)
    python benchmarks/convergence.py --size box64    # box 64, 5000 images (issue 11's setting), CPU minutes
    python benchmarks/convergence.py --size paper    # box 128, 2000 images, sgd/psgd/psgd-exact (the
                                                     # paper's regime at a reduced particle count)

Writes benchmarks/results/convergence_<size>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402
from jaxcryo.conditioning import relative_error_by_probes  # noqa: E402
from jaxcryo.curvature import exact_diagonal  # noqa: E402
from jaxcryo.forward import FourierGrid, prepare_particles  # noqa: E402
from jaxcryo.fsc import fsc_ft  # noqa: E402
from jaxcryo.geometry import default_alpha  # noqa: E402
from jaxcryo.loss import Problem  # noqa: E402
from jaxcryo.optim import armijo, scale_by_hutchinson  # noqa: E402
from jaxcryo.reconstruct import least_squares, make_full_loss, reconstruct  # noqa: E402
from jaxcryo.simulate import simulate_particles, synthetic_molecule  # noqa: E402

SIZES = {
    "small": [dict(box=32, n_images=4000, epochs=10, batch_size=128)],
    "medium": [dict(box=64, n_images=10000, epochs=10, batch_size=128)],
    "full": [dict(box=64, n_images=50000, epochs=10, batch_size=256),
             dict(box=128, n_images=50000, epochs=10, batch_size=256)],
    "box64": [dict(box=64, n_images=5000, epochs=10, batch_size=128)],
    "paper": [dict(box=128, n_images=2000, epochs=6, batch_size=128)],
}
METHODS = ("sgd", "psgd", "psgd-exact", "psgd-warmup", "oasis", "adam", "psgd+momentum", "psgd+momentum+decay")
FSC_LEVELS = (0.8, 0.9, 0.95)



def fourier_resize(volume: np.ndarray, box: int) -> np.ndarray:
    """Crop or zero-pad a map's centred spectrum to ``box`` (keeps the voxel's physical frequencies)."""
    n = volume.shape[-1]
    if n == box:
        return volume
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume)))
    out = np.zeros((box,) * 3, complex)
    m = min(n, box)
    a, b = (n - m) // 2, (box - m) // 2
    out[b:b + m, b:b + m, b:b + m] = f[a:a + m, a:a + m, a:a + m]
    vol = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out))).real * (box / n) ** 3
    return vol.astype(np.float32)


def make_data(box: int, n_images: int, *, volume_path: str | None, snr: float, seed: int):
    """Simulated particles (trilinear slices, so the model matches the data up to noise)."""
    pixel = 2.0 * 64 / box
    if volume_path:
        from jaxcryo.io import read_map
        vol, voxel = read_map(volume_path)
        src_box = vol.shape[-1]
        vol = fourier_resize(vol, box)
        pixel = (voxel or pixel) * src_box / box
        vol = vol / np.abs(vol).max()
    else:
        vol = synthetic_molecule(box, pixel_size_angstrom=pixel, seed=seed)
    sim = simulate_particles(vol, n_images, pixel_size_angstrom=pixel, snr=snr, seed=seed,
                             interpolation="trilinear")
    particles = prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / pixel,
                                  jax.tree.map(jnp.asarray, sim.ctf), FourierGrid(box))
    return particles, vol, pixel


def high_shells(box: int):
    """The shells averaged for 'FSC in the high shells': 3/4 r_max .. r_max (r_max = N//2 - 1)."""
    r_max = box // 2 - 1
    return np.arange(int(np.ceil(0.75 * r_max)), r_max + 1)


def transform(method: str, *, box: int, settings: dict):
    """The optax transform for ``method`` (a string reconstruct() knows, or a custom chain)."""
    alpha = settings.get("alpha") or default_alpha(box)
    if method == "oasis":
        return optax.chain(scale_by_hutchinson(beta=settings.get("oasis_beta", 0.9), alpha=alpha, average="ema"),
                           optax.scale(-1.0), armijo(initial_step=10.0, c=settings.get("c", 0.9), increase_factor=2.0))
    if method == "psgd+momentum":
        return optax.chain(scale_by_hutchinson(beta=settings.get("beta", 0.9), alpha=alpha),
                           optax.trace(decay=0.9), optax.scale(-settings["momentum_lr"]))
    if method == "psgd+momentum+decay":
        # The step decays by a constant factor per epoch: large early steps, then a shrinking
        # noise floor (a stochastic step's floor scales with the step).
        schedule = optax.exponential_decay(settings["decay_lr"], transition_steps=settings["steps_per_epoch"],
                                           decay_rate=settings["decay_rate"])
        return optax.chain(scale_by_hutchinson(beta=settings.get("beta", 0.9), alpha=alpha),
                           optax.trace(decay=0.9), optax.scale_by_learning_rate(schedule))
    if method == "psgd-warmup":
        return "psgd"
    return method


def run_method(method: str, particles, problem: Problem, *, box: int, pixel: float, epochs: int,
               batch_size: int, x_opt, loss_opt: float, exact_diag, settings: dict) -> dict:
    """One method's run with its per-epoch loss gap, FSC to the optimum and Hutchinson error."""
    fsc_by_epoch, hutch_err = [], []
    diag_norm = float(jnp.linalg.norm(exact_diag))

    def callback(state):
        fsc_by_epoch.append(fsc_ft(state.params[0], x_opt).tolist())
        st = state.opt_state
        leaves = st if isinstance(st, tuple) else (st,)
        hs = [s for s in leaves if type(s).__name__ == "ScaleByHutchinsonState"]
        if hs:
            hutch_err.append(float(jnp.linalg.norm(hs[0].diag[0] - exact_diag) / diag_norm))

    tx = transform(method, box=box, settings=settings)
    kwargs = dict(box=box, pixel_size_angstrom=pixel, method=tx, interpolation=problem.interpolation,
                  epochs=epochs, batch_size=settings.get("batch_size", batch_size), lam=problem.lam,
                  halves=False, seed=settings.get("seed", 0), n_probes=settings.get("n_probes", 1),
                  beta=settings.get("beta", 0.9), alpha=settings.get("alpha"), c=settings.get("c", 0.9),
                  callback=callback, noise_model="white")  # white: least_squares' objective
    if method == "adam":
        kwargs["learning_rate"] = settings["adam_lr"]
    if method == "psgd-warmup":
        kwargs.update(init_samples=0, warmup=8)
    rec = reconstruct(particles, **kwargs)
    hist = rec.history
    shells = high_shells(box)
    fsc_high = [float(np.mean(np.asarray(f)[shells])) for f in fsc_by_epoch]
    return {
        "epoch": hist["epoch"], "loss": hist["loss"], "seconds": hist["seconds"],
        "compile_seconds": hist["compile_seconds"],
        "loss_gap": [v - loss_opt for v in hist["loss"]],
        "relative_loss_gap": [(v - loss_opt) / abs(loss_opt) for v in hist["loss"]],
        "fsc_to_optimum": fsc_by_epoch, "fsc_high_shells": fsc_high,
        "fsc_min_high_shell": [float(np.min(np.asarray(f)[shells])) for f in fsc_by_epoch],
        "hutchinson_relative_error": hutch_err or None,
        "epochs_to_fsc": {str(t): first_epoch(fsc_high, lambda v: v >= t) for t in FSC_LEVELS},
    }


def first_epoch(values, ok):
    """1-based epoch at which ``ok(value)`` first holds, or None."""
    for i, v in enumerate(values):
        if ok(v):
            return i + 1
    return None


def fractional_epochs_to(gaps, target):
    """Epochs (interpolated in log gap between epochs) at which the loss gap first reaches ``target``."""
    g = np.asarray(gaps, np.float64)
    if target <= 0 or not np.any(g <= target):
        return None
    i = int(np.argmax(g <= target))
    if i == 0:
        return 1.0
    a, b = np.log(max(g[i - 1], 1e-30)), np.log(max(g[i], 1e-30))
    return float(i + (np.log(target) - a) / (b - a)) if a != b else float(i + 1)


def sweep(particles, problem, *, box, pixel, epochs, batch_size, x_opt, loss_opt, exact_diag, base: dict):
    """psgd with one setting changed at a time: beta, alpha, batch size, probes, Armijo c."""
    alpha0 = default_alpha(box)
    variants = {
        "beta": [0.5, 0.99],
        "alpha": [alpha0 * 10, alpha0 * 100],
        "batch_size": [batch_size // 2, batch_size * 2],
        "n_probes": [4],
        "c": [0.99, 0.5],
    }
    out = []
    for key, values in variants.items():
        for v in values:
            settings = dict(base, **{key: v})
            t0 = time.perf_counter()
            r = run_method("psgd", particles, problem, box=box, pixel=pixel, epochs=epochs, batch_size=batch_size,
                           x_opt=x_opt, loss_opt=loss_opt, exact_diag=exact_diag, settings=settings)
            out.append({"setting": key, "value": v, "loss_gap": r["loss_gap"], "fsc_high_shells": r["fsc_high_shells"],
                        "seconds": r["seconds"], "wall_with_compile": time.perf_counter() - t0})
            print(f"  sweep {key}={v:g}: gap@3 {r['loss_gap'][min(2, epochs - 1)]:.3g} "
                  f"gap@{epochs} {r['loss_gap'][-1]:.3g} fsc_high@{epochs} {r['fsc_high_shells'][-1]:.3f}", flush=True)
    return out


def summarise(runs: dict, epochs: int) -> dict:
    """sgd's final gap; for each method the epochs it needs to reach it, and its gap at epoch 3."""
    target = runs["sgd"]["loss_gap"][-1]
    e3 = min(3, epochs) - 1
    return {
        "sgd_final_loss_gap": target,
        "epochs_to_sgd_final_loss": {m: fractional_epochs_to(r["loss_gap"], target) for m, r in runs.items()},
        "loss_gap_at_epoch_3": {m: r["loss_gap"][e3] for m, r in runs.items()},
        "fsc_high_at_epoch_5": {m: r["fsc_high_shells"][min(5, epochs) - 1] for m, r in runs.items()},
        "fsc_high_final": {m: r["fsc_high_shells"][-1] for m, r in runs.items()},
        "epochs_to_fsc": {m: r["epochs_to_fsc"] for m, r in runs.items()},
        "seconds_per_epoch": {m: r["seconds"][-1] / len(r["seconds"]) for m, r in runs.items()},
    }


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(2, 3, figsize=(16, 8.5))
    for i, (m, r) in enumerate(runs.items()):
        kw = dict(color=f"C{i}", label=m)
        ax[0, 0].semilogy(r["epoch"], np.maximum(r["loss_gap"], 1e-12), "o-", ms=3, **kw)
        ax[0, 1].semilogy(r["seconds"], np.maximum(r["loss_gap"], 1e-12), "o-", ms=3, **kw)
        ax[0, 2].plot(r["epoch"], r["fsc_high_shells"], "o-", ms=3, **kw)
        ax[1, 0].plot(np.asarray(r["fsc_to_optimum"][-1]), **kw)
        if r["hutchinson_relative_error"]:
            ax[1, 1].semilogy(r["epoch"], r["hutchinson_relative_error"], "o-", ms=3, **kw)
    ax[0, 0].axhline(runs["sgd"]["loss_gap"][-1], color="gray", lw=0.6, ls=":")
    ax[0, 0].set(xlabel="epoch", ylabel="L - L*", title="loss gap to the least-squares optimum")
    ax[0, 1].set(xlabel="seconds (compiled epochs)", ylabel="L - L*", title="loss gap by wall time")
    ax[0, 2].set(xlabel="epoch", ylabel="mean FSC, shells 3/4 r_max..r_max", title="FSC to the optimum, high shells")
    for t in FSC_LEVELS:
        ax[0, 2].axhline(t, color="gray", lw=0.5, ls=":")
    ax[1, 0].set(xlabel="shell", ylabel="FSC to optimum", title=f"FSC per shell after {result['epochs']} epochs")
    ax[1, 1].set(xlabel="epoch", ylabel="||D - diag H|| / ||diag H||", title="preconditioner estimate error")
    he = result.get("hutchinson_full_data")
    if he:
        ax[1, 1].semilogy([], [])
        ax2 = ax[1, 1].twiny()
        ax2.loglog(he["probes"], he["relative_error"], "k--", label="full-data probes (top axis)")
        ax2.set_xlabel("full-data Hutchinson probes")
        ax2.legend(loc="lower left", fontsize=7)
    labels, g3, g10 = [], [], []
    for s in result.get("sweep", []):
        labels.append(f"{s['setting']}={s['value']:.3g}")
        g3.append(s["loss_gap"][min(2, result["epochs"] - 1)])
        g10.append(s["loss_gap"][-1])
    base = runs["psgd"]
    labels.insert(0, "psgd default")
    g3.insert(0, base["loss_gap"][min(2, result["epochs"] - 1)])
    g10.insert(0, base["loss_gap"][-1])
    y = np.arange(len(labels))
    ax[1, 2].barh(y - 0.2, g3, 0.4, label="gap at epoch 3")
    ax[1, 2].barh(y + 0.2, g10, 0.4, label=f"gap at epoch {result['epochs']}")
    ax[1, 2].axvline(runs["sgd"]["loss_gap"][-1], color="gray", ls=":", label="sgd final gap")
    ax[1, 2].set_yticks(y, labels, fontsize=7)
    ax[1, 2].set_xscale("log")
    ax[1, 2].set(title="psgd settings (one changed at a time)", xlabel="L - L*")
    for a in (ax[0, 0], ax[0, 1], ax[0, 2], ax[1, 0], ax[1, 1], ax[1, 2]):
        a.legend(fontsize=7)
    fig.suptitle(f"box {result['box']}, {result['n_images']} images, SNR {result['snr']}, CTF, trilinear, "
                 f"batch {result['batch_size']}, lam {result['lam']:g}  [{result['machine']['backend']}]")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def markdown(results: list, size: str, mach: dict) -> str:
    lines = [f"# Convergence ({size})", "",
             f"Machine: {mach['platform']}, {mach['cpu_count']} CPUs, JAX {mach['jax']} on {mach['backend']}.", ""]
    for res in results:
        s = res["summary"]
        e = res["epochs"]
        lines += [f"## box {res['box']}, {res['n_images']} images, SNR {res['snr']}, CTF, trilinear, "
                  f"batch {res['batch_size']}, lam {res['lam']:g}, {e} epochs", "",
                  f"Optimum: least squares (Jacobi PCG), {res['optimum']['iters']} iterations, relative residual "
                  f"{res['optimum']['relative_residual']:.1e}, L* = {res['optimum']['loss']:.6g}.", "",
                  f"| method | gap @1 | gap @3 | gap @{e} | epochs to sgd's gap @{e} | FSC high @5 | FSC high @{e} "
                  "| epochs to FSC 0.8 / 0.9 / 0.95 | s/epoch |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, r in res["runs"].items():
            ef = s["epochs_to_sgd_final_loss"][m]
            to = r["epochs_to_fsc"]
            lines.append(f"| {m} | {r['loss_gap'][0]:.3g} | {r['loss_gap'][min(3, e) - 1]:.3g} | {r['loss_gap'][-1]:.3g} "
                         f"| {'-' if ef is None else f'{ef:.1f}'} | {s['fsc_high_at_epoch_5'][m]:.3f} "
                         f"| {r['fsc_high_shells'][-1]:.3f} | "
                         + " / ".join("-" if to[str(t)] is None else str(to[str(t)]) for t in FSC_LEVELS)
                         + f" | {s['seconds_per_epoch'][m]:.2f} |")
        if res.get("sweep"):
            lines += ["", "psgd with one setting changed (others at the defaults):", "",
                      f"| setting | gap @3 | gap @{e} | epochs to sgd's gap @{e} | FSC high @{e} | s/epoch |",
                      "|---|---|---|---|---|---|"]
            for sw in res["sweep"]:
                ef = fractional_epochs_to(sw["loss_gap"], s["sgd_final_loss_gap"])
                lines.append(f"| {sw['setting']} = {sw['value']:.3g} | {sw['loss_gap'][min(3, e) - 1]:.3g} "
                             f"| {sw['loss_gap'][-1]:.3g} | {'-' if ef is None else f'{ef:.1f}'} "
                             f"| {sw['fsc_high_shells'][-1]:.3f} | {sw['seconds'][-1] / len(sw['seconds']):.2f} |")
        he = res.get("hutchinson_full_data")
        if he:
            lines += ["", "Full-data Hutchinson estimate of diag(H), relative error by probes: "
                      + ", ".join(f"{p}: {v:.3f}" for p, v in zip(he["probes"], he["relative_error"]))]
        lines += ["", "gap = L - L* (full-data objective); FSC high = mean FSC against the optimum over shells "
                  "3/4 r_max .. r_max; s/epoch excludes compilation.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=tuple(SIZES), default="small")
    ap.add_argument("--volume", default=None, help="optional real map (MRC) to simulate from")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--lam", type=float, default=1e-4)
    ap.add_argument("--adam-lr", type=float, default=1e-2)
    ap.add_argument("--momentum-lr", type=float, default=0.003)
    ap.add_argument("--decay-lr", type=float, default=0.02, help="first-epoch step of psgd+momentum+decay")
    ap.add_argument("--decay-rate", type=float, default=0.5, help="its step's factor per epoch")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    mach = machine()
    results = []
    for cfg in SIZES[args.size]:
        box, n, epochs, bs = cfg["box"], cfg["n_images"], cfg["epochs"], cfg["batch_size"]
        t0 = time.perf_counter()
        particles, _, pixel = make_data(box, n, volume_path=args.volume, snr=args.snr, seed=args.seed)
        problem = Problem(grid=FourierGrid(box), interpolation="trilinear", lam=args.lam)
        print(f"box {box}: simulated {n} images in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        x_opt, info = least_squares(particles, problem, iters=300, batch_size=512, tol=1e-6)
        loss_opt = float(jax.jit(make_full_loss(problem, 512))(x_opt, particles))
        info.update(loss=loss_opt, seconds=time.perf_counter() - t0)
        print(f"box {box}: optimum {info}", flush=True)
        exact_diag = jax.jit(lambda p: exact_diagonal(p, problem, 512))(particles)
        settings = {"adam_lr": args.adam_lr, "momentum_lr": args.momentum_lr, "seed": args.seed,
                    "decay_lr": args.decay_lr, "decay_rate": args.decay_rate, "steps_per_epoch": -(-n // bs)}
        res = {"box": box, "n_images": n, "epochs": epochs, "batch_size": bs, "snr": args.snr, "lam": args.lam,
               "pixel_size_angstrom": pixel, "volume": args.volume or "synthetic_molecule", "machine": mach,
               "optimum": info, "settings": settings, "runs": {}}
        for m in args.methods.split(","):
            r = run_method(m, particles, problem, box=box, pixel=pixel, epochs=epochs, batch_size=bs, x_opt=x_opt,
                           loss_opt=loss_opt, exact_diag=exact_diag, settings=settings)
            res["runs"][m] = r
            print(f"box {box} {m}: gap " + " ".join(f"{g:.3g}" for g in r["loss_gap"])
                  + f" | fsc_high {r['fsc_high_shells'][-1]:.3f} | {r['seconds'][-1]:.1f} s", flush=True)
        # Full-data Hutchinson accuracy as probes accumulate (the estimate Algorithm 1 converges to).
        res["hutchinson_full_data"] = hutchinson_accuracy(particles, problem, exact_diag, 64 if box <= 32 else 16)
        if not args.no_sweep and "sgd" in res["runs"] and "psgd" in res["runs"]:
            res["sweep"] = sweep(particles, problem, box=box, pixel=pixel, epochs=epochs, batch_size=bs, x_opt=x_opt,
                                 loss_opt=loss_opt, exact_diag=exact_diag, base=settings)
        if "sgd" in res["runs"]:
            res["summary"] = summarise(res["runs"], epochs)
        results.append(res)
        tag = args.size if len(SIZES[args.size]) == 1 else f"{args.size}_box{box}"
        if "sgd" in res["runs"] and "psgd" in res["runs"]:
            plot(res, os.path.join(args.out, f"convergence_{tag}.png"))
    with open(os.path.join(args.out, f"convergence_{args.size}.json"), "w") as f:
        json.dump({"size": args.size, "machine": mach, "results": results}, f)
    if all("summary" in r for r in results):
        md = markdown(results, args.size, mach)
        with open(os.path.join(args.out, f"convergence_{args.size}.md"), "w") as f:
            f.write(md)
        print(md)
    return 0


def hutchinson_accuracy(particles, problem, exact_diag, n_probes: int) -> dict:
    """Relative error of the full-data Hutchinson diagonal as probes accumulate (1, 2, 4, ...)."""
    from jaxcryo.conditioning import hutchinson_hessian_diagonal
    samples = hutchinson_hessian_diagonal(particles, problem, jax.random.PRNGKey(1), n_probes, chunk=8, batch_size=512)
    counts, errs = relative_error_by_probes(samples, np.asarray(exact_diag))
    return {"probes": counts, "relative_error": errs}


if __name__ == "__main__":
    sys.exit(main())
