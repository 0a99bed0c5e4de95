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
    from jaxcryo.conditioning import exact_hessian_diagonal, kappa_by_radius
    from jaxcryo.forward.slicing import FourierGrid
    from jaxcryo.io import write_map

    os.makedirs(args.out, exist_ok=True)
    box, px = args.box, args.pixel_size
    print(f"jaxcryo demo: {args.n_images} particles of a synthetic molecule, box {box}, "
          f"{px} A/px, SNR {args.snr}, CTF and shifts, known poses")
    t0 = time.perf_counter()
    truth = jc.synthetic_molecule(box, pixel_size_angstrom=px, seed=args.seed)
    # Trilinear slices by default: the fitted model then matches the data up to noise, so the
    # loss optimum is the truth plus noise and the comparison is about the optimizers (with
    # exact 'nufft' slices the trilinear model's own error also grows as the fit converges).
    interp = args.interpolation
    simulate_with = args.simulate_with or interp
    sim = jc.simulate_particles(truth, args.n_images, pixel_size_angstrom=px, snr=args.snr, seed=args.seed,
                                interpolation=simulate_with)
    grid = FourierGrid(box)
    particles = jc.prepare_particles(sim.images, sim.rotations, sim.shifts_angstrom / px, sim.ctf, grid)
    print(f"  simulated ({simulate_with} slices) in {time.perf_counter() - t0:.1f} s; reconstructing with "
          f"{interp} slices")
    lam = args.lam
    diag = exact_hessian_diagonal(particles, jc.Problem(grid=grid, interpolation=interp, lam=lam))
    kappa = kappa_by_radius(diag, box, lam=lam)
    print(f"  condition number of the Hessian's diagonal over the Fourier ball: {kappa[len(kappa) // 2]:.0f} "
          f"(radius {len(kappa) // 2}), {kappa[-1]:.0f} (radius {len(kappa) - 1}); preconditioning pays "
          "where this is large")
    truth_ft = np.asarray(jc.volume_to_ft(jnp.asarray(truth), interp))  # the parameters fitted by trilinear slicing
    shell = slice(box // 4 - 2, box // 4 + 1)  # around half Nyquist
    # One objective for both methods: white noise (as simulated) and, by default, the MAP prior of
    # this simulation (its known signal spectrum and noise), whose optimum is the best map.
    prior = None
    if args.prior == "truth":
        from jaxcryo.simulate import oracle_shell_lam
        prior = oracle_shell_lam(truth_ft, sim.noise_sigma, args.n_images / 2)

    results = {}
    for method in ("sgd", "psgd"):
        fsc_by_epoch = []

        def track(state):
            fsc_by_epoch.append(float(jc.fsc_ft(np.asarray(state.params).mean(0), truth_ft)[shell].mean()))

        rec = jc.reconstruct(particles, box=box, pixel_size_angstrom=px, method=method, epochs=args.epochs,
                             batch_size=args.batch_size, seed=args.seed, lam=lam, wiener_after=args.wiener_after,
                             interpolation=interp, noise_model="white", shell_lam=prior, callback=track)
        results[method] = (rec, fsc_by_epoch)
        write_map(os.path.join(args.out, f"map_{method}.mrc"), rec.volume, voxel_size_angstrom=px)
    write_map(os.path.join(args.out, "truth.mrc"), truth, voxel_size_angstrom=px)

    print(f"\n{'epoch':>5} | {'loss sgd':>10} {'loss psgd':>10} | {'FSC@Nyq/2 sgd':>13} {'FSC@Nyq/2 psgd':>14}")
    for e in range(args.epochs):
        (rs, fs), (rp, fp) = results["sgd"], results["psgd"]
        print(f"{e + 1:>5} | {rs.history['loss'][e]:>10.4f} {rp.history['loss'][e]:>10.4f} | "
              f"{fs[e]:>13.3f} {fp[e]:>14.3f}")
    for method, (rec, _) in results.items():
        print(f"  {method}: {rec.history['seconds'][-1]:.1f} s for {args.epochs} epochs "
              f"(+{rec.history['compile_seconds']:.1f} s compile), half-map resolution "
              f"{rec.resolution_angstrom:.2f} A (FSC 0.143)")
    target = results["sgd"][0].history["loss"][-1]
    reached = [e for e, v in zip(results["psgd"][0].history["epoch"], results["psgd"][0].history["loss"]) if v <= target]
    if reached:
        print(f"  psgd reached sgd's epoch-{args.epochs} loss at epoch {reached[0]}")
    _plot_demo(results, os.path.join(args.out, "convergence.png"))
    summary = {m: {"loss": r.history["loss"], "seconds": r.history["seconds"], "fsc_half_nyquist": f,
                   "resolution_angstrom": r.resolution_angstrom} for m, (r, f) in results.items()}
    setting = {"box": box, "pixel_size_angstrom": px, "n_images": args.n_images, "snr": args.snr,
                          "epochs": args.epochs, "batch_size": args.batch_size, "lam": lam,
                          "wiener_after": args.wiener_after, "simulate_with": simulate_with, "interpolation": interp,
                          "prior": args.prior,
                          "kappa_diag_by_radius": [float(k) for k in kappa]}
    with open(os.path.join(args.out, "demo.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    with open(os.path.join(args.out, "demo_setting.json"), "w") as fh:
        json.dump(setting, fh, indent=1)
    print(f"  wrote {args.out}/map_sgd.mrc, map_psgd.mrc, truth.mrc, convergence.png, demo.json, demo_setting.json")
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


# ----------------------------------------------------------------------------- helpers


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help (not for flags and required options);
    descriptions keep their line breaks."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not value > 0 or (kind is float and not np_isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def np_isfinite(x) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def _nonneg_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _symmetry(text):
    """A point-group symbol ('C4', 'd2', 'I'...) in its canonical form; anything else is a usage error."""
    from jaxcryo.symmetry import canonical_symbol

    try:
        return canonical_symbol(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_symmetry.__name__ = "symmetry"


def _note(args, text: str) -> None:
    """One informational line on stderr (kept even with --quiet: notes are about the input)."""
    print(f"jaxcryo {args.command}: note: {text}", file=sys.stderr)


def _say(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


def check_outputs(*paths: str, folder: bool = False) -> list[str]:
    """Pre-flight check of a command's output paths, before any work: each must be writable
    (missing folders are created later by :func:`make_outputs`); an existing folder given as a
    file, or an unwritable place, is an InputError naming the path as given. Returns them absolute."""
    from jaxcryo.io import check_output_path

    return [check_output_path(p, folder=folder) for p in paths]


def make_outputs(*paths: str, folder: bool = False) -> None:
    """Create the missing folders of checked output paths, once the inputs are known good."""
    from jaxcryo.io import make_output_folder

    for p in paths:
        make_output_folder(p, folder=folder)


def _check_output_folder(path: str) -> str:
    return check_outputs(path)[0]


def remove_file(path: str) -> None:
    """Remove ``path`` if it is there (a finished run's checkpoint)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _matching_checkpoint(args, ckpt: str, saved: dict | None, settings: dict, load):
    """The state to resume from, or None to start afresh: ``load(ckpt)`` reads the checkpoint when
    its settings (``saved``, its JSON; None when there is none) equal ``settings``. With
    ``--resume`` a missing checkpoint, or one of other settings (named), is an InputError."""
    from jaxcryo.io import InputError

    if saved is None:
        if args.resume:
            raise InputError(f"{ckpt}: no checkpoint to resume from")
        return None
    if saved == settings:
        state = load(ckpt)
        _note(args, f"resuming from {ckpt} at epoch {state.epoch}")
        return state
    if args.resume:
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise InputError(f"{ckpt}: checkpoint was made with different settings ({', '.join(diff)}); "
                         "rerun with those settings, or without --resume to start afresh")
    _note(args, f"{ckpt} was made with other settings; starting afresh (it will be overwritten)")
    return None


def _refine_in_memory_bytes(n: int, box: int, *, chunk_size: int, batch_size: int, global_order: int, top_k: int,
                            interpolation: str):
    """What a refine run holding every particle in memory needs (``jaxcryo refine`` and the refine
    stage of ``jaxcryo abinitio``): its :func:`plan_memory` plan, the pose stage's scratch, and
    the final solve's bytes (refine's compiled epochs, REFINE_PROGRAMS_BYTES, come on top)."""
    from jaxcryo.pipeline import plan_memory, runtime_memory_bytes
    from jaxcryo.refine import final_solve_bytes, pose_stage_bytes

    plan = plan_memory(n, box, groups=2, chunk_size=chunk_size, batch_size=batch_size, interpolation=interpolation,
                       runtime_bytes=runtime_memory_bytes())
    scratch = pose_stage_bytes(min(batch_size, n), box, global_order=global_order, top_k=top_k,
                               interpolation=interpolation)
    return plan, scratch, final_solve_bytes(n, box, top_k=top_k, interpolation=interpolation)


def _refine_checkpoint(state):
    """A :class:`jaxcryo.refine.RefineState` as its checkpoint holds it: the reconstruction state
    with the pose state beside the optimizer state."""
    recon = state.recon
    return recon._replace(opt_state=(recon.opt_state, tuple(state.poses)))


def _refine_from_checkpoint(saved):
    """The :class:`jaxcryo.refine.RefineState` of a loaded :func:`_refine_checkpoint`."""
    from jaxcryo.refine import PoseState, RefineState

    opt_state, pose_leaves = saved.opt_state
    return RefineState(saved._replace(opt_state=opt_state), PoseState(*pose_leaves))


def _print_notes(args, table) -> None:
    """The STAR reader's one-line notes (CTF defaults used, columns ignored) on stderr."""
    for text in getattr(table, "notes", ()):
        _note(args, text)


def _map_root(path: str) -> str:
    root, ext = os.path.splitext(path)
    return root if ext.lower() in (".mrc", ".map", ".mrcs") else path


def _write_json(path: str, obj) -> None:
    from jaxcryo.io.errors import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")


def _plot_fsc(curve, pixel_size_angstrom: float, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from jaxcryo.fsc import resolution, shell_frequencies
    from jaxcryo.io.errors import atomic_output

    freqs = shell_frequencies(2 * (len(curve) - 1), pixel_size_angstrom)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(freqs[1:], np.asarray(curve)[1:], "o-", ms=3, label="FSC")
    for threshold, style in ((0.5, ":"), (0.143, "--")):
        res = resolution(curve, pixel_size_angstrom, threshold)
        ax.axhline(threshold, color="gray", ls=style, lw=1)
        ax.text(freqs[-1], threshold + 0.02, f"{threshold:g}: {res:.2f} Å", ha="right", fontsize=8)
    ax.set(xlabel="spatial frequency (1/Å)", ylabel="FSC", title=title, ylim=(-0.1, 1.05))
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _fsc_table(curve, pixel_size_angstrom: float) -> list[dict]:
    from jaxcryo.fsc import shell_frequencies

    freqs = shell_frequencies(2 * (len(curve) - 1), pixel_size_angstrom)
    return [{"shell": i, "frequency_per_angstrom": float(f), "resolution_angstrom": float(1 / f) if f else None,
             "fsc": float(c)} for i, (f, c) in enumerate(zip(freqs, curve))]


# ----------------------------------------------------------------------------- simulate


def _simulate(args) -> int:
    import numpy as np

    import jaxcryo as jc
    from jaxcryo.io import make_table, read_map, write_map, write_particles, write_stack
    from jaxcryo.io.cryosparc import write_cs

    out = check_outputs(args.out, folder=True)[0]
    if args.volume:
        volume, header_px = read_map(args.volume)
        box = volume.shape[0]
        if header_px > 0:
            px = header_px
        else:
            px = args.pixel_size
            _note(args, f"{args.volume} header has no voxel size; using --pixel-size {px:g} Å")
        if box < 4:
            from jaxcryo.io import InputError
            raise InputError(f"{args.volume}: map is {box} px; need at least 4 px")
        source = f"{os.path.basename(args.volume)} ({box}^3, {px:g} Å/px)"
    else:
        box, px = args.box, args.pixel_size
        volume = jc.synthetic_molecule(box, pixel_size_angstrom=px, seed=args.seed)
        source = f"the built-in synthetic molecule ({box}^3, {px:g} Å/px)"
    make_outputs(out, folder=True)
    _say(args, f"jaxcryo simulate: {args.n_images} particles of {source}, SNR {args.snr:g}, random poses, "
               f"CTF and shifts")
    t0 = time.perf_counter()
    sim = jc.simulate_particles(volume, args.n_images, pixel_size_angstrom=px, snr=args.snr, seed=args.seed)
    stack_path = os.path.join(out, "particles.mrcs")
    write_stack(stack_path, sim.images, pixel_size_angstrom=px)
    c = sim.ctf
    table = make_table(stack_paths=stack_path, stack_indices=np.arange(args.n_images), pixel_size_angstrom=px,
                       euler_deg=sim.euler_deg, shifts_angstrom=sim.shifts_angstrom,
                       defocus_u_angstrom=c.defocus_u_angstrom, defocus_v_angstrom=c.defocus_v_angstrom,
                       defocus_angle_deg=c.defocus_angle_deg, voltage_kv=_decimal(c.voltage_kv[0]),
                       cs_mm=_decimal(c.cs_mm[0]), amplitude_contrast=_decimal(c.amplitude_contrast[0]),
                       box_size=box)
    write_particles(os.path.join(out, "particles.star"), table)
    write_cs(os.path.join(out, "particles.cs"), table)  # the same particles for cryoSPARC-style input
    write_map(os.path.join(out, "truth.mrc"), volume, voxel_size_angstrom=px)
    _say(args, f"jaxcryo simulate: wrote {out}/particles.star, particles.cs, particles.mrcs, truth.mrc "
               f"(noise sigma {sim.noise_sigma:.3g}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _decimal(x) -> float:
    """A float32 setting as the decimal it was meant to be (2.7, not 2.700000047683716)."""
    return float(f"{float(x):.6g}")


# ----------------------------------------------------------------------------- project


def _default_interpolation() -> str:
    import jax
    return "nufft" if jax.default_backend() == "cpu" else "trilinear"


def _project(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcryo.forward import CTFParams, FourierGrid, render, volume_to_ft
    from jaxcryo.io import InputError, read_map, write_stack
    from jaxcryo.pipeline import read_table, table_poses

    out = _check_output_folder(args.out)
    volume, header_px = read_map(args.map)
    table = read_table(args.star, require_images=False)  # poses and CTF only, as relion_project --ang
    _print_notes(args, table)
    box = volume.shape[0]
    star_box = table.box_size[table.box_size > 0]
    if len(star_box) and np.any(star_box != box):
        raise InputError(f"{args.star}: rlnImageSize is {star_box[star_box != box][0]} px but {args.map} is "
                         f"{box} px; project needs the map's box")
    px = float(table.pixel_size_angstrom[0])
    if not np.allclose(table.pixel_size_angstrom, px, rtol=1e-4):
        raise InputError(f"{args.star}: particles have different pixel sizes; project needs one")
    if header_px <= 0 or abs(header_px - px) > 0.01 * px:
        _note(args, f"{os.path.basename(args.map)} header says {header_px:.2f} Å/px; using the STAR's {px:.2f} Å/px")
    with_ctf = not args.no_ctf
    if with_ctf and not table.has_ctf:
        _note(args, f"{args.star} has no defocus (rlnDefocusU); projecting without CTF")
    interpolation = args.interpolation if args.interpolation != "auto" else _default_interpolation()
    grid = FourierGrid(box, box // 2 if interpolation == "nufft" else None)
    vft = volume_to_ft(jnp.asarray(volume), interpolation)
    draw = jax.jit(lambda r, s, c: render(vft, r, s, c, grid, interpolation))
    n = len(table)
    images = np.empty((n, box, box), np.float32)
    chunk = 256
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        rotations, shifts_px, ctf = table_poses(table, rows, with_ctf=with_ctf)
        ctf = None if ctf is None else CTFParams(*(jnp.asarray(f) for f in ctf))
        images[rows] = np.asarray(draw(jnp.asarray(rotations), jnp.asarray(shifts_px), ctf))
    make_outputs(out)
    write_stack(out, images, pixel_size_angstrom=px)
    _say(args, f"jaxcryo project: wrote {n} {'CTF-modulated ' if with_ctf and table.has_ctf else ''}projections "
               f"({box} px, {px:g} Å/px, {interpolation}) to {out}")
    return 0


# ----------------------------------------------------------------------------- fsc


def _fsc(args) -> int:

    from jaxcryo.fsc import fsc, resolution
    from jaxcryo.io import InputError, read_map

    plot = _check_output_folder(args.plot) if args.plot else None
    json_out = _check_output_folder(args.json) if args.json else None
    a, px_a = read_map(args.map_a)
    b, px_b = read_map(args.map_b)
    if a.shape != b.shape:
        raise InputError(f"{args.map_b}: shape {b.shape} differs from {args.map_a}'s {a.shape}")
    if args.pixel_size:
        px = args.pixel_size
    elif px_a > 0:
        px = px_a
        if px_b > 0 and abs(px_b - px_a) > 0.01 * px_a:
            _note(args, f"{args.map_b} header says {px_b:.3f} Å/px, {args.map_a} {px_a:.3f} Å/px; using {px_a:.3f}")
    elif px_b > 0:
        px = px_b
    else:
        raise InputError(f"{args.map_a}: header has no voxel size; pass --pixel-size")
    curve = fsc(a, b)
    res05, res0143 = resolution(curve, px, 0.5), resolution(curve, px, 0.143)
    rows = _fsc_table(curve, px)
    if not args.quiet:
        print(f"{'shell':>5} {'1/Å':>8} {'Å':>8} {'FSC':>7}")
        for r in rows:
            res = f"{r['resolution_angstrom']:.2f}" if r["resolution_angstrom"] else "inf"
            print(f"{r['shell']:>5} {r['frequency_per_angstrom']:>8.4f} {res:>8} {r['fsc']:>7.3f}")
    if plot:
        make_outputs(plot)
        _plot_fsc(curve, px, plot, f"{os.path.basename(args.map_a)} vs {os.path.basename(args.map_b)}")
    if json_out:
        make_outputs(json_out)
        _write_json(json_out, {"pixel_size_angstrom": px, "resolution_fsc_0.5": res05,
                               "resolution_fsc_0.143": res0143, "curve": rows})
    print(f"resolution: {res05:.2f} Å at FSC 0.5, {res0143:.2f} Å at FSC 0.143 ({a.shape[0]} px, {px:g} Å/px)"
          + (f"; plot {plot}" if plot else ""))
    return 0


# ----------------------------------------------------------------------------- reconstruct


def _settings_fingerprint(args, table, box: int, px: float, mode: str) -> dict:
    import hashlib

    with open(table.star_path, "rb") as fh:
        digest = hashlib.sha1(fh.read()).hexdigest()
    return {"star": os.path.abspath(table.star_path), "star_sha1": digest, "n_particles": len(table), "box": box,
            "pixel_size_angstrom": px, "method": args.method, "batch_size": args.batch_size,
            "interpolation": args.interpolation, "lam": args.lam, "seed": args.seed, "halves": not args.no_halves,
            "wiener_after": args.wiener_after, "symmetry": args.symmetry, "noise_model": args.noise_model,
            "mode": mode}


def _compilation_cache() -> None:
    """Keep compiled XLA programs between runs (JAX's persistent cache: a second run of the same
    box skips most compilation) in $JAXCRYO_CACHE_DIR, default ~/.cache/jaxcryo/xla; set
    JAXCRYO_CACHE_DIR to an empty string to turn it off. A cache set by the caller is kept."""
    import jax

    path = os.environ.get("JAXCRYO_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jaxcryo", "xla"))
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _reconstruct(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    import jaxcryo as jc
    from jaxcryo.forward import FourierGrid
    from jaxcryo.fsc import resolution
    from jaxcryo.io import InputError, ParticleStack, write_map
    from jaxcryo.pipeline import (GIB, available_memory_bytes, checkpoint_path, checkpoint_settings, format_bytes,
                                  load_checkpoint, load_particles, open_particles, plan_memory, plan_streaming,
                                  reconstruct_streaming, runtime_memory_bytes, save_checkpoint, state_template,
                                  limit_heap_growth)

    import jax

    from jaxcryo import distributed as dist

    try:  # before any other JAX call
        multi = dist.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:
        raise InputError(f"--coordinator/--num-processes/--process-id: {err}") from None
    lead = not multi or jax.process_index() == 0
    if not lead:
        args.quiet = True
    _compilation_cache()
    out = _check_output_folder(args.out)
    root = _map_root(out)
    folder = os.path.dirname(out)
    ckpt = checkpoint_path(out)
    check_outputs(f"{root}_half1.mrc", f"{root}_half2.mrc", f"{root}_fsc.png", os.path.join(folder, "history.json"),
                  ckpt)
    t_start = time.perf_counter()
    table, stack = open_particles(args.star, datadir=args.datadir)
    if lead:
        _print_notes(args, table)
    with stack:
        note = stack.pixel_size_note()
        if note:
            _note(args, note)
        box, px, n = stack.box_size, float(table.pixel_size_angstrom[0]), len(table)
        halves = not args.no_halves
        if halves and n < 2:
            raise InputError(f"{args.star}: {n} particle; half-maps need at least 2 (or pass --no-halves)")
        if not table.has_ctf:
            _note(args, f"{args.star} has no defocus (rlnDefocusU); reconstructing without CTF")
        grid = FourierGrid(box)
        groups = 2 if halves else 1
        # The plan counts what the run holds: this process's runtime (measured now), particles or
        # streamed blocks, volumes, compiled-step scratch, image chunks (see jaxcryo.pipeline).
        limit_heap_growth()
        sizes = dict(groups=groups, batch_size=args.batch_size, interpolation=args.interpolation,
                     runtime_bytes=runtime_memory_bytes())
        plan = plan_memory(n, box, chunk_size=args.chunk_size or 4096, **sizes)
        limit = args.max_memory_gb * GIB if args.max_memory_gb else 0.8 * available_memory_bytes()

        if args.method is None:  # the normal equations hold every particle in one process's memory
            args.method = "psgd" if (args.stream or multi or plan.in_memory_bytes > limit) else "normal"
        settings = _settings_fingerprint(args, table, box, px, "memory")
        saved = None
        if os.path.exists(ckpt):
            saved = checkpoint_settings(ckpt)  # JSON only; the arrays are read once the settings match
        # A checkpoint made streaming keeps streaming, in its blocks (its minibatches are drawn within them).
        saved_chunk = None
        if (saved is not None and str(saved.get("mode", "")).startswith("stream ")
                and saved == {**settings, "mode": saved["mode"]}
                and args.chunk_size in (None, int(saved["mode"].split()[1]))):
            saved_chunk = int(saved["mode"].split()[1])
        stream = args.stream or plan.in_memory_bytes > limit or saved_chunk is not None
        chunk = saved_chunk or args.chunk_size or 4096
        if stream:
            # Without --chunk-size, the largest power-of-two block (up to 4096) whose run fits the limit.
            while (saved_chunk is None and args.chunk_size is None and chunk > 256
                   and plan_streaming(box, n_images=n, chunk_size=chunk, **sizes).in_memory_bytes > limit):
                chunk //= 2
            settings["mode"] = f"stream {chunk}"
            splan = plan_streaming(box, n_images=n, chunk_size=chunk, **sizes)
            needed = splan.in_memory_bytes
            how = (f"streaming blocks of {chunk} images from disk: {splan.describe('blocks in flight')}; "
                   f"the whole set in memory would need {format_bytes(plan.in_memory_bytes)}")
        else:
            needed = plan.in_memory_bytes
            how = f"in memory: {plan.describe()}"
        _say(args, f"jaxcryo reconstruct: {n} particles, {box} px, {px:g} Å/px, {args.method}, "
                   f"{args.epochs} epochs of batch {args.batch_size}, {args.interpolation}"
                   + (f", symmetry {args.symmetry}" if args.symmetry != "C1" else "") + "; "
                   f"memory needed {format_bytes(needed)} ({how}), limit {format_bytes(limit)}")
        if needed > limit:
            raise InputError(
                f"{args.star}: {n} particles of {box} px need {format_bytes(needed)} even when streamed in chunks "
                f"of {chunk}, above the limit of {format_bytes(limit)}; lower --chunk-size or --batch-size, or "
                "raise --max-memory-gb if the machine has the memory")

        template = state_template(method=args.method, box=box, groups=2 if halves else 1)
        resume = _matching_checkpoint(args, ckpt, saved, settings, lambda path: load_checkpoint(path, template)[0])
        if stream and multi:
            raise InputError(f"{args.star}: streaming is single-process; with several processes each one "
                             "holds only its share in memory (raise --max-memory-gb, or add processes)")
        if stream and args.method == "normal":
            raise InputError(f"{args.star}: the command line streams --method psgd only (its memory plan for "
                             "--method normal holds every particle); use --method psgd, or in Python "
                             "jc.reconstruct(pipeline.StreamedBlocks(...), method='normal')")

        if lead:
            make_outputs(out)  # the inputs are good: create missing output folders (as RELION does)
        start_epoch = 0 if resume is None else resume.epoch
        epochs_bar = tqdm(total=args.epochs, initial=min(start_epoch, args.epochs), desc="epochs", unit="epoch",
                          disable=args.quiet, leave=False, position=0)

        def on_epoch(state):
            if lead:  # every process holds the same state; the checkpoint folder is shared
                save_checkpoint(ckpt, state, settings)
            epochs_bar.update(1)
            epochs_bar.set_postfix(loss=f"{state.history['loss'][-1]:.5g}")

        if stream:
            images_bar = tqdm(total=n, desc="images this epoch", unit="img", disable=args.quiet, leave=False,
                              position=1)

            def on_chunk(k):
                images_bar.update(k)
                if images_bar.n >= n:
                    images_bar.reset()

            rec = reconstruct_streaming(table, stack, box=box, pixel_size_angstrom=px, method=args.method,
                                        interpolation=args.interpolation, epochs=args.epochs,
                                        batch_size=args.batch_size, lam=args.lam, halves=halves, seed=args.seed,
                                        chunk_size=chunk, resume=resume, callback=on_epoch,
                                        progress=on_chunk, symmetry=args.symmetry, noise_model=args.noise_model,
                                        wiener_after=args.wiener_after, devices=args.devices)
            images_bar.close()
        else:
            mesh = share = None
            mine, my_stack = table, stack
            if multi:  # this process reads only the rows its devices hold
                mesh = dist.make_mesh(args.devices)
                share = dist.host_share(n, mesh=mesh, halves=halves, seed=args.seed)
                mine = table.subset(share.rows)
                my_stack = ParticleStack(mine)
            bar = tqdm(total=len(mine), desc="reading particles", unit="img", disable=args.quiet, leave=False,
                       position=1)
            particles = load_particles(mine, my_stack, grid, chunk_size=chunk, progress=bar.update,
                                       optics_groups=np.unique(table.optics_group))
            bar.close()
            if my_stack is not stack:
                my_stack.close()
            epochs_bar.set_postfix_str("compiling")
            config = jc.Config(method=args.method, interpolation=args.interpolation, epochs=args.epochs,
                               batch_size=args.batch_size, lam=args.lam, halves=halves, seed=args.seed,
                               wiener_after=args.wiener_after, symmetry=args.symmetry, noise_model=args.noise_model)
            rec = jc.reconstruct(particles, config, box=box, pixel_size_angstrom=px, resume=resume,
                                 callback=on_epoch, devices=None if multi else args.devices, mesh=mesh, share=share)
            del particles
        epochs_bar.close()

    if not lead:  # every process has the same maps; process 0 writes them
        return 0
    write_map(out, rec.volume, voxel_size_angstrom=px)
    written = [os.path.basename(out)]
    history = {k: rec.history.get(k, []) for k in ("epoch", "loss", "data_loss", "prior", "seconds")}
    if "noise_sigma2" in rec.history:  # per optics group (in rlnOpticsGroup order) and Fourier shell
        history.update(noise_optics_groups=[int(g) for g in np.unique(table.optics_group)],
                       noise_sigma2=rec.history["noise_sigma2"])
    history["compile_seconds"] = rec.history.get("compile_seconds")
    history.update(settings={k: v for k, v in settings.items() if k != "star_sha1"}, pixel_size_angstrom=px)
    if halves:
        for i in (0, 1):
            write_map(f"{root}_half{i + 1}.mrc", rec.half_maps[i], voxel_size_angstrom=px)
            written.append(os.path.basename(f"{root}_half{i + 1}.mrc"))
        res05 = resolution(rec.fsc, px, 0.5)
        _plot_fsc(rec.fsc, px, f"{root}_fsc.png", f"half-map FSC, {os.path.basename(out)}")
        written.append(os.path.basename(f"{root}_fsc.png"))
        history.update(fsc=_fsc_table(rec.fsc, px), resolution_angstrom=rec.resolution_angstrom,
                       resolution_fsc_0_5_angstrom=res05)
    else:
        history.update(fsc=None, resolution_angstrom=None, resolution_fsc_0_5_angstrom=None)
    _write_json(os.path.join(folder, "history.json"), history)
    written.append("history.json")
    if args.keep_checkpoint:
        written.append(os.path.basename(ckpt))
    else:  # the run is done; the checkpoint (several times the map's size) only matters to extend it
        remove_file(ckpt)
    loss = rec.history["loss"][-1] if rec.history["loss"] else float("nan")
    res = f"half-map resolution {rec.resolution_angstrom:.2f} Å (FSC 0.143)" if halves else "no half-maps"
    print(f"jaxcryo reconstruct: {n} particles, {rec.state.epoch} epochs {args.method}, loss {loss:.5g}, {res}, "
          f"{time.perf_counter() - t_start:.1f} s; wrote {', '.join(written)} in {folder}")
    return 0


# ----------------------------------------------------------------------------- refine


def _refine(args) -> int:
    import dataclasses

    import numpy as np
    from tqdm.auto import tqdm

    import jaxcryo as jc
    from jaxcryo.forward import FourierGrid
    from jaxcryo.fsc import resolution
    from jaxcryo.geometry import matrix_to_euler
    from jaxcryo.io import InputError, read_map, write_map
    from jaxcryo.pipeline import (GIB, StreamedBlocks, available_memory_bytes, checkpoint_path, checkpoint_settings,
                                  format_bytes, load_checkpoint, load_particles, open_particles,
                                  plan_streaming, refine_state_template, runtime_memory_bytes, save_checkpoint,
                                  write_refined_particles, REFINE_PROGRAMS_BYTES, limit_heap_growth)
    from jaxcryo.refine import final_solve_bytes, resample_map

    out = _check_output_folder(args.out)
    root = _map_root(out)
    folder = os.path.dirname(out)
    ckpt = checkpoint_path(out)
    star_out = f"{root}_particles.star"
    check_outputs(f"{root}_half1.mrc", f"{root}_half2.mrc", f"{root}_fsc.png", os.path.join(folder, "history.json"),
                  ckpt, star_out)
    t_start = time.perf_counter()
    table, stack = open_particles(args.star, require_poses=args.local, datadir=args.datadir)
    _print_notes(args, table)
    with stack:
        note = stack.pixel_size_note()
        if note:
            _note(args, note)
        box, px, n = stack.box_size, float(table.pixel_size_angstrom[0]), len(table)
        if n < 2:
            raise InputError(f"{args.star}: {n} particle; gold-standard refinement needs at least 2")
        if not table.has_ctf:
            _note(args, f"{args.star} has no CTF columns; refining without CTF")
        reference, ref_px = read_map(args.reference)
        if reference.ndim != 3 or len(set(reference.shape)) != 1:
            raise InputError(f"{args.reference}: map is {reference.shape}; need a cubic map")
        if ref_px <= 0:
            ref_px = px
            _note(args, f"{args.reference} header has no voxel size; assuming the particles' {px:g} Å/px")
        try:
            reference = resample_map(reference, ref_px, box, px)
        except ValueError as err:
            raise InputError(f"{args.reference}: {err}") from None
        if reference.shape[0] != box or ref_px != px:
            _note(args, f"{os.path.basename(args.reference)} ({ref_px:g} Å/px) resampled to {box} px of {px:g} Å")
        if not np.all(np.isfinite(reference)):
            raise InputError(f"{args.reference}: map has NaN or Inf values")
        mask = None
        if args.mask:
            mask, _ = read_map(args.mask)
            if mask.shape != (box,) * 3:
                raise InputError(f"{args.mask}: mask is {mask.shape}, the particles need {(box,) * 3}")
            if not np.all(np.isfinite(mask)) or mask.min() < -1e-3 or mask.max() > 1 + 1e-3:
                raise InputError(f"{args.mask}: mask values must lie in [0, 1]")
            mask = np.clip(mask, 0.0, 1.0)
        if args.diameter is not None and args.diameter > box * px:
            raise InputError(f"--diameter {args.diameter:g} Å is larger than the box ({box * px:g} Å)")
        limit_heap_growth()
        plan, scratch, solve_in_memory = _refine_in_memory_bytes(
            n, box, chunk_size=args.chunk_size, batch_size=args.batch_size, global_order=args.global_order,
            top_k=args.top_k, interpolation=args.interpolation)
        limit = args.max_memory_gb * GIB if args.max_memory_gb else 0.8 * available_memory_bytes()
        extra = scratch + REFINE_PROGRAMS_BYTES
        # Streamed from disk when asked, or when the set does not fit in memory but its blocks do.
        splan = plan_streaming(box, n_images=n, chunk_size=args.chunk_size, batch_size=args.batch_size,
                               interpolation=args.interpolation, runtime_bytes=runtime_memory_bytes())
        solve = {"memory": solve_in_memory,
                 "stream": final_solve_bytes(min(n, args.chunk_size), box, top_k=args.top_k,
                                             interpolation=args.interpolation)}
        stream = args.stream or (plan.in_memory_bytes + extra + solve["memory"] > limit
                                 >= splan.in_memory_bytes + extra + solve["stream"])
        used = splan if stream else plan
        final = solve["stream" if stream else "memory"]
        needed = used.in_memory_bytes + extra + final
        how = (f"streaming blocks of {args.chunk_size} images from disk: {splan.describe('blocks in flight')}"
               if stream else f"in memory: {plan.describe()}")
        _say(args, f"jaxcryo refine: {n} particles, {box} px, {px:g} Å/px, from {os.path.basename(args.reference)} "
                   f"low-passed to {args.initial_lowpass:g} Å, {'local' if args.local else 'global then local'} "
                   f"searches, at most {args.epochs} epochs; memory needed about {format_bytes(needed)} "
                   f"({how}, plus {format_bytes(scratch)} of pose-stage scratch, "
                   f"{format_bytes(REFINE_PROGRAMS_BYTES)} of refine's compiled epochs and {format_bytes(final)} "
                   f"of the final solve), limit {format_bytes(limit)}")
        if needed > limit:
            raise InputError(f"{args.star}: {n} particles of {box} px need {format_bytes(needed)}, above the "
                             f"limit of {format_bytes(limit)}; lower --chunk-size, --batch-size or --global-order, "
                             "or raise --max-memory-gb")

        import hashlib
        with open(table.star_path, "rb") as fh:
            digest = hashlib.sha1(fh.read()).hexdigest()
        with open(args.reference, "rb") as fh:
            ref_digest = hashlib.sha1(fh.read()).hexdigest()
        settings = {"command": "refine", "star": os.path.abspath(table.star_path), "star_sha1": digest,
                    "reference_sha1": ref_digest, "n_particles": n, "box": box, "pixel_size_angstrom": px,
                    "initial_lowpass": args.initial_lowpass, "diameter": args.diameter,
                    "mask": os.path.abspath(args.mask) if args.mask else None, "local": bool(args.local),
                    "method": args.method, "batch_size": args.batch_size, "seed": args.seed,
                    "global_order": args.global_order, "top_k": args.top_k, "temperature": args.temperature,
                    "symmetry": args.symmetry, "interpolation": args.interpolation}
        template = refine_state_template(method=args.method, box=box, n_particles=n)
        saved = checkpoint_settings(ckpt) if os.path.exists(ckpt) else None  # JSON only
        saved_state = _matching_checkpoint(args, ckpt, saved, settings,
                                           lambda path: load_checkpoint(path, template)[0])
        resume = None if saved_state is None else _refine_from_checkpoint(saved_state)

        make_outputs(out)  # the inputs are good: create missing output folders (as RELION does)
        grid = FourierGrid(box)
        source = table if args.local else dataclasses.replace(table, shifts_angstrom=np.zeros((n, 2)))
        if stream:  # read again every pass; the noise model per optics group, as in memory
            particles = StreamedBlocks(source, stack, grid, chunk_size=args.chunk_size)
        else:
            bar = tqdm(total=n, desc="reading particles", unit="img", disable=args.quiet, leave=False)
            particles = load_particles(source, stack, grid, chunk_size=args.chunk_size, progress=bar.update,
                                       optics_groups=np.unique(table.optics_group))  # a noise model per group
            bar.close()

    start_epoch = 0 if resume is None else resume.recon.epoch
    epochs_bar = tqdm(total=args.epochs, initial=min(start_epoch, args.epochs), desc="refine epochs", unit="epoch",
                      disable=args.quiet, leave=False)

    def on_epoch(state):
        save_checkpoint(ckpt, _refine_checkpoint(state), settings)
        h = state.recon.history
        epochs_bar.update(1)
        epochs_bar.set_postfix(res=f"{h['resolution_angstrom'][-1]:.2f}A", step=f"{h['angular_step_deg'][-1]:g}deg",
                               change=f"{h['mean_pose_change_deg'][-1]:.2f}deg")

    config = jc.Config(initial_lowpass_angstrom=args.initial_lowpass, diameter_angstrom=args.diameter,
                       local=args.local, epochs=args.epochs, batch_size=args.batch_size, method=args.method,
                       interpolation=args.interpolation, global_order=args.global_order, top_k=args.top_k,
                       temperature=args.temperature, seed=args.seed, symmetry=args.symmetry)
    try:  # streamed blocks reopen the stacks' files as they read them (the `with` above closed them)
        result = jc.refine(particles, reference, config, box=box, pixel_size_angstrom=px, mask=mask, resume=resume,
                           callback=on_epoch)
    finally:
        stack.close()
    epochs_bar.close()
    del particles
    rec = result.reconstruction
    write_map(out, rec.volume, voxel_size_angstrom=px)
    written = [os.path.basename(out)]
    for i in (0, 1):
        write_map(f"{root}_half{i + 1}.mrc", rec.half_maps[i], voxel_size_angstrom=px)
        written.append(os.path.basename(f"{root}_half{i + 1}.mrc"))
    _plot_fsc(rec.fsc, px, f"{root}_fsc.png", f"half-map FSC, {os.path.basename(out)}")
    written.append(os.path.basename(f"{root}_fsc.png"))
    prior = table.shifts_angstrom if args.local else np.zeros((n, 2))
    euler = np.asarray(matrix_to_euler(np.asarray(result.rotations, np.float64)))
    write_refined_particles(star_out, table, euler_deg=euler, shifts_angstrom=prior + result.shifts_px * px,
                            random_subset=result.half_set, max_prob=result.max_prob)
    written.append(os.path.basename(star_out))
    keys = ("epoch", "loss", "seconds", "resolution_angstrom", "angular_step_deg", "shift_step_px", "r_limit",
            "mean_pose_change_deg", "mode")
    history = {k: rec.history[k] for k in keys}
    history.update(compile_seconds=rec.history.get("compile_seconds"), pixel_size_angstrom=px,
                   settings={k: v for k, v in settings.items() if not k.endswith("sha1")},
                   fsc=_fsc_table(rec.fsc, px), final_resolution_angstrom=rec.resolution_angstrom,
                   final_resolution_fsc_0_5_angstrom=resolution(rec.fsc, px, 0.5))
    if "global_rotations" in rec.history:  # rotations each global search scored (an asymmetric unit)
        history["global_rotations"] = rec.history["global_rotations"]
    _write_json(os.path.join(folder, "history.json"), history)
    written.append("history.json")
    if args.keep_checkpoint:
        written.append(os.path.basename(ckpt))
    else:  # the run is done; the checkpoint only matters to extend it
        remove_file(ckpt)
    h = rec.history
    print(f"jaxcryo refine: {n} particles, {len(h['epoch'])} epochs, half-map resolution "
          f"{rec.resolution_angstrom:.2f} Å (FSC 0.143), last angular step {h['angular_step_deg'][-1]:g} deg, "
          f"{time.perf_counter() - t_start:.1f} s; wrote {', '.join(written)} in {folder}")
    return 0


def _abinitio(args) -> int:
    import dataclasses

    import numpy as np
    from tqdm.auto import tqdm

    from jaxcryo.abinitio import AbInitioState, abinitio, flip_hand, flip_rotations
    from jaxcryo.forward import FourierGrid
    from jaxcryo.geometry import matrix_to_euler
    from jaxcryo.io import InputError, write_map
    from jaxcryo.pipeline import (GIB, abinitio_state_template, available_memory_bytes, checkpoint_path,
                                  checkpoint_settings, format_bytes, load_checkpoint, load_particles, open_particles,
                                  plan_memory, refine_state_template, save_checkpoint, write_refined_particles)

    out = _check_output_folder(args.out)
    root = _map_root(out)
    folder = os.path.dirname(out)
    ckpt = checkpoint_path(out)
    star_out = f"{root}_particles.star"
    refine_ckpt = f"{root}.refine.ckpt.npz"  # the refine stage's, beside the SGD epochs' checkpoint
    check_outputs(star_out, os.path.join(folder, "history.json"), ckpt, refine_ckpt)
    t_start = time.perf_counter()
    if args.classes != 1:
        raise InputError(f"--classes {args.classes}: several classes are not implemented yet; use --classes 1")
    table, stack = open_particles(args.star, require_poses=False, datadir=args.datadir)
    _print_notes(args, table)
    with stack:
        note = stack.pixel_size_note()
        if note:
            _note(args, note)
        box, px, n = stack.box_size, float(table.pixel_size_angstrom[0]), len(table)
        if n < 2:
            raise InputError(f"{args.star}: {n} particle; ab initio needs many")
        if not table.has_ctf:
            _note(args, f"{args.star} has no CTF columns; running without CTF")
        if args.diameter is not None and args.diameter > box * px:
            raise InputError(f"--diameter {args.diameter:g} Å is larger than the box ({box * px:g} Å)")
        plan = plan_memory(n, box, groups=1, chunk_size=args.chunk_size)
        limit = args.max_memory_gb * GIB if args.max_memory_gb else 0.8 * available_memory_bytes()
        needed, refine_note = plan.in_memory_bytes, ""
        if args.refine_epochs:  # the refine stage at refine's defaults (in memory, as the SGD epochs)
            from jaxcryo.pipeline import REFINE_PROGRAMS_BYTES

            rplan, scratch, solve = _refine_in_memory_bytes(n, box, chunk_size=args.chunk_size, batch_size=128,
                                                           global_order=2, top_k=4, interpolation="trilinear")
            refine_bytes = rplan.in_memory_bytes + scratch + REFINE_PROGRAMS_BYTES + solve
            needed = max(needed, refine_bytes)
            refine_note = f"; the refine stage about {format_bytes(refine_bytes)}"
        _say(args, f"jaxcryo abinitio: {n} particles, {box} px, {px:g} Å/px, "
                   f"{args.epochs} + {args.local_epochs} epochs from "
                   f"{args.start_resolution:g} Å to {args.final_resolution or max(12.0, 2.5 * px):g} Å"
                   + (f", then at most {args.refine_epochs} refine epochs" if args.refine_epochs else "")
                   + f"; memory needed about {plan.describe()}{refine_note}, limit {format_bytes(limit)}")
        if needed > limit:
            raise InputError(f"{args.star}: {n} particles of {box} px need {format_bytes(needed)}, "
                             f"above the limit of {format_bytes(limit)}; raise --max-memory-gb"
                             + (" or pass --refine-epochs 0" if needed > plan.in_memory_bytes else ""))

        import hashlib
        with open(table.star_path, "rb") as fh:
            digest = hashlib.sha1(fh.read()).hexdigest()
        settings = {"command": "abinitio", "star": os.path.abspath(table.star_path), "star_sha1": digest,
                    "n_particles": n, "box": box, "pixel_size_angstrom": px, "diameter": args.diameter,
                    "epochs": args.epochs, "start_resolution": args.start_resolution,
                    "final_resolution": args.final_resolution, "batch_size": args.batch_size,
                    "max_batch_size": args.max_batch_size, "method": args.method, "seed": args.seed,
                    "symmetry": args.symmetry, "classes": args.classes, "max_shift_px": args.max_shift,
                    "local_epochs": args.local_epochs, "cycles": args.cycles}
        # not a checkpoint setting: the checkpoint holds the SGD epochs, the refine stage runs after them
        template = abinitio_state_template(method=args.method, box=box, n_particles=n)
        saved = checkpoint_settings(ckpt) if os.path.exists(ckpt) else None  # JSON only
        saved_state = _matching_checkpoint(args, ckpt, saved, settings,
                                           lambda path: load_checkpoint(path, template)[0])
        resume = None if saved_state is None else AbInitioState.from_recon_state(saved_state)
        # The refine stage's checkpoint continues only the SGD result it was made from: the same
        # settings, and an SGD checkpoint to resume from (else the SGD epochs run afresh).
        refine_settings = dict(settings, refine_epochs=args.refine_epochs)
        refine_resume = None
        if resume is not None and args.refine_epochs and os.path.exists(refine_ckpt):
            if checkpoint_settings(refine_ckpt) == refine_settings:
                template = refine_state_template(method="psgd", box=box, n_particles=n)  # the stage: refine's default
                refine_resume = _refine_from_checkpoint(load_checkpoint(refine_ckpt, template)[0])
                _note(args, f"resuming the refine stage from {refine_ckpt} at epoch {refine_resume.recon.epoch}")

        make_outputs(out)  # the inputs are good: create missing output folders (as RELION does)
        grid = FourierGrid(box)
        source = dataclasses.replace(table, shifts_angstrom=np.zeros((n, 2)))
        bar = tqdm(total=n, desc="reading particles", unit="img", disable=args.quiet, leave=False)
        particles = load_particles(source, stack, grid, chunk_size=args.chunk_size, progress=bar.update)
        bar.close()

    start_epoch = 0 if resume is None else resume.epoch
    total = args.epochs + args.local_epochs + (args.cycles - 1) * (1 + args.local_epochs)
    epochs_bar = tqdm(total=total, initial=min(start_epoch, total), desc="abinitio epochs",
                      unit="epoch", disable=args.quiet, leave=False)

    def on_epoch(state):
        save_checkpoint(ckpt, state.to_recon_state(), settings)
        h = state.history
        epochs_bar.update(1)
        epochs_bar.set_postfix(limit=f"{h['resolution_angstrom'][-1]:.1f}A", step=f"{h['angular_step_deg'][-1]:g}deg",
                               T=f"{h['temperature'][-1]:.2f}")

    refine_bar = tqdm(total=args.refine_epochs, initial=0 if refine_resume is None else refine_resume.recon.epoch,
                      desc="refine epochs", unit="epoch", leave=False, disable=args.quiet or args.refine_epochs == 0)

    def on_refine_epoch(state):
        save_checkpoint(refine_ckpt, _refine_checkpoint(state), refine_settings)
        h = state.recon.history
        refine_bar.update(1)
        refine_bar.set_postfix(mode=h["mode"][-1], step=f"{h['angular_step_deg'][-1]:g}deg",
                               res=f"{h['resolution_angstrom'][-1]:.1f}A")

    result = abinitio(particles, box=box, pixel_size_angstrom=px, epochs=args.epochs,
                      diameter_angstrom=args.diameter, start_resolution_angstrom=args.start_resolution,
                      final_resolution_angstrom=args.final_resolution, batch_size=args.batch_size,
                      max_batch_size=args.max_batch_size, method=args.method, seed=args.seed, resume=resume,
                      max_shift_px=args.max_shift, local_epochs=args.local_epochs, cycles=args.cycles,
                      callback=on_epoch, classes=args.classes, symmetry=args.symmetry,
                      refine_epochs=args.refine_epochs, refine_callback=on_refine_epoch, refine_resume=refine_resume)
    epochs_bar.close()
    refine_bar.close()
    del particles
    volume, rotations = result.volume, result.rotations
    if args.flip_hand:
        volume, rotations = flip_hand(volume), flip_rotations(rotations)
    write_map(out, volume, voxel_size_angstrom=px)
    euler = np.asarray(matrix_to_euler(np.asarray(rotations, np.float64)))
    write_refined_particles(star_out, table, euler_deg=euler, shifts_angstrom=result.shifts_px * px,
                            random_subset=1 + (np.arange(n) % 2), max_prob=result.max_prob)
    keys = ("epoch", "loss", "seconds", "resolution_angstrom", "r_limit", "batch_size", "angular_step_deg",
            "temperature")
    history = {k: result.history[k] for k in keys}
    history.update(compile_seconds=result.history["compile_seconds"][0], pixel_size_angstrom=px,
                   flip_hand=bool(args.flip_hand),
                   settings={**{k: v for k, v in settings.items() if not k.endswith("sha1")},
                             "refine_epochs": args.refine_epochs})
    if "refine" in result.history:
        history["refine"] = result.history["refine"]
    _write_json(os.path.join(folder, "history.json"), history)
    written = [os.path.basename(out), os.path.basename(star_out), "history.json"]
    if args.keep_checkpoint:
        written += [os.path.basename(p) for p in (ckpt, refine_ckpt) if os.path.exists(p)]
    else:  # the run is done; the checkpoints only matter to extend it
        remove_file(ckpt)
        remove_file(refine_ckpt)
    h = result.history
    refined = ""
    if "refine" in h:
        r = h["refine"]
        refined = (f" + {len(r['epoch'])} refine epochs (half-map resolution {r['final_resolution_angstrom']:.1f} Å, "
                   f"angular step {r['angular_step_deg'][-1]:g} deg)")
    print(f"jaxcryo abinitio: {n} particles, {len(h['epoch'])} epochs, final limit {h['resolution_angstrom'][-1]:.1f} Å, "
          f"angular step {h['angular_step_deg'][-1]:g} deg{refined}, {time.perf_counter() - t_start:.1f} s; wrote "
          f"{', '.join(written)} in {folder}")
    print(f"note: the hand of an ab initio map is undetermined (its mirror image fits the particles equally well); "
          f"check it against known chirality (e.g. alpha helices) and rerun with{'out' if args.flip_hand else ''} "
          f"--flip-hand for the other one. Continue with: jaxcryo refine {star_out} --reference {args.out} "
          f"--local --initial-lowpass {max(20.0, h['resolution_angstrom'][-1]):.0f}"
          + (f" --symmetry {args.symmetry}" if args.symmetry != "C1" else "") + " --out MAP.mrc")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from jaxcryo.reconstruct import METHODS
    from jaxcryo.forward.slicing import INTERPOLATIONS

    parser = argparse.ArgumentParser(
        prog="jaxcryo", formatter_class=_Formatter,
        description="Cryo-EM reconstruction with known poses by preconditioned SGD (JAX).\n\n"
                    "Reads RELION 3.0/3.1 particle STAR files with MRC stacks; writes MRC maps, half-maps,\n"
                    "FSC curves and plots. Run 'jaxcryo COMMAND --help' for each command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pos_int, pos_float = _positive(int), _positive(float)

    demo = sub.add_parser("demo", help="simulate a synthetic molecule, reconstruct with sgd and psgd, compare",
                          formatter_class=_Formatter)
    demo.add_argument("--out", default="demo_out", help="output folder")
    demo.add_argument("--box", type=int, default=64, help="box size (pixels)")
    demo.add_argument("--pixel-size", type=float, default=1.5, help="pixel size (Angstrom)")
    demo.add_argument("--n-images", type=int, default=5000, help="number of particles")
    demo.add_argument("--snr", type=float, default=0.2, help="signal-to-noise ratio (variance)")
    demo.add_argument("--prior", choices=("truth", "none"), default="truth",
                      help="shared per-shell prior: the simulation's own MAP prior (known signal spectrum and "
                           "noise), or none (lam only: the optimum then fits noise)")
    demo.add_argument("--epochs", type=int, default=10, help="passes over the data")
    demo.add_argument("--batch-size", type=int, default=128, help="images per step")
    demo.add_argument("--lam", type=float, default=1e-4, help="Tikhonov weight")
    demo.add_argument("--interpolation", choices=("nearest", "trilinear"), default="nearest",
                      help="slicing of the reconstruction (nearest: the paper's setting, where diag(H) is H)")
    demo.add_argument("--simulate-with", choices=("nearest", "trilinear", "nufft"), default=None,
                      help="slicing used to simulate the images (default: the reconstruction's)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--wiener-after", type=int, default=0, metavar="E",
                      help="epochs before the half-map FSC sets a Wiener prior per shell (0: never; each method "
                           "then sets its own prior, so their losses stop being one objective)")
    demo.set_defaults(func=_demo)

    sim = sub.add_parser(
        "simulate", formatter_class=_Formatter, help="simulate a RELION 3.1 particle set with known poses",
        description="Project a map at uniformly random poses, apply a random CTF (300 kV, Cs 2.7 mm,\n"
                    "defocus 1-2.5 um, AC 0.1) and random shifts (up to 3 px), add white noise, and write\n"
                    "DIR/particles.star (RELION 3.1), DIR/particles.cs (the same particles, cryoSPARC-style),\n"
                    "DIR/particles.mrcs and DIR/truth.mrc.")
    sim.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    sim.add_argument("--volume", metavar="MAP.mrc", default=None,
                     help="map to project; its box and voxel size replace --box and --pixel-size "
                          "(default: the built-in synthetic molecule)")
    sim.add_argument("--n-images", type=pos_int, default=1000, metavar="N", help="number of particles")
    sim.add_argument("--box", type=_positive(int), default=64, metavar="B",
                     help="box size of the synthetic molecule (pixels)")
    sim.add_argument("--pixel-size", type=pos_float, default=2.0, metavar="A",
                     help="pixel size of the synthetic molecule, or of a --volume whose header has none (Angstrom)")
    sim.add_argument("--snr", type=pos_float, default=0.1, metavar="S",
                     help="signal-to-noise ratio: variance of the clean images over that of the noise")
    sim.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    sim.add_argument("--quiet", action="store_true", help="print nothing but errors and notes")
    sim.set_defaults(func=_simulate)

    proj = sub.add_parser(
        "project", formatter_class=_Formatter, help="noise-free projections of a map at a STAR file's poses",
        description="Project MAP at each particle's pose, with its shift (rlnOriginX/YAngst) and CTF,\n"
                    "as 'relion_project --ctf' does (same sign conventions; image scale differs by a constant).")
    proj.add_argument("map", metavar="MAP.mrc", help="map to project (its box must match the STAR's rlnImageSize)")
    proj.add_argument("--star", required=True, metavar="POSES.star",
                      help="RELION particle STAR file with rlnAngleRot/Tilt/Psi, shifts and CTF (or a cryoSPARC .cs)")
    proj.add_argument("--out", required=True, metavar="PROJ.mrcs", help="output image stack")
    proj.add_argument("--no-ctf", action="store_true", help="do not apply the CTF")
    proj.add_argument("--interpolation", choices=("auto",) + INTERPOLATIONS, default="auto",
                      help="Fourier slicing; auto: nufft (exact) on CPU, trilinear on GPU/TPU")
    proj.add_argument("--quiet", action="store_true", help="print nothing but errors and notes")
    proj.set_defaults(func=_project)

    rec = sub.add_parser(
        "reconstruct", formatter_class=_Formatter, help="reconstruct a map from particles with known poses",
        description="Reconstruct a map from a RELION particle STAR file with known poses (rlnAngleRot/Tilt/Psi,\n"
                    "rlnOriginX/YAngst, CTF) by preconditioned stochastic gradients, as two independent\n"
                    "half-sets. Writes MAP.mrc (mean of the halves), MAP_half1.mrc, MAP_half2.mrc,\n"
                    "MAP_fsc.png and history.json beside MAP (missing folders are created), and a checkpoint\n"
                    "MAP.ckpt.npz after every epoch: rerunning the same command (or --resume) continues a\n"
                    "killed run; it is removed after a successful run unless --keep-checkpoint.")
    rec.add_argument("star", metavar="PARTICLES.star", help="RELION 3.0 or 3.1 particle STAR file with poses, "
                     "or a cryoSPARC particles .cs file (alignments3D poses)")
    rec.add_argument("--datadir", default=None, metavar="DIR",
                     help="folder holding the particle stacks of a .cs file, when its blob/path does not resolve")
    rec.add_argument("--out", required=True, metavar="MAP.mrc", help="output map")
    rec.add_argument("--method", choices=METHODS, default=None,
                     help="normal (default in memory: accumulate the normal equations in one pass, solve by "
                          "conjugate gradients; --epochs is ignored), or an optimizer: psgd (Hutchinson-"
                          "preconditioned SGD; the default when streaming or with several processes), psgd-exact "
                          "(exact diagonal), sgd, adam; all but adam use an Armijo line search (c 0.9, initial step "
                          "10) and end each epoch at the mean of its iterates")
    rec.add_argument("--epochs", type=pos_int, default=6, metavar="E",
                     help="passes over the data (see README for the measurement behind the default)")
    rec.add_argument("--wiener-after", type=int, default=2, metavar="E",
                     help="after E epochs, add a Wiener prior per Fourier shell estimated from the half-maps' "
                          "FSC (RELION-style gold-standard regularisation; 0: never; ignored with --no-halves)")
    rec.add_argument("--noise-model", choices=("estimate", "white"), default="estimate",
                     help="estimate: noise power per Fourier shell and optics group from the residuals (after "
                          "epoch 1, refreshed every epoch), each pixel weighted by 1/sigma^2; white: equal weights")
    rec.add_argument("--batch-size", type=pos_int, default=128, metavar="B", help="images per step")
    rec.add_argument("--interpolation", choices=INTERPOLATIONS, default="trilinear",
                     help="Fourier slicing (nufft runs on CPU only)")
    rec.add_argument("--lam", type=float, default=1e-4, metavar="L", help="Tikhonov weight on ||v||^2")
    rec.add_argument("--symmetry", type=_symmetry, default="C1", metavar="SYM",
                     help="point group, RELION's notation and axes (as relion_reconstruct --sym): C1, Cn (n-fold "
                          "about z), Dn (n-fold about z, 2-fold about x), T, O, I (= I2), I1..I4; each image is "
                          "used at its pose composed with every group element")
    rec.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (half-sets, shuffles, probes)")
    rec.add_argument("--devices", type=pos_int, default=None, metavar="N",
                     help="spread the particles over N local devices (GPUs; default: all of them)")
    rec.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="several processes (hosts): process 0's address; with --num-processes and "
                          "--process-id. Under SLURM (srun, one task per node) all three come from the "
                          "environment. Each process reads only its share of the particles; process 0 writes")
    rec.add_argument("--num-processes", type=pos_int, default=None, metavar="N", help="processes in all")
    rec.add_argument("--process-id", type=int, default=None, metavar="I", help="this process, 0 .. N-1")
    rec.add_argument("--no-halves", action="store_true",
                     help="one reconstruction from all particles (no half-maps, no FSC)")
    rec.add_argument("--resume", action="store_true",
                     help="continue from MAP.ckpt.npz; an error if it is missing or was made with other settings "
                          "(without --resume, a matching checkpoint is used anyway)")
    rec.add_argument("--keep-checkpoint", action="store_true",
                     help="keep MAP.ckpt.npz after a successful run (to extend it later with a larger --epochs); "
                          "by default it is removed once the maps are written")
    rec.add_argument("--max-memory-gb", type=pos_float, default=None, metavar="GB",
                     help="refuse to start when the run needs more memory than this (GiB; default: 80%% of "
                          "the memory available at start)")
    rec.add_argument("--chunk-size", type=pos_int, default=None, metavar="N",
                     help="images read and Fourier transformed at a time (and, when streaming, swept at a time; "
                          "default 4096, or when streaming the largest power of two up to 4096 that fits "
                          "--max-memory-gb)")
    rec.add_argument("--stream", action="store_true",
                     help="read the particles from disk chunk by chunk every epoch instead of holding them in "
                          "memory (chosen automatically when they do not fit under --max-memory-gb)")
    rec.add_argument("--quiet", action="store_true", help="no progress bars; print only the summary line")
    rec.set_defaults(func=_reconstruct)

    ref = sub.add_parser(
        "refine", formatter_class=_Formatter, help="gold-standard 3-D refinement with unknown poses",
        description="Refine a map and every particle's pose from a starting reference (RELION 3D auto-refine's\n"
                    "job): two independent half-sets, each scored against its own half-map over rotations x\n"
                    "shifts (a global search, then local searches at finer steps as the resolution improves),\n"
                    "the map updated by preconditioned SGD on the top poses with their posterior weights.\n"
                    "Writes MAP.mrc, MAP_half1/2.mrc, MAP_fsc.png, history.json and MAP_particles.star (the\n"
                    "input rows with refined poses, rlnRandomSubset and rlnMaxValueProbDistribution), and a\n"
                    "checkpoint MAP.ckpt.npz after every epoch. Stops by itself when resolution and poses settle.")
    ref.add_argument("star", metavar="PARTICLES.star", help="RELION 3.0 or 3.1 particle STAR file (poses ignored "
                                                            "unless --local)")
    ref.add_argument("--reference", required=True, metavar="REF.mrc",
                     help="starting map (another box or voxel size is resampled in Fourier space)")
    ref.add_argument("--out", required=True, metavar="MAP.mrc", help="output map")
    ref.add_argument("--initial-lowpass", type=pos_float, default=40.0, metavar="A",
                     help="low-pass the reference to this resolution first (Angstrom), as RELION does, so that "
                          "its high-resolution detail cannot bias the poses")
    ref.add_argument("--diameter", type=pos_float, default=None, metavar="A",
                     help="soft spherical solvent mask diameter (Angstrom; default: the box less 6 px), applied "
                          "to the half-maps between epochs (the maps written are unmasked, as RELION's)")
    ref.add_argument("--mask", default=None, metavar="MASK.mrc",
                     help="solvent mask (values 0..1) instead of the sphere")
    ref.add_argument("--symmetry", type=_symmetry, default="C1", metavar="SYM",
                     help="point group of the map (RELION symbols: C1, C4, D2, T, O, I, ...)")
    ref.add_argument("--local", action="store_true",
                     help="start from the STAR's poses (local searches only) instead of a global search")
    ref.add_argument("--epochs", type=pos_int, default=12, metavar="E", help="at most this many epochs")
    ref.add_argument("--global-order", type=_nonneg_int, default=2, metavar="K",
                     help="HEALPix order of the global search (2: 15 deg, 4608 rotations; 3: 7.5 deg, 36864)")
    ref.add_argument("--top-k", type=pos_int, default=4, metavar="K", help="poses kept per image per step")
    ref.add_argument("--temperature", type=pos_float, default=1.0, metavar="T",
                     help="posterior temperature (> 1 spreads the weight over more poses)")
    ref.add_argument("--method", choices=[m for m in METHODS if m != "normal"], default="psgd",
                    help="optimizer of the volume step")
    ref.add_argument("--batch-size", type=pos_int, default=128, metavar="B", help="images per step")
    ref.add_argument("--interpolation", choices=("nearest", "trilinear"), default="trilinear",
                     help="Fourier slicing")
    ref.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (half-sets, shuffles, probes)")
    ref.add_argument("--resume", action="store_true",
                     help="continue from MAP.ckpt.npz; an error if it is missing or was made with other settings")
    ref.add_argument("--max-memory-gb", type=pos_float, default=None, metavar="GB",
                     help="refuse to start when the run needs more memory than this (GiB)")
    ref.add_argument("--chunk-size", type=pos_int, default=4096, metavar="N",
                     help="images read at a time (streamed: images per block)")
    ref.add_argument("--stream", action="store_true",
                     help="read the particles from disk in blocks every pass instead of holding them in memory "
                          "(automatic when they do not fit under --max-memory-gb but the blocks do); the final "
                          "solve reads them once more (twice with a coloured noise model)")
    ref.add_argument("--keep-checkpoint", action="store_true",
                     help="keep MAP.ckpt.npz after a successful run (to extend it later with a larger --epochs)")
    ref.add_argument("--datadir", default=None, metavar="DIR",
                     help="folder holding the particle stacks of a .cs file, when its blob/path does not resolve")
    ref.add_argument("--quiet", action="store_true", help="no progress bars; print only the summary line")
    ref.set_defaults(func=_refine)

    ab = sub.add_parser(
        "abinitio", formatter_class=_Formatter, help="a starting map from particles alone (no poses, no reference)",
        description="Ab initio reconstruction (cryoSPARC's ab initio / RELION's SGD initial model): from a\n"
                    "featureless start, each minibatch is scored over a global SO(3) x shift grid at a low\n"
                    "frequency limit, poses are drawn from the posterior at an adaptive temperature (about 1%\n"
                    "of poses carry weight early on), and the map takes a preconditioned SGD step on the\n"
                    "expected loss; the limit marches from --start-resolution to --final-resolution with\n"
                    "growing minibatches. Then (--refine-epochs) a gold-standard refine from that map places\n"
                    "the particles the SGD left at wrong poses and sharpens the rest. Writes INIT.mrc,\n"
                    "INIT_particles.star (poses found), history.json and a checkpoint INIT.ckpt.npz after\n"
                    "every SGD epoch. The hand of the map is undetermined:\n"
                    "--flip-hand writes the mirror image. Continue with 'jaxcryo refine --reference INIT.mrc'.")
    ab.add_argument("star", metavar="PARTICLES.star", help="RELION 3.0 or 3.1 particle STAR file (poses ignored)")
    ab.add_argument("--out", required=True, metavar="INIT.mrc", help="output map")
    ab.add_argument("--diameter", type=pos_float, default=None, metavar="A",
                    help="particle diameter (Angstrom; default 0.7 of the box): the start and the solvent mask")
    ab.add_argument("--symmetry", type=_symmetry, default="C1", metavar="SYM",
                    help="point group of the map (RELION symbols: C1, C4, D2, T, O, I, ...)")
    ab.add_argument("--classes", type=pos_int, default=1, metavar="K", help="number of classes (1 only for now)")
    ab.add_argument("--flip-hand", action="store_true", help="write the mirror image of the map (and its poses)")
    ab.add_argument("--epochs", type=pos_int, default=8, metavar="E",
                    help="passes over the particles with global pose searches")
    ab.add_argument("--local-epochs", type=_nonneg_int, default=4, metavar="E",
                    help="then passes with local searches about each particle's best pose (steps halving)")
    ab.add_argument("--cycles", type=pos_int, default=2, metavar="C",
                    help="with C > 1: one more global pass, then the local passes again, C - 1 times")
    ab.add_argument("--refine-epochs", type=_nonneg_int, default=12, metavar="E",
                    help="then refine the poses and the map from the ab initio map: at most E epochs of "
                         "'jaxcryo refine' (gold-standard; a 15 deg global search from the map's 40 A low-pass, "
                         "then local searches; it stops by itself); 0: keep the SGD map and its poses")
    ab.add_argument("--start-resolution", type=pos_float, default=35.0, metavar="A",
                    help="first frequency limit (Angstrom)")
    ab.add_argument("--final-resolution", type=pos_float, default=None, metavar="A",
                    help="last frequency limit (Angstrom; default max(12, 2.5 pixels))")
    ab.add_argument("--batch-size", type=pos_int, default=64, metavar="B", help="first minibatch size")
    ab.add_argument("--max-batch-size", type=pos_int, default=256, metavar="B", help="last minibatch size")
    ab.add_argument("--max-shift", type=pos_float, default=None, metavar="PX",
                    help="shift search radius in pixels (default: a tenth of the box, 3 to box/6 px)")
    ab.add_argument("--method", choices=[m for m in METHODS if m != "normal"], default="psgd-exact",
                    help="optimizer of the volume step (psgd-exact: the exact posterior-weighted diagonal "
                         "preconditioner, best at low SNR in our measurements; psgd: its Hutchinson estimate)")
    ab.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (start, shuffles, pose draws)")
    ab.add_argument("--resume", action="store_true",
                    help="continue from INIT.ckpt.npz; an error if it is missing or was made with other settings")
    ab.add_argument("--max-memory-gb", type=pos_float, default=None, metavar="GB",
                    help="refuse to start when the run needs more memory than this (GiB)")
    ab.add_argument("--chunk-size", type=pos_int, default=4096, metavar="N", help="images read at a time")
    ab.add_argument("--keep-checkpoint", action="store_true", help="keep INIT.ckpt.npz after a successful run")
    ab.add_argument("--datadir", default=None, metavar="DIR",
                    help="folder holding the particle stacks of a .cs file, when its blob/path does not resolve")
    ab.add_argument("--quiet", action="store_true", help="no progress bars; print only the summary lines")
    ab.set_defaults(func=_abinitio)

    fsc = sub.add_parser("fsc", formatter_class=_Formatter, help="Fourier shell correlation of two maps",
                         description="FSC between two maps per Fourier shell, the resolution at FSC 0.5 and "
                                     "0.143, and a plot.")
    fsc.add_argument("map_a", metavar="A.mrc", help="first map")
    fsc.add_argument("map_b", metavar="B.mrc", help="second map (same box)")
    fsc.add_argument("--pixel-size", type=pos_float, default=None, metavar="A",
                     help="voxel size (Angstrom; default: A.mrc's header)")
    fsc.add_argument("--plot", default="fsc.png", metavar="PNG", help="plot to write ('' for none)")
    fsc.add_argument("--json", default=None, metavar="JSON", help="also write the curve and resolutions as JSON")
    fsc.add_argument("--quiet", action="store_true", help="print only the resolution line")
    fsc.set_defaults(func=_fsc)

    _add_condition(sub)
    return parser


def _add_condition(sub) -> None:
    """The `condition` subcommand, from jaxcryo.conditioning when that module is present."""
    try:
        from jaxcryo.conditioning import add_condition_command
    except ImportError:
        return
    add_condition_command(sub)


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's kill, `timeout`): raised in the main thread so every output
    being written is cleaned up (atomic writes remove their temporary) before the process exits."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    """Run a parsed command: every failure is one line on stderr and an exit status."""
    from jaxcryo.io import InputError

    try:
        return int(args.func(args) or 0)
    except Terminated:
        print(f"jaxcryo {args.command}: terminated (SIGTERM); no partial output left", file=sys.stderr)
        return 128 + 15
    except InputError as err:
        print(f"jaxcryo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcryo {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"jaxcryo {args.command}: error: out of memory (see --max-memory-gb, --chunk-size)", file=sys.stderr)
        return 1
    except OSError as err:
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"jaxcryo {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except Exception as err:  # a malformed input no check foresaw, or a bug: still one line, no traceback
        if os.environ.get("JAXCRYO_DEBUG"):
            raise
        print(f"jaxcryo {args.command}: error: {type(err).__name__}: {err} "
              "(set JAXCRYO_DEBUG=1 to see where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
