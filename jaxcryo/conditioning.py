"""Conditioning of the reconstruction Hessian as a function of resolution (the paper's Sec. 3).

For nearest-neighbour slicing the Hessian of the objective is diagonal: voxel k's entry counts
(CTF^2-weighted) the image pixels that land on it. Its condition number over the ball of
Fourier radius R therefore grows with R, and is bounded below by

    kappa(R) >= (N + lam) / (N p(R) + lam),    p(R) = #voxels in the central disk / #voxels in the ball,

because the origin is hit by all N images while the average voxel in the ball is hit by N p of
them; p(R) is about 3 / (4R), so kappa grows like 4R/3.

Units. Every kappa here is that of the Hessian with respect to the Hermitian Fourier volume
(each voxel and its Friedel mate one unknown), normalised per image: the origin's entry is
1 + lam_image. jaxcryo's half-volume parameters see a diagonal that differs from it by constant
factors (4 per generic voxel; the stored kx = 0 plane keeps both mates, each with half the hits):
:func:`full_spectrum_diagonal` converts. ``lam_image = lam / 2`` for jaxcryo's Tikhonov weight.

Library functions are numpy in, numpy out at the edges; the passes over particles are jitted
once per call. ``add_condition_command`` / ``run_condition`` implement
``jaxcryo condition PARTICLES.star``.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.curvature import exact_diagonal, radial_profile, rademacher
from jaxcryo.forward.ctf import CTFParams, make_ctf_params
from jaxcryo.forward.model import Particles
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.geometry import euler_to_matrix, half_volume_weights, random_rotations, shell_index
from jaxcryo.io.errors import InputError
from jaxcryo.loss import Problem, sum_over_batches, value_grad_hvp

# --------------------------------------------------------------------------- the bound


def disk_ball_ratio(r_max: int):
    """p(R) = voxels in the central disk / voxels in the ball, counted on the integer grid.

    A voxel or pixel belongs to radius R when round(|k|) <= R (jaxcryo's shell convention).
    Returns (radii, p_counted, p_approx) for R = 0 .. r_max, p_approx = 3 / (4R) (1 at R = 0).
    """
    radii = np.arange(r_max + 1)
    k = np.arange(-r_max - 1, r_max + 2)
    r2 = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    r3 = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    disk = np.cumsum(np.bincount(shell_index(r2).ravel(), minlength=r_max + 3)[: r_max + 1])
    ball = np.cumsum(np.bincount(shell_index(r3).ravel(), minlength=r_max + 3)[: r_max + 1])
    p = disk / ball
    approx = np.where(radii > 0, 3.0 / (4.0 * np.maximum(radii, 1)), 1.0)
    return radii, p, approx


def kappa_lower_bound(p, *, n_images: float = 1.0, lam: float = 0.0):
    """The paper's bound (N + lam) / (N p + lam), elementwise in p (lam in the same units as N)."""
    p = np.asarray(p, np.float64)
    return (n_images + lam) / (n_images * p + lam)


def theoretical_bound(r_max: int, *, lam: float = 0.0, approx: bool = False):
    """Lower bound on kappa(R), R = 0 .. r_max, for jaxcryo's per-image normalisation.

    Args:
      r_max: largest Fourier radius (pixels).
      lam: jaxcryo's Tikhonov weight (the loss's ``lam``); it enters as lam_image = lam / 2.
      approx: use p = 3 / (4R) instead of counting voxels.
    """
    _, p, p_approx = disk_ball_ratio(r_max)
    return kappa_lower_bound(p_approx if approx else p, n_images=1.0, lam=lam / 2.0)


# --------------------------------------------------------------------------- diagonals


def full_spectrum_diagonal(diag, box: int, lam: float = 0.0):
    """jaxcryo's parameter diagonal (N, N, H[, 2]) -> the Hermitian-volume diagonal (N, N, H).

    Off the kx = 0 (and Nyquist) planes a stored voxel stands for itself and its mate: its
    data entry is 4 x (hits per image). On those planes both mates are stored and split the
    hits, so their entries are summed: D(k) = (d_k + d_-k) / 4 there, d_k / 4 elsewhere.
    The Tikhonov part 2 lam m_k / 2 of each parameter (m_k its multiplicity, see
    ``Problem.regularizer``) becomes lam / 2 everywhere (pass ``lam``).
    """
    d = np.asarray(diag, np.float64)
    if d.ndim == 4:
        d = d[..., 0]
    d = d - lam * half_volume_weights(box)
    out = d / 4.0
    planes = [0] + ([box // 2] if box % 2 == 0 else [])
    for x in planes:
        plane = d[:, :, x]
        mate = np.roll(np.flip(plane, (0, 1)), 1, axis=(0, 1))
        out[:, :, x] = (plane + mate) / 4.0
    return out + lam / 2.0


def pose_particles(rotations, ctf: CTFParams | None = None, dtype=jnp.float32) -> Particles:
    """A data-free particle set (poses and CTF only): enough for the Hessian, which does not
    depend on the images. ``data`` is an empty (n, 0, 2) placeholder."""
    rotations = jnp.asarray(rotations, dtype)
    n = rotations.shape[0]
    if ctf is not None:
        ctf = jax.tree.map(lambda x: jnp.asarray(x, dtype), ctf)
    return Particles(data=jnp.zeros((n, 0, 2), dtype), rotations=rotations, ctf=ctf,
                     weight=jnp.ones(n, dtype))


def uniform_particles(n: int, *, seed: int = 0, with_ctf: bool = False, pixel_size_angstrom: float = 2.0,
                      defocus_range_angstrom=(10000.0, 25000.0)) -> Particles:
    """n uniformly random poses (and random defoci if ``with_ctf``), without images."""
    rotations = random_rotations(jax.random.PRNGKey(seed), n)
    ctf = None
    if with_ctf:
        rng = np.random.default_rng(seed)
        ctf = make_ctf_params(n, pixel_size_angstrom=pixel_size_angstrom,
                              defocus_u_angstrom=rng.uniform(*defocus_range_angstrom, n), amplitude_contrast=0.1)
    return pose_particles(rotations, ctf)


def exact_hessian_diagonal(particles: Particles, problem: Problem, batch_size: int = 256):
    """Exact diag(H) of the full-data objective in jaxcryo's parameters, (N, N, H, 2), numpy.

    Nearest: the Hessian is diagonal, so this is all of it. Trilinear: back-projected squared
    weights (the diagonal only). Not available for nufft (use :func:`hutchinson_hessian_diagonal`).
    """
    fn = jax.jit(lambda p: exact_diagonal(p, problem, batch_size, p.rotations.dtype))
    return np.asarray(fn(particles))


def make_full_hvp(particles: Particles, problem: Problem, batch_size: int = 256):
    """z -> H z for the full-data objective, for k probes at once: (k, N, N, H, 2) -> same.

    H does not depend on the images, so the residual is taken at zero data (one forward and
    one adjoint pass over all particles for all k probes together).
    """
    n = particles.weight.shape[0]
    total_w = jnp.maximum(jnp.sum(particles.weight), 1e-12)
    meta = particles._replace(data=jnp.zeros((n, 0, 2), particles.rotations.dtype))
    p0 = problem.data_only()

    def hvps(z):
        zero = jnp.zeros(z.shape[1:], z.dtype)

        def one(b):
            b = b._replace(data=jnp.zeros((b.weight.shape[0], problem.grid.n_pixels, 2), z.dtype))
            _, _, hz = value_grad_hvp(zero, b, p0, z)
            return (jnp.sum(b.weight) / total_w) * hz

        return sum_over_batches(one, meta, batch_size, jnp.zeros_like(z)) + 2.0 * problem.regularizer(z.dtype) * z

    return hvps


def hutchinson_hessian_diagonal(particles: Particles, problem: Problem, key, n_probes: int, *,
                                chunk: int = 4, batch_size: int = 256):
    """Hutchinson samples z * Hz of the full-data Hessian, (n_probes, N, N, H, 2), numpy.

    Their running mean over the first j samples is the estimate after j probes.
    """
    hvps = jax.jit(make_full_hvp(particles, problem, batch_size))
    like = problem.zeros(particles.rotations.dtype)
    out = []
    for start in range(0, n_probes, chunk):
        k = min(chunk, n_probes - start)
        z = rademacher(jax.random.fold_in(key, start), like, k)
        out.append(np.asarray(z * hvps(z)))
    return np.concatenate(out, 0)


def relative_error_by_probes(samples, exact, probe_counts=None):
    """||mean of first j samples - exact|| / ||exact|| for each j in ``probe_counts``."""
    samples = np.asarray(samples, np.float64)
    exact = np.asarray(exact, np.float64)
    counts = probe_counts or [j for j in (1, 2, 4, 8, 16, 32, 64, 128, 256) if j <= samples.shape[0]]
    csum = np.cumsum(samples, 0)
    norm = np.linalg.norm(exact)
    return counts, [float(np.linalg.norm(csum[j - 1] / j - exact) / norm) for j in counts]


# --------------------------------------------------------------------------- kappa


def _last_shell(box: int) -> int:
    """Default largest R reported: N//2 - 2, the last shell that the default disk
    |p| <= N//2 - 1 covers whole (shell R holds round(|k|) = R, i.e. |k| < R + 1/2)."""
    return box // 2 - 2


def kappa_by_radius(diag, box: int, r_max: int | None = None, lam: float = 0.0):
    """kappa(R) = max / min of the Hermitian-volume diagonal over the ball round(|k|) <= R.

    ``diag`` is jaxcryo's parameter diagonal (N, N, H[, 2]); R = 0 .. r_max (default N//2 - 2).
    For nearest slicing (any CTF) this is the exact condition number of H on that ball.
    ``lam``: the Tikhonov weight included in ``diag`` (see :func:`full_spectrum_diagonal`).
    """
    d = full_spectrum_diagonal(diag, box, lam)
    r_max = _last_shell(box) if r_max is None else r_max
    hi = np.fmax.accumulate(radial_profile(d, box, "max"))
    lo = np.fmin.accumulate(radial_profile(d, box, "min"))
    with np.errstate(divide="ignore", invalid="ignore"):  # shells past the disk may be empty
        return (hi / lo)[: r_max + 1]


def shell_statistics(diag, box: int, r_max: int | None = None, lam: float = 0.0):
    """Per-shell mean, min, max of the Hermitian-volume diagonal, R = 0 .. r_max."""
    d = full_spectrum_diagonal(diag, box, lam)
    r_max = _last_shell(box) if r_max is None else r_max
    return {k: radial_profile(d, box, k)[: r_max + 1] for k in ("mean", "min", "max")}


def diag_cross_section(diag, box: int, direction=(1.0, 0.0, 0.0), r_max: int | None = None, lam: float = 0.0):
    """diag along a ray from the origin: values at the voxels nearest to t * direction.

    Args:
      diag: parameter diagonal (N, N, H[, 2]) (converted to the Hermitian-volume diagonal).
      direction: (x, y, z) of the ray; t = 0, 1, .., r_max Fourier pixels.
    Returns:
      (t, values) arrays.
    """
    d = full_spectrum_diagonal(diag, box, lam)
    r_max = _last_shell(box) if r_max is None else r_max
    u = np.asarray(direction, np.float64)
    u = u / np.linalg.norm(u)
    t = np.arange(r_max + 1)
    q = np.rint(t[:, None] * u[None, :]).astype(int)
    q = np.where((q[:, :1] < 0), -q, q)  # Friedel mate into the stored half (kx >= 0)
    return t, d[q[:, 2] % box, q[:, 1] % box, q[:, 0]]


def brute_force_hits(rotations, box: int, disk_radius: int | None = None, ctf_squared=None):
    """Independent reference: count nearest-neighbour plane hits on a full (N, N, N) grid.

    Every pixel of the full 2-D disk |p| <= disk_radius (default N//2 - 1; both halves, no symmetry used) is rotated
    (A.T p), rounded, and counted, optionally weighted by its CTF^2 (n, P_full). Returns the
    hits per image as a full centred volume indexed [z, y, x] with the origin at N//2.
    """
    rot = np.asarray(rotations, np.float64)
    disk_radius = box // 2 - 1 if disk_radius is None else disk_radius
    c = np.arange(-box // 2, box - box // 2)
    px, py = np.meshgrid(c, c, indexing="xy")
    keep = px ** 2 + py ** 2 <= disk_radius ** 2
    pts = np.stack([px[keep], py[keep]], -1).astype(np.float64)  # (P, 2) as (kx, ky)
    counts = np.zeros((box, box, box))
    for i in range(rot.shape[0]):
        q = np.rint(pts @ rot[i, :2, :]).astype(int) + box // 2  # (P, 3) (x, y, z)
        ok = np.all((q >= 0) & (q < box), axis=1)
        w = np.ones(len(pts)) if ctf_squared is None else np.asarray(ctf_squared[i])
        np.add.at(counts, (q[ok, 2], q[ok, 1], q[ok, 0]), w[ok])
    return counts / rot.shape[0]


def kappa_from_hits(hits, box: int, r_max: int | None = None, lam_image: float = 0.0):
    """kappa(R) from a full centred (N, N, N) volume of hits per image (e.g. brute_force_hits)."""
    r_max = _last_shell(box) if r_max is None else r_max
    c = np.arange(-box // 2, box - box // 2)
    shells = shell_index(np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2))
    h = hits + lam_image
    out = []
    for r in range(r_max + 1):
        sel = h[shells <= r]
        out.append(sel.max() / sel.min())
    return np.asarray(out)


def preconditioned_spread(diag, estimate, box: int, *, alpha: float = 0.0, r_max: int | None = None):
    """Spread of diag(P H) with P = 1 / max(|estimate|, alpha), in jaxcryo's parameters.

    Returns (per-shell max/min of diag(P H), kappa of diag(P H) over the ball of radius R),
    each for R = 0 .. r_max. With the exact diagonal as the estimate both are 1 (bar alpha).
    """
    d = np.asarray(diag, np.float64)[..., 0]
    e = np.maximum(np.abs(np.asarray(estimate, np.float64)[..., 0]), alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        ph = d / e
    r_max = _last_shell(box) if r_max is None else r_max
    hi, lo = radial_profile(ph, box, "max"), radial_profile(ph, box, "min")
    with np.errstate(divide="ignore", invalid="ignore"):  # shells past the disk may be empty
        spread = (hi / lo)[: r_max + 1]
        kappa = (np.fmax.accumulate(hi) / np.fmin.accumulate(lo))[: r_max + 1]
    return spread, kappa


def percentile_spread(diag, estimate, box: int, *, alpha: float = 0.0, r_max: int | None = None,
                      q: float = 5.0):
    """A robust per-shell spread of diag(P H): its (100 - q)th over its qth percentile in each shell.

    max / min is an extreme statistic that a noisy estimate never brings near 1; this one shows
    how much of the spread a preconditioner removes from the bulk of each shell.
    """
    from jaxcryo.geometry import volume_radius
    d = np.asarray(diag, np.float64)[..., 0]
    e = np.maximum(np.abs(np.asarray(estimate, np.float64)[..., 0]), alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        ph = (d / e).ravel()
    shells = shell_index(volume_radius(box)).ravel()
    r_max = _last_shell(box) if r_max is None else r_max
    out = []
    for r in range(r_max + 1):
        lo, hi = np.percentile(ph[shells == r], [q, 100.0 - q])
        out.append(hi / lo if lo > 0 else np.inf)
    return np.asarray(out)


def raw_spread(diag, box: int, r_max: int | None = None):
    """Per-shell max/min of the unpreconditioned parameter diagonal (the reference for the gain)."""
    return preconditioned_spread(diag, np.ones_like(np.asarray(diag)), box, r_max=r_max)[0]


# --------------------------------------------------------------------------- one report


def conditioning_report(particles: Particles, box: int, *, interpolation: str = "nearest", lam: float = 0.0,
                        r_max: int | None = None, n_probes: int = 0, seed: int = 0, alpha: float | None = None,
                        batch_size: int = 256) -> dict:
    """Everything about one pose set's Hessian, as JSON-ready lists (R = 0 .. r_max).

    ``r_max`` is the grid's disk radius (default N//2 - 1); shells are reported up to r_max - 1.
    Keys: radius, kappa (exact diagonal), bound_counted, bound_approx, shell_mean/min/max,
    spread_raw, spread_exact (max/min of diag(PH) per shell, exact P), kappa_after_exact,
    spread90_raw (95th/5th percentile per shell), cross_section; with ``n_probes`` > 0 also
    kappa_hutchinson, spread_hutchinson, spread90_hutchinson, kappa_after_hutchinson (kappa of
    diag(PH) over the ball) and hutchinson_error
    (relative error of the diagonal against the exact one as probes accumulate).
    """
    from jaxcryo.geometry import default_alpha
    grid = FourierGrid(box, r_max)
    r_max = grid.radius - 1  # the last shell the disk covers whole
    problem = Problem(grid=grid, interpolation=interpolation, lam=lam)
    alpha = default_alpha(box, grid.radius) if alpha is None else alpha
    diag = exact_hessian_diagonal(particles, problem, batch_size)
    stats = shell_statistics(diag, box, r_max, lam)
    t, cross = diag_cross_section(diag, box, r_max=r_max, lam=lam)
    spread_exact, kappa_exact_pre = preconditioned_spread(diag, diag, box, alpha=alpha, r_max=r_max)
    out = {
        "box": box, "r_max": r_max, "interpolation": interpolation, "lam": lam,
        "n_images": int(particles.weight.shape[0]), "with_ctf": particles.ctf is not None, "alpha": alpha,
        "radius": list(range(r_max + 1)),
        "kappa": kappa_by_radius(diag, box, r_max, lam).tolist(),
        "bound_counted": theoretical_bound(r_max, lam=lam).tolist(),
        "bound_approx": theoretical_bound(r_max, lam=lam, approx=True).tolist(),
        "shell_mean": stats["mean"].tolist(), "shell_min": stats["min"].tolist(), "shell_max": stats["max"].tolist(),
        "spread_raw": raw_spread(diag, box, r_max).tolist(),
        "spread_exact": spread_exact.tolist(), "kappa_after_exact": kappa_exact_pre.tolist(),
        "cross_section": cross.tolist(),
        "spread90_raw": percentile_spread(diag, np.ones_like(diag), box, r_max=r_max).tolist(),
    }
    if n_probes > 0:
        samples = hutchinson_hessian_diagonal(particles, problem, jax.random.PRNGKey(seed), n_probes,
                                              batch_size=batch_size)
        est = samples.mean(0)
        spread_h, kappa_h = preconditioned_spread(diag, est, box, alpha=alpha, r_max=r_max)
        counts, errs = relative_error_by_probes(samples, diag)
        floor = lam * half_volume_weights(box)[..., None] + 1e-30  # the Tikhonov part of each parameter
        out.update({
            "n_probes": n_probes,
            "kappa_hutchinson": kappa_by_radius(np.maximum(np.abs(est), floor), box, r_max, lam).tolist(),
            "spread_hutchinson": spread_h.tolist(), "kappa_after_hutchinson": kappa_h.tolist(),
            "spread90_hutchinson": percentile_spread(diag, est, box, alpha=alpha, r_max=r_max).tolist(),
            "hutchinson_error": {"probes": counts, "relative_error": errs},
        })
    return out


def plot_reports(reports: dict, path: str | None = None, title: str = ""):
    """Plot kappa(R) of each named report with the bound, a cross-section of diag(H) and the
    per-shell spreads; save a PNG at ``path`` if given. Returns the matplotlib Figure (built
    without pyplot, so it works headless and leaves a notebook's backend alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    first = next(iter(reports.values()))
    r = np.asarray(first["radius"])
    for name, rep in reports.items():
        axes[0].semilogy(rep["radius"], rep["kappa"], label=f"{name}")
        if "kappa_hutchinson" in rep:
            axes[0].semilogy(rep["radius"], rep["kappa_hutchinson"], "--", label=f"{name} (Hutchinson)")
    axes[0].semilogy(r, first["bound_counted"], "k:", label="bound (counted p)")
    axes[0].semilogy(r, first["bound_approx"], "k-.", lw=0.8, label="bound, p = 3/(4R)")
    axes[0].set(xlabel="Fourier radius R (pixels)", ylabel="kappa over the ball |k| <= R", title="condition number")
    axes[0].legend(fontsize=7)
    for name, rep in reports.items():
        axes[1].plot(range(len(rep["cross_section"])), rep["cross_section"], label=name)
    axes[1].set(xlabel="t (pixels along x)", ylabel="diag(H), hits per image", title="cross-section of diag(H)",
                yscale="log")
    axes[1].legend(fontsize=7)
    for name, rep in reports.items():
        axes[2].semilogy(rep["radius"], rep["spread_raw"], label=f"{name}: H")
        axes[2].semilogy(rep["radius"], rep["spread_exact"], ":", label=f"{name}: P_exact H")
        if "spread_hutchinson" in rep:
            axes[2].semilogy(rep["radius"], rep["spread_hutchinson"], "--", label=f"{name}: P_hutch H")
    axes[2].set(xlabel="shell R", ylabel="max / min of diag within the shell", title="per-shell spread")
    axes[2].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=90)
    return fig


# --------------------------------------------------------------------------- command line


def add_condition_command(subparsers):
    """Register ``condition``: kappa per shell for a STAR file's poses (and CTF)."""
    p = subparsers.add_parser(
        "condition", help="condition number of the reconstruction Hessian per Fourier shell",
        description="Print kappa(R) of the reconstruction Hessian for the poses (and CTF) of a particle "
                    "STAR file, with the theoretical lower bound, and write a PNG plot and JSON. "
                    "Images are not read: the Hessian depends only on poses and CTF.")
    p.add_argument("particles", help="particle STAR file with rlnAngleRot/Tilt/Psi, or cryoSPARC .cs file")
    p.add_argument("--box", type=int, default=None,
                   help="box size in pixels (default: the optics rlnImageSize); a smaller box than the "
                        "images' is a Fourier crop (pixel size scaled accordingly)")
    p.add_argument("--interpolation", choices=("nearest", "trilinear"), default="nearest")
    p.add_argument("--lam", type=float, default=0.0, help="Tikhonov weight (jaxcryo's loss units)")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF columns")
    p.add_argument("--probes", type=int, default=0, help="also estimate the diagonal with this many Hutchinson probes")
    p.add_argument("--max-particles", type=int, default=None, help="use a random subset of this many particles")
    p.add_argument("--out", default="condition_out", help="output folder for condition.json and condition.png")
    p.set_defaults(func=run_condition)
    return p


def particles_from_table(table, box: int | None = None, *, with_ctf: bool = True):
    """A data-free Particles (poses, CTF) from a :class:`jaxcryo.io.ParticleTable`; returns (particles, box)."""
    star_box = int(table.box_size[0]) if len(table) and table.box_size[0] > 0 else None
    if box is None:
        if star_box is None:
            raise InputError(f"{table.star_path}: no rlnImageSize in the optics table; pass --box")
        box = star_box
    pixel = np.asarray(table.pixel_size_angstrom, np.float64)
    if star_box is not None and star_box != box:
        pixel = pixel * star_box / box  # Fourier crop: same spatial frequencies, coarser pixels
    rotations = np.asarray(euler_to_matrix(np.asarray(table.euler_deg, np.float64)))
    ctf = None
    if with_ctf and table.has_ctf:
        ctf = CTFParams(defocus_u_angstrom=table.defocus_u_angstrom, defocus_v_angstrom=table.defocus_v_angstrom,
                        defocus_angle_deg=table.defocus_angle_deg, voltage_kv=table.voltage_kv, cs_mm=table.cs_mm,
                        amplitude_contrast=table.amplitude_contrast, phase_shift_deg=table.phase_shift_deg,
                        bfactor_angstrom2=table.ctf_bfactor, pixel_size_angstrom=pixel)
        ctf = CTFParams(*(np.asarray(f, np.float32) for f in ctf))
    return pose_particles(rotations, ctf), box


def run_condition(args) -> int:
    """``jaxcryo condition``: read poses, compute kappa per shell, print it, write JSON and PNG."""
    from jaxcryo.io import check_output_path, make_output_folder
    from jaxcryo.pipeline import read_table
    from jaxcryo.io.errors import atomic_output

    check_output_path(args.out, folder=True)
    for option, value, least in (("--box", args.box, 4), ("--probes", args.probes, 0),
                                 ("--max-particles", args.max_particles, 1)):
        if value is not None and value < least:
            raise InputError(f"{option} must be at least {least}, got {value}")
    # Poses and CTF only (the Hessian needs no images): pose-only STAR files are fine.
    table = read_table(args.particles, require_poses=True, require_images=False)
    for note in table.notes:
        print(f"jaxcryo condition: note: {note}", file=sys.stderr)
    if args.max_particles and len(table) > args.max_particles:
        pick = np.sort(np.random.default_rng(0).choice(len(table), args.max_particles, replace=False))
        table = table.subset(pick)
    particles, box = particles_from_table(table, args.box, with_ctf=not args.no_ctf)
    report = conditioning_report(particles, box, interpolation=args.interpolation, lam=args.lam,
                                 n_probes=args.probes)
    report["star"] = os.path.abspath(args.particles)
    make_output_folder(args.out, folder=True)
    json_path = os.path.join(args.out, "condition.json")
    png_path = os.path.join(args.out, "condition.png")
    with atomic_output(json_path) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    label = f"{os.path.basename(args.particles)} ({'CTF' if report['with_ctf'] else 'no CTF'})"
    plot_reports({label: report}, png_path,
                 title=f"{len(table)} particles, box {box}, {args.interpolation}")
    print(f"{len(table)} particles, box {box}, {args.interpolation}, "
          f"{'with' if report['with_ctf'] else 'without'} CTF, lam {args.lam:g}")
    head = f"{'R':>4} {'kappa(<=R)':>12} {'bound':>9} {'shell spread':>13} {'diag mean':>10}"
    print(head)
    for r in report["radius"]:
        print(f"{r:>4d} {report['kappa'][r]:>12.4g} {report['bound_counted'][r]:>9.3g} "
              f"{report['spread_raw'][r]:>13.4g} {report['shell_mean'][r]:>10.4g}")
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return 0
