"""`jaxcryo refine` against `relion_refine --auto_refine` on particles RELION simulated.

The particles: poses, CTFs and shifts drawn by ``jaxcryo simulate`` (uniform rotations, defocus
1-2.5 um, shifts up to 3 px), images made by ``relion_project --ctf --add_noise --white_noise``
from the map, with the noise set for the requested SNR (variance of the noise-free images over
that of the noise). The reference: the map low-passed to 40 A by ``relion_image_handler``.
Both programs get the same STAR file (its poses are ignored: RELION's first iterations and
jaxcryo's default are global searches) and the same reference; RELION runs as its GUI writes
a 3D auto-refine job (MPI: 1 leader + 2 followers, --j 1, healpix 2 -> local at 4, offsets
5 px in 1 px steps, --firstiter_cc, --low_resol_join_halves 40, --norm --scale).

Measured for each: wall time and CPU time (the CPU may be shared: the load average is
recorded), FSC of the final map to the truth (mean over shells 1 .. N/2-2, and over the upper
half of them), resolution where that FSC falls below 0.5, and the median angular error of the
refined poses to the truth (no alignment: the reference fixes the frame).

    python benchmarks/refine_vs_relion.py --volume /path/emd_1832.map --n-images 2000 \\
        --work /tmp/refine_vs_relion --out benchmarks/results/refine_vs_relion_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from _common import cpu_model, load_average  # noqa: E402


def _run(cmd, cwd=None, env=None, log=None) -> tuple[float, float]:
    """Run a command to completion; (wall seconds, CPU seconds of it and its children)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as fh:
        out = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        tail = open(log).read()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{tail}")
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _star_rows(path):
    import starfile

    blocks = starfile.read(path, always_dict=True)
    return blocks["particles"] if "particles" in blocks else list(blocks.values())[-1]


def pose_errors(refined_star, truth_star, pixel_size):
    """Per particle: angle (deg) between refined and true rotations, shift error (A)."""
    from jaxcryo.geometry import euler_to_matrix

    a, t = _star_rows(refined_star), _star_rows(truth_star)
    where = {int(str(name).split("@")[0]): i for i, name in enumerate(t["rlnImageName"])}
    idx = np.array([where[int(str(name).split("@")[0])] for name in a["rlnImageName"]])

    def mats(rows):
        e = np.stack([np.asarray(rows[c], np.float64) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], -1)
        return np.asarray(euler_to_matrix(e), np.float64)

    def origins(rows):
        if "rlnOriginXAngst" in rows:
            return np.stack([np.asarray(rows["rlnOriginXAngst"], float), np.asarray(rows["rlnOriginYAngst"], float)], -1)
        return pixel_size * np.stack([np.asarray(rows["rlnOriginX"], float), np.asarray(rows["rlnOriginY"], float)], -1)

    ra, rt = mats(a), mats(t)[idx]
    cos = (np.einsum("nij,nij->n", ra, rt) - 1.0) / 2.0
    angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    shift = np.linalg.norm(origins(a) - origins(t)[idx], axis=-1)
    return angle, shift


def map_quality(path, truth) -> dict:
    from jaxcryo.fsc import fsc, resolution
    from jaxcryo.io import read_map

    vol, px = read_map(path)
    curve = np.asarray(fsc(np.asarray(vol, np.float64), truth))
    n = truth.shape[0]
    return {"fsc_to_truth_mean": float(curve[1:n // 2 - 1].mean()),
            "fsc_to_truth_high_shells": float(curve[n // 4:n // 2 - 1].mean()),
            "resolution_fsc05_to_truth_angstrom": float(resolution(curve, float(px), 0.5)),
            "fsc_to_truth": curve.tolist()}


def simulate(args, work, env):
    """particles.star/.mrcs (relion_project with noise), truth.mrc, ref.mrc (40 A low-pass)."""
    parts = os.path.join(work, "particles.star")
    if os.path.exists(parts):
        return parts
    sim = os.path.join(work, "sim")
    _run([sys.executable, "-m", "jaxcryo.cli", "simulate", "--volume", args.volume, "--n-images", str(args.n_images),
          "--snr", "1", "--seed", str(args.seed), "--out", sim, "--quiet"], env=env)
    from jaxcryo.io import read_map

    truth, px = read_map(os.path.join(sim, "truth.mrc"))
    _run(["relion_project", "--i", os.path.join(sim, "truth.mrc"), "--ang", os.path.join(sim, "particles.star"),
          "--ctf", "--angpix", str(px), "--o", os.path.join(work, "clean")], cwd=work)
    import mrcfile

    with mrcfile.open(os.path.join(work, "clean.mrcs"), permissive=True) as fh:
        signal = float(np.asarray(fh.data, np.float64).var(axis=(1, 2)).mean())
    sigma = float(np.sqrt(signal / args.snr))
    _run(["relion_project", "--i", os.path.join(sim, "truth.mrc"), "--ang", os.path.join(sim, "particles.star"),
          "--ctf", "--angpix", str(px), "--add_noise", "--white_noise", f"{sigma:.6f}",
          "--o", os.path.join(work, "particles")], cwd=work)
    _run(["relion_image_handler", "--i", os.path.join(sim, "truth.mrc"), "--o", os.path.join(work, "ref.mrc"),
          "--lowpass", str(args.initial_lowpass), "--angpix", str(px)], cwd=work)
    for name in ("clean.mrcs", "clean.star"):
        os.remove(os.path.join(work, name))
    with open(os.path.join(work, "simulation.json"), "w") as fh:
        json.dump({"signal_variance": signal, "noise_sigma": sigma, "snr": args.snr, "pixel_size": float(px)}, fh)
    return parts


def _relion_iterations(folder):
    """A relion_refine output folder's run_itNNN_data.star files, in order (at least one)."""
    import glob

    its = sorted(glob.glob(os.path.join(folder, "run_it[0-9][0-9][0-9]_data.star")))
    if not its:
        raise SystemExit(f"{folder}: no run_itNNN_data.star")
    return its


def score_relion_folder(folder, record):
    """Score a relion_refine output folder: the final run_class001.mrc / run_data.star when
    there, else the latest iteration's half-maps (their mean) and data.star; the wall time is
    taken from the files' modification times (iteration 0 to the one scored)."""
    import mrcfile

    its = _relion_iterations(folder)
    t0 = os.path.getmtime(its[0])
    final_map, final_star = os.path.join(folder, "run_class001.mrc"), os.path.join(folder, "run_data.star")
    if os.path.exists(final_map) and os.path.exists(final_star):
        name, map_path, star, t1 = "relion_refine --auto_refine", final_map, final_star, os.path.getmtime(final_star)
    else:
        star = its[-1]
        it = os.path.basename(star)[6:9]
        halves = [os.path.join(folder, f"run_it{it}_half{h}_class001.mrc") for h in (1, 2)]
        with mrcfile.open(halves[0], permissive=True) as a, mrcfile.open(halves[1], permissive=True) as b:
            mean = (np.asarray(a.data, np.float32) + np.asarray(b.data, np.float32)) / 2
            voxel = float(a.voxel_size.x)
        map_path = os.path.join(folder, f"mean_it{it}.mrc")
        with mrcfile.new(map_path, overwrite=True) as out:
            out.set_data(mean)
            out.voxel_size = voxel
        name, t1 = f"relion_refine --auto_refine (unfinished: iteration {int(it)})", os.path.getmtime(star)
    record(name, t1 - t0, None, None, None, map_path, star, f"scored from {folder}")


def relion_map_at_poses(star, work, name, subsets=None) -> str:
    """RELION's own map at the poses of ``star`` (image names relative to ``work``), as auto-refine's
    last iteration makes it: each half-set reconstructed (``relion_reconstruct --ctf``), their
    FSC, then the whole set with the Wiener prior (tau2) from that FSC (``--fsc``). The halves
    are the STAR's rlnRandomSubset, or ``subsets`` (n,) of 1 and 2. Returns the map's path."""
    import starfile

    from jaxcryo.fsc import fsc
    from jaxcryo.io import read_map

    folder = os.path.join(work, "relion_at_poses", name)
    os.makedirs(folder, exist_ok=True)
    blocks = starfile.read(star, always_dict=True)
    rows = _star_rows(star).copy()
    if subsets is not None:
        rows["rlnRandomSubset"] = np.asarray(subsets, int)
    if "rlnRandomSubset" not in rows:
        raise SystemExit(f"{star}: no rlnRandomSubset and no half-sets given")
    rows["rlnImageName"] = [f"{i.split('@')[0]}@{os.path.join(work, i.split('@')[1])}" for i in rows["rlnImageName"]]
    staged = os.path.join(folder, "poses.star")
    starfile.write({**{k: v for k, v in blocks.items() if k != "particles"}, "particles": rows}, staged,
                   overwrite=True)
    halves = [os.path.join(folder, f"half{h}.mrc") for h in (1, 2)]
    for h, path in zip((1, 2), halves):
        _run(["relion_reconstruct", "--i", staged, "--o", path, "--ctf", "--subset", str(h)], cwd=folder)
    curve = np.asarray(fsc(*(np.asarray(read_map(p)[0], np.float64) for p in halves)))
    with open(os.path.join(folder, "fsc.star"), "w") as fh:
        fh.write("data_fsc\n\nloop_\n_rlnSpectralIndex #1\n_rlnGoldStandardFsc #2\n")
        fh.writelines(f"{i} {v:.6f}\n" for i, v in enumerate(curve))
    out = os.path.join(folder, "map.mrc")
    _run(["relion_reconstruct", "--i", staged, "--o", out, "--ctf", "--fsc", os.path.join(folder, "fsc.star")],
         cwd=folder)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume", default="/work/shared/data/emd_1832.map")
    ap.add_argument("--n-images", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--initial-lowpass", type=float, default=40.0)
    ap.add_argument("--diameter", type=float, default=None, help="RELION's --particle_diameter (A; default the box)")
    ap.add_argument("--work", default="/tmp/refine_vs_relion")
    ap.add_argument("--skip-relion", action="store_true", help="do not run RELION (reuse its figures from --out)")
    ap.add_argument("--relion-from", default=None, metavar="DIR",
                    help="score an existing (possibly unfinished) relion_refine output folder instead of running "
                         "it: its final map and data.star, or its latest iteration's")
    ap.add_argument("--skip-jaxcryo", action="store_true", help="do not run jaxcryo (score RELION only)")
    ap.add_argument("--jaxcryo-args", default="", help="extra arguments for jaxcryo refine (default: none)")
    ap.add_argument("--tag", default="default", help="name of this jaxcryo run in the JSON")
    ap.add_argument("--relion-at-poses", action="store_true",
                    help="also make RELION's own map (relion_reconstruct, halves then --fsc) at the true poses "
                         "and at each jaxcryo run's refined poses: what RELION's final map could reach with "
                         "perfect poses, and with jaxcryo's")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "refine_vs_relion_cpu.json"))
    args = ap.parse_args(argv)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    parts = simulate(args, work, env)
    truth_star = os.path.join(work, "sim", "particles.star")
    from jaxcryo.io import read_map

    truth, px = read_map(os.path.join(work, "sim", "truth.mrc"))
    truth = np.asarray(truth, np.float64)
    box = truth.shape[0]
    diameter = args.diameter or box * float(px)

    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            previous = json.load(fh)
    result = {"benchmark": "refine_vs_relion", "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
              "data": {"volume": os.path.basename(args.volume), "n_images": args.n_images, "box": box,
                       "pixel_size": float(px), "snr": args.snr, "initial_lowpass": args.initial_lowpass,
                       "simulated_by": "relion_project --ctf --add_noise --white_noise"},
              "runs": dict(previous.get("runs", {}))}
    for key in ("relion_reconstruct_at_poses", "relion_reconstruct_at_poses_note"):  # kept unless remade
        if key in previous:
            result[key] = previous[key]

    def record(name, wall, cpu, load0, load1, map_path, star_path, command):
        angle, shift = pose_errors(star_path, truth_star, float(px))
        run = {"command": command, "wall_seconds": wall, "cpu_seconds": cpu, "load_before": load0, "load_after": load1,
               "median_angle_error_deg": float(np.median(angle)), "mean_angle_error_deg": float(angle.mean()),
               "fraction_within_5deg": float((angle < 5).mean()), "median_shift_error_angstrom": float(np.median(shift))}
        run.update(map_quality(map_path, truth))
        result["runs"][name] = run
        print(name, {k: v for k, v in run.items() if k != "fsc_to_truth"}, flush=True)

    relion = shutil.which("relion_refine_mpi")
    if args.relion_from:
        score_relion_folder(args.relion_from, record)
    elif relion and not args.skip_relion:
        out = os.path.join(work, "relion")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi",
               "--o", os.path.join(out, "run"), "--auto_refine", "--split_random_halves", "--i", parts,
               "--ref", os.path.join(work, "ref.mrc"), "--firstiter_cc", "--ini_high", str(args.initial_lowpass),
               "--dont_combine_weights_via_disc", "--pool", "3", "--pad", "2", "--ctf",
               "--particle_diameter", f"{diameter:g}", "--flatten_solvent", "--zero_mask", "--oversampling", "1",
               "--healpix_order", "2", "--auto_local_healpix_order", "4", "--offset_range", "5", "--offset_step", "2",
               "--sym", "C1", "--low_resol_join_halves", "40", "--norm", "--scale", "--j", "1"]
        load0 = load_average()
        wall, cpu = _run(cmd, cwd=work, log=os.path.join(work, "relion.log"))
        record("relion_refine --auto_refine", wall, cpu, load0, load_average(), os.path.join(out, "run_class001.mrc"),
               os.path.join(out, "run_data.star"), " ".join(cmd))

    if not args.skip_jaxcryo:
        run_jaxcryo(args, work, parts, env, record, result)
    if args.relion_at_poses:
        bounds = result.setdefault("relion_reconstruct_at_poses", {})
        n = len(_star_rows(parts))
        path = relion_map_at_poses(parts, work, "true", subsets=1 + np.arange(n) % 2)
        bounds["true poses (halves: odd/even images)"] = map_quality(path, truth)
        if args.relion_from:  # the poses of the RELION run scored (its final or latest iteration), its halves
            final = os.path.join(args.relion_from, "run_data.star")
            star = final if os.path.exists(final) else _relion_iterations(args.relion_from)[-1]
            path = relion_map_at_poses(star, work, "relion_" + os.path.basename(star)[:-10])
            bounds[f"poses of RELION's {os.path.basename(star)} (its halves, full size)"] = map_quality(path, truth)
        for name in sorted(result["runs"]):
            star = os.path.join(work, f"jaxcryo_{name.removeprefix('jaxcryo refine ')}", "map_particles.star")
            if name.startswith("jaxcryo refine") and os.path.exists(star):
                path = relion_map_at_poses(star, work, name.removeprefix("jaxcryo refine ").replace(" ", "_"))
                bounds[f"poses of {name} (its halves)"] = map_quality(path, truth)
        for k, v in bounds.items():
            print("relion_reconstruct at", k, {q: round(x, 4) for q, x in v.items() if q != "fsc_to_truth"}, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


def run_jaxcryo(args, work, parts, env, record, result):
    """``jaxcryo refine`` with its defaults (plus ``--jaxcryo-args``) on the same particles and reference."""
    out = os.path.join(work, f"jaxcryo_{args.tag}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "jaxcryo.cli", "refine", parts, "--reference", os.path.join(work, "ref.mrc"),
           "--out", os.path.join(out, "map.mrc"), "--quiet"] + shlex.split(args.jaxcryo_args)
    load0 = load_average()
    wall, cpu = _run(cmd, env=env, log=os.path.join(work, f"jaxcryo_{args.tag}.log"))
    record(f"jaxcryo refine {args.tag}", wall, cpu, load0, load_average(), os.path.join(out, "map.mrc"),
           os.path.join(out, "map_particles.star"), " ".join(["jaxcryo"] + cmd[3:]))
    with open(os.path.join(out, "history.json")) as fh:
        hist = json.load(fh)
    result["runs"][f"jaxcryo refine {args.tag}"]["epochs"] = {
        k: hist.get(k) for k in ("resolution_angstrom", "angular_step_deg", "mean_pose_change_deg", "mode", "seconds")}


if __name__ == "__main__":
    sys.exit(main())
