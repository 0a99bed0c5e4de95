"""The pose stage: scores of images against projections as dense products, posteriors over
poses, and the grids of a coarse-to-fine search (global SO(3) x shifts, then local).

Every function here is pure; the ``score_*`` functions are jit-able with ``grid``, ``r_limit``,
``interpolation`` and ``chunk`` static (they fix shapes). Coarse-to-fine is a schedule around
them (the refine driver), not inside them.

The score of image y_b against pose (R, t) is the Gaussian log-likelihood

    s(b, R, t) = -1/2 sum_{p : |k_p| <= r_limit} w_bp |y_bp - c_bp (A_R v)_p exp(2 pi i k_p.t / N)|^2

over the half-plane pixels of the image, with w the full per-pixel weight (Hermitian
multiplicity times 1/sigma^2: :attr:`jaxcryo.loss.Problem.pixel_weights`), c the CTF and A_R
the central slice. With w = multiplicity / sigma^2 this is exactly the real-space Gaussian
log-likelihood of white noise of variance sigma^2 (up to a constant that does not depend on
the pose), because jaxcryo's Fourier normalisation preserves sums of squares. It is computed as

    -1/2 (||y||_w^2 - 2 Re <c w y conj(phase_t), A_R v> + <c^2 w, |A_R v|^2>)

so that all poses are scored by two matrix products per chunk of rotations: the shifted
images (B*S, 2P') times the projections (2P', M_chunk), and the weighted squared CTF (B, P')
times the projections' power (P', M_chunk). P' is the number of pixels with |k| <= r_limit.

Shift convention (the same as :func:`jaxcryo.forward.model.render` and
:func:`~jaxcryo.forward.model.prepare_particles`): ``data`` are the particles' Fourier pairs
as stored in :class:`~jaxcryo.forward.model.Particles`, i.e. already translated back by the
shift t0 they were prepared with (t0 = rlnOriginX/YAngst / pixel size). A score at shift t
compares them with the projection translated by -t; the particle's refined origin is
**t0 + t** (pixels; times the pixel size for rlnOriginX/YAngst).

Slicing here reads a centred full Fourier cube of edge D = 2 (ceil(r_limit) + 1) + 1 built
once per call from the half volume (one base index per pixel, constant corner offsets, no
fold; eight fused gathers); it equals :func:`jaxcryo.forward.model.slices` (tested) and is several
times faster on CPU.

Memory (float32, 4 bytes per number) of :func:`score_poses` with B images, S shifts, M
rotations, P' pixels and chunk size C = min(chunk, M):

    4 bytes * ( 2 B S P'             shifted, CTF- and noise-weighted images (kept for the whole scan)
              + 3 C P' + 16 Cb P'    one chunk's slices and their power; one block's coordinates
              + B S C                one chunk's cross term
              + 2 B S M              all scores and their (B, M, S) transpose
              + 2 D^3 )              the cube

with Cb = C on accelerators and min(C, 2^17 / P') on CPU, where slices are computed in blocks
that stay in cache. So it grows like B*S*(P' + M) and, through the chunk, like C*P'. Example:
B = 128, S = 13, M = 36864 (7.5 degrees), r_limit = 32 (P' ~ 1600), C = 4096 on a GPU:
21 MB + 500 MB + 27 MB + 490 MB; the scores themselves dominate at large M, which
:func:`search_top_k` avoids (it keeps each image's best k). :func:`score_local` holds, per
chunk of Bc = max(1, chunk // L) images, 3 Bc L P' + 16 Cb P' + 4 Bc S P' + Bc L S numbers
(Cb = Bc L on accelerators), and 2 B L S for its output. :func:`memory_bytes` evaluates this.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward.ctf import complex_multiply, conj_multiply, shift_phase
from jaxcryo.forward.model import slices
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.geometry import euler_to_matrix


# ----------------------------------------------------------------------------- grids

def healpix_directions(nside: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the 12 nside^2 HEALPix pixels (RING ordering), as (theta, phi) in radians.

    Gorski et al. (2005), eqs. 4-9: north cap rings i = 1..nside-1 with 4i pixels, the
    equatorial belt rings nside..3 nside with 4 nside pixels (alternately offset by half a
    pixel), and the south cap mirroring the north. Every pixel has the same area.
    """
    n = int(nside)
    if n < 1:
        raise ValueError(f"nside must be >= 1, got {nside}")
    npix = 12 * n * n
    ncap = 2 * n * (n - 1)
    p = np.arange(npix, dtype=np.int64)
    z = np.empty(npix)
    phi = np.empty(npix)

    north = p < ncap
    i = np.floor((1 + np.sqrt(1 + 2 * p[north])) / 2).astype(np.int64)
    j = p[north] - 2 * i * (i - 1) + 1
    z[north] = 1 - i * i / (3.0 * n * n)
    phi[north] = np.pi / (2 * i) * (j - 0.5)

    belt = (p >= ncap) & (p < npix - ncap)
    q = p[belt] - ncap
    i = q // (4 * n) + n
    j = q % (4 * n) + 1
    s = (i - n + 1) % 2
    z[belt] = 4.0 / 3.0 - 2.0 * i / (3.0 * n)
    phi[belt] = np.pi / (2 * n) * (j - s / 2.0)

    south = p >= npix - ncap
    q = npix - p[south]
    i = np.floor((1 + np.sqrt(2 * q - 1)) / 2).astype(np.int64)
    j = 4 * i + 1 - (q - 2 * i * (i - 1))
    z[south] = -1 + i * i / (3.0 * n * n)
    phi[south] = np.pi / (2 * i) * (j - 0.5)
    return np.arccos(np.clip(z, -1.0, 1.0)), phi


def angular_step_deg(order: int) -> float:
    """Angular sampling of :func:`so3_grid` at HEALPix ``order``: 360 / (6 * 2**order) degrees.

    RELION's convention (its ``--healpix_order``): order 0: 60, 1: 30, 2: 15, 3: 7.5, 4: 3.75.
    (RELION's "7.5 degrees" initial sampling is order 2 plus one order of oversampling, which
    evaluates order 3.)
    """
    return 360.0 / (6 * 2 ** int(order))


def so3_grid(order: int, dtype=np.float32) -> np.ndarray:
    """Near-uniform rotations: HEALPix directions times in-plane angles, as RELION samples.

    Directions are the 12 * nside^2 HEALPix pixel centres at nside = 2**order (rot = phi,
    tilt = theta), each combined with 6 * nside in-plane angles psi = 0, step, 2 step, ...
    (step = :func:`angular_step_deg`), so both sample at the same angular step.

    Returns (M, 3, 3) RELION matrices (:func:`jaxcryo.geometry.euler_to_matrix`), M =
    72 * 8**order (order 0: 72, 1: 576, 2: 4608 at 15 deg, 3: 36864 at 7.5 deg). Index
    m = direction * n_psi + psi index.
    """
    order = int(order)
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    nside = 2 ** order
    theta, phi = healpix_directions(nside)
    psi = np.arange(6 * nside) * np.deg2rad(angular_step_deg(order))
    rot = np.repeat(phi, psi.size)
    tilt = np.repeat(theta, psi.size)
    psis = np.tile(psi, phi.size)
    euler = np.rad2deg(np.stack([rot, tilt, psis], -1))
    return np.asarray(euler_to_matrix(euler)).astype(dtype)


def asymmetric_unit(rotations, symmetry: str, margin_deg: float) -> np.ndarray:
    """Indices of the grid ``rotations`` (M, 3, 3) that a global search needs for a map with point
    group ``symmetry``: poses A and A g (g in the group) give the same projection of such a map,
    so one pose of each orbit suffices.

    The orbits' representatives are taken in the Dirichlet domain about the identity (A closer to
    I than to any other group element: d(A, I) <= d(A, g)); a grid point is kept when it lies
    within ``margin_deg`` of that domain: d(A, I) <= min_g d(A, g) + margin_deg. With the margin
    at twice the grid's covering radius (a point of SO(3) is within that radius of some grid
    point), every orbit keeps a grid point as close as the full grid's nearest one: the reduced
    grid covers SO(3)/G as the full grid covers SO(3), with about M / G points (plus the band).
    """
    from jaxcryo.symmetry import symmetry_matrices

    group = symmetry_matrices(symmetry)
    rotations = np.asarray(rotations, np.float64)
    if group.shape[0] == 1:
        return np.arange(rotations.shape[0])
    d = geodesic_distance_deg(rotations[:, None], group[None])  # (M, G): d(A, g), the identity first
    return np.flatnonzero(d[:, 0] <= d[:, 1:].min(axis=1) + float(margin_deg))


def global_grid(order: int, symmetry: str = "C1", dtype=np.float32) -> np.ndarray:
    """The rotations a global search scores: :func:`so3_grid` at ``order``, reduced to an
    asymmetric unit of ``symmetry`` by :func:`asymmetric_unit` with a margin of 1.8 steps (the
    grid's covering radius measures 0.83 of its step at order 1 and 0.88 at order 2, so every
    orbit keeps its nearest grid point). C1: the whole grid."""
    grid = so3_grid(order, dtype)
    return grid[asymmetric_unit(grid, symmetry, 1.8 * angular_step_deg(order))]


def shift_grid(max_px: float, step_px: float, dtype=np.float32) -> np.ndarray:
    """Shifts (S, 2) in pixels on a square lattice of ``step_px`` inside the disk |t| <= max_px.

    Sorted by radius (then angle), so index 0 is the zero shift. ``max_px = 0`` gives [[0, 0]].
    """
    if step_px <= 0:
        raise ValueError(f"step_px must be > 0, got {step_px}")
    if max_px < 0:
        raise ValueError(f"max_px must be >= 0, got {max_px}")
    n = int(np.floor(max_px / step_px + 1e-9))
    r = np.arange(-n, n + 1) * float(step_px)
    xx, yy = np.meshgrid(r, r, indexing="xy")
    pts = np.stack([xx.ravel(), yy.ravel()], -1)
    rad = np.hypot(pts[:, 0], pts[:, 1])
    keep = rad <= max_px * (1 + 1e-9) + 1e-12
    pts, rad = pts[keep], rad[keep]
    order = np.lexsort((np.arctan2(pts[:, 1], pts[:, 0]), np.round(rad, 9)))
    return pts[order].astype(dtype)


def axis_angle_to_matrix(omega):
    """Rotation vectors (..., 3) in radians -> matrices (..., 3, 3) (Rodrigues' formula; jnp)."""
    omega = jnp.asarray(omega)
    theta = jnp.linalg.norm(omega, axis=-1)[..., None, None]
    x, y, z = omega[..., 0], omega[..., 1], omega[..., 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack([jnp.stack([zero, -z, y], -1), jnp.stack([z, zero, -x], -1),
                   jnp.stack([-y, x, zero], -1)], -2)
    safe = jnp.where(theta > 0, theta, 1.0)
    a = jnp.where(theta > 0, jnp.sin(safe) / safe, 1.0)
    b = jnp.where(theta > 0, (1 - jnp.cos(safe)) / safe ** 2, 0.5)
    return jnp.eye(3, dtype=omega.dtype) + a * k + b * (k @ k)


def local_offsets(step_deg, n: int = 1, dtype=jnp.float32):
    """The (2n+1)^3 perturbations dR (L, 3, 3) of :func:`local_rotations`: rotation vectors
    on the cube step * {-n..n}^3 (radians from degrees); index L // 2 is the identity.
    Each is a rotation by at most sqrt(3) * n * step degrees. ``step_deg`` may be traced."""
    r = np.arange(-int(n), int(n) + 1, dtype=np.float64)
    cube = jnp.asarray(np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3), dtype)
    return axis_angle_to_matrix(cube * jnp.deg2rad(jnp.asarray(step_deg, dtype)))


def local_rotations(centers, step_deg, n: int = 1):
    """Candidate rotations (B, L, 3, 3) around each particle's pose, L = (2n+1)^3.

    Candidate l of particle b is ``centers[b] @ dR_l`` with dR_l from :func:`local_offsets`
    (a rotation vector on the cube step_deg * {-n..n}^3), so its geodesic distance to the
    centre is |omega_l| <= sqrt(3) n step_deg; index L // 2 is the centre itself.
    ``step_deg`` may be a traced scalar (changing it does not recompile); ``n`` is static.
    """
    centers = jnp.asarray(centers)
    return jnp.einsum("bij,ljk->blik", centers, local_offsets(step_deg, n, centers.dtype))


def local_shifts(centers, step_px, n: int = 1):
    """Candidate shifts (B, Ls, 2) in pixels on the square centres + step_px * {-n..n}^2,
    Ls = (2n+1)^2; index Ls // 2 is the centre itself. ``step_px`` may be traced."""
    centers = jnp.asarray(centers)
    r = np.arange(-int(n), int(n) + 1, dtype=np.float64)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    offs = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), centers.dtype) * jnp.asarray(step_px, centers.dtype)
    return centers[:, None, :] + offs[None]


def geodesic_distance_deg(a, b):
    """Rotation angle of a^T b in degrees, for matrices (..., 3, 3) broadcasting."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    tr = np.einsum("...ji,...ji->...", a, b)
    return np.rad2deg(np.arccos(np.clip((tr - 1) / 2, -1.0, 1.0)))


# ----------------------------------------------------------------------------- scores

class _PixelSet(NamedTuple):
    """The subset of a grid's pixels the slicing functions read: box and (P', 2) freqs."""

    box: int
    freqs: np.ndarray


def _centred_cube(volume_pairs, half_width: int):
    """The full Fourier transform on the cube -c..c (c = half_width), (D^3, 2) with D = 2c + 1,
    flat index ((z + c) D + y + c) D + x + c: stored voxels for x >= 0, conjugated mates
    V(-k) = conj V(k) for x < 0, the same voxels (and aliasing) that slicing.slice_stencil's
    fold reads. Requires c <= N/2."""
    n = volume_pairs.shape[0]
    k = np.arange(-half_width, half_width + 1)
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    mirror = x < 0
    sgn = np.where(mirror, -1, 1)
    flat = ((sgn * z) % n) * (n * (n // 2 + 1)) + ((sgn * y) % n) * (n // 2 + 1) + sgn * x
    rows = volume_pairs.reshape(-1, volume_pairs.shape[-1])[flat.ravel()]
    imag_sign = jnp.asarray(np.stack([np.ones(flat.size), sgn.ravel()], -1), volume_pairs.dtype)
    return rows * imag_sign


_CORNERS = np.stack(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"), -1).reshape(8, 3)  # (dx, dy, dz)


def _cube_slices(cube, half_width: int, rotations, freqs, interpolation: str):
    """Central slices (K, P', 2) at K rotations read from :func:`_centred_cube`; equal to
    ``forward.model.slices`` for |k| + 1 <= half_width (no fold, no bounds checks: one base
    index per pixel plus constant corner offsets). The eight corners are separate gathers
    summed in place, which XLA fuses (a (K, P', 8, 2) gather does not fit in cache)."""
    d = 2 * half_width + 1
    p = jnp.einsum("pi,kij->kpj", jnp.asarray(freqs, cube.dtype), rotations[:, :2, :])  # (K, P', 3) x, y, z
    strides = jnp.asarray([1, d, d * d], jnp.int32)
    if interpolation == "nearest":
        return cube[jnp.sum((jnp.round(p).astype(jnp.int32) + half_width) * strides, -1)]
    base = jnp.floor(p)
    frac = p - base
    index = jnp.sum((base.astype(jnp.int32) + half_width) * strides, -1)  # (K, P')
    out = jnp.zeros(index.shape + (cube.shape[-1],), cube.dtype)
    for dx, dy, dz in _CORNERS:
        weight = ((frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
                  * (frac[..., 2] if dz else 1 - frac[..., 2]))
        out = out + weight[..., None] * cube[index + int(dx + dy * d + dz * d * d)]
    return out


def _projector(volume_pairs, pix: _PixelSet, interpolation: str):
    """rotations (K, 3, 3) -> slices (K, P', 2) of the volume at the selected pixels.

    On CPU the rotations are taken in blocks of about 2^17 / P' under ``lax.map`` so that a
    block's coordinates and slices stay in cache (measured: 1024 rotations at once at box 64
    cost 5x more per rotation than blocks of 256); accelerators take all K at once.
    """
    half_width = int(np.ceil(np.linalg.norm(pix.freqs, axis=-1).max())) + 1
    if interpolation not in ("nearest", "trilinear") or half_width > pix.box // 2:
        return lambda r: slices(volume_pairs, r, pix, interpolation)
    cube = _centred_cube(volume_pairs, half_width)
    one = functools.partial(_cube_slices, cube, half_width, freqs=pix.freqs, interpolation=interpolation)
    block = max(8, 2 ** 17 // len(pix.freqs)) if jax.default_backend() == "cpu" else None

    def project(rotations):
        k = rotations.shape[0]
        if block is None or k <= block:
            return one(rotations)
        n = -(-k // block)
        padded = jnp.concatenate([rotations, jnp.broadcast_to(jnp.eye(3, dtype=rotations.dtype),
                                                              (n * block - k, 3, 3))])
        out = jax.lax.map(one, padded.reshape(n, block, 3, 3))
        return out.reshape((n * block,) + out.shape[2:])[:k]

    return project


def score_pixels(grid: FourierGrid, r_limit: float | None) -> np.ndarray:
    """Indices (P',) of the grid's pixels with |k| <= r_limit (all of them for None)."""
    radius = np.linalg.norm(grid.freqs, axis=-1)
    if r_limit is None:
        return np.arange(grid.n_pixels)
    idx = np.flatnonzero(radius <= float(r_limit) + 1e-9)
    if idx.size == 0:
        raise ValueError(f"r_limit={r_limit} selects no pixel")
    return idx


def _weights(grid: FourierGrid, pixel_weights, idx, n, dtype):
    """(n, P') weights from None (the multiplicity), (P,) or (n, P)."""
    w = grid.multiplicity if pixel_weights is None else pixel_weights
    w = jnp.asarray(w, dtype)
    if w.shape[-1] != grid.n_pixels:
        raise ValueError(f"pixel_weights has {w.shape[-1]} pixels, the grid has {grid.n_pixels}")
    return jnp.broadcast_to(w[..., idx], (n, idx.size))


def _ctf(ctf, idx, n, dtype):
    if ctf is None:
        return jnp.ones((n, idx.size), dtype)
    return jnp.asarray(ctf, dtype)[:, idx]


def _check(volume_pairs, data, grid, rotations, shifts, local=False):
    if tuple(volume_pairs.shape[:3]) != grid.volume_shape:
        raise ValueError(f"volume has shape {volume_pairs.shape}, the grid needs {grid.volume_shape} + (2,)")
    if data.ndim != 3 or data.shape[1] != grid.n_pixels:
        raise ValueError(f"data must be (B, {grid.n_pixels}, 2) for this grid, got {data.shape}")
    want = "(B, L, 3, 3)" if local else "(M, 3, 3)"
    rs, ts = np.shape(rotations), np.shape(shifts)
    if len(rs) != (4 if local else 3) or rs[-2:] != (3, 3) or (local and rs[0] != data.shape[0]):
        raise ValueError(f"rotations must be {want} with B = {data.shape[0]}, got {rs}")
    if len(ts) not in ((2, 3) if local else (2,)) or ts[-1] != 2 or (len(ts) == 3 and ts[0] != data.shape[0]):
        raise ValueError(f"shifts must be {'(B, S, 2) or ' if local else ''}(S, 2), got {ts}")


def _scored_pixels(volume_pairs, data, ctf, grid, pixel_weights, r_limit, interpolation):
    """What both searches score on: the pixels within ``r_limit`` (a _PixelSet), the projector of
    the volume onto them, and the images' values, weights and CTF there ((B, P', 2), (B, P'), (B, P'))."""
    idx = score_pixels(grid, r_limit)
    pix = _PixelSet(grid.box, grid.freqs[idx])
    b, dtype = data.shape[0], data.dtype
    return (pix, _projector(volume_pairs, pix, interpolation), data[:, idx, :],
            _weights(grid, pixel_weights, idx, b, dtype), _ctf(ctf, idx, b, dtype))


def _global_chunks(volume_pairs, data, ctf, rotations, shifts, grid, pixel_weights, r_limit, interpolation,
                   chunk, precision):
    """The scan of :func:`score_poses`: (one, rotation chunks, sizes), ``one(chunk (C, 3, 3))`` giving
    the chunk's scores (B, S, C); padding rotations (identity) fill the last chunk."""
    _check(volume_pairs, data, grid, rotations, shifts)
    dtype = data.dtype
    b = data.shape[0]
    m = rotations.shape[0]
    s = shifts.shape[0]
    pix, project, y, w, c = _scored_pixels(volume_pairs, data, ctf, grid, pixel_weights, r_limit, interpolation)
    p = y.shape[1]
    yy = jnp.sum(w[..., None] * y * y, axis=(1, 2))  # (B,)
    ramps = jax.vmap(lambda t: shift_phase(pix.freqs, t, grid.box))(jnp.asarray(shifts, dtype))  # (S, P', 2)
    # conj(phase_t) * y: the image translated by +t, weighted by c w
    lhs = conj_multiply(ramps[None], y[:, None]) * (c * w)[:, None, :, None]  # (B, S, P', 2)
    lhs = lhs.reshape(b * s, 2 * p)
    cw2 = c * c * w  # (B, P')

    size = int(min(chunk, m))
    n_chunks = -(-m // size)
    rot = jnp.asarray(rotations, dtype)
    pad = n_chunks * size - m
    if pad:
        rot = jnp.concatenate([rot, jnp.broadcast_to(jnp.eye(3, dtype=dtype), (pad, 3, 3))])
    rot = rot.reshape(n_chunks, size, 3, 3)

    def one(rc):
        a = project(rc)  # (C, P', 2)
        cross = jnp.matmul(lhs, a.reshape(size, 2 * p).T, precision=precision)  # (B*S, C)
        norm = jnp.matmul(cw2, jnp.sum(a * a, -1).T, precision=precision)  # (B, C)
        return -0.5 * (yy[:, None, None] - 2.0 * cross.reshape(b, s, size) + norm[:, None, :])

    return one, rot, (b, m, s, size)


def score_poses(volume_pairs, data, ctf, rotations, shifts, grid: FourierGrid, *, pixel_weights=None,
                r_limit: float | None = None, interpolation: str = "trilinear", chunk: int = 4096,
                precision=None):
    """Log-likelihoods (B, M, S) of B images against M rotations x S shifts (a global search).

    Args:
      volume_pairs: (N, N, N//2+1, 2) pair volume (one half-map).
      data: (B, P, 2) image pairs on ``grid`` as in Particles (translated back by their shift t0).
      ctf: (B, P) CTF values (e.g. ``forward.model.ctf_batch``), or None.
      rotations: (M, 3, 3) RELION matrices shared by all images (e.g. :func:`so3_grid`).
      shifts: (S, 2) additional shifts t in pixels (e.g. :func:`shift_grid`); the best pose's
        origin is t0 + t (see the module docstring).
      grid: the images' FourierGrid.
      pixel_weights: (P,) or (B, P) full per-pixel weights, multiplicity included
        (``Problem.pixel_weights``); None: the multiplicity (white noise, sigma = 1).
      r_limit: use only pixels with |k| <= r_limit (Fourier pixels); None: all of the grid's.
      interpolation: 'nearest', 'trilinear' or 'nufft' (as the volume was fitted).
      chunk: rotations per step of the scan (bounds memory: see the module docstring).
      precision: passed to the matrix products. JAX's default rounds float32 products to TF32
        on recent GPUs and bfloat16 on TPUs (relative 2^-11, 2^-9 per product); the errors add
        like a random walk, about 2^-11 sqrt(P') max|w c y a| in a score, usually far below the
        O(1) differences a posterior resolves. ``jax.lax.Precision.HIGHEST`` for exact scores
        (noise-free data, comparisons with the loop).
    Returns:
      (B, M, S) scores -1/2 sum_p w |y - c A_R v phase_t|^2 (including the ||y||^2 term, so a
      score equals minus half :func:`jaxcryo.loss.per_image_loss` at that pose).
    """
    one, rot, (b, m, s, size) = _global_chunks(volume_pairs, data, ctf, rotations, shifts, grid, pixel_weights,
                                               r_limit, interpolation, chunk, precision)
    n_chunks = rot.shape[0]
    out = jax.lax.map(one, rot)  # (n_chunks, B, S, C)
    out = jnp.transpose(out, (1, 0, 3, 2)).reshape(b, n_chunks * size, s)
    return out[:, :m]


def search_top_k(volume_pairs, data, ctf, rotations, shifts, grid: FourierGrid, *, k: int,
                 temperature: float = 1.0, pixel_weights=None, r_limit: float | None = None,
                 interpolation: str = "trilinear", chunk: int = 4096, precision=None):
    """:func:`top_k` of :func:`score_poses` without holding all B x M x S scores.

    Same arguments and result as ``top_k(score_poses(...), k, temperature)`` (idx_rot,
    idx_shift, weights, max_prob), but the scan over rotation chunks carries each image's best
    k scores and a running log-sum-exp, so memory is that of one chunk: 4 bytes x
    (2 B S P' + ~40 C P' + 3 B S C + 2 B k), independent of M (fine global grids: HEALPix
    order 3-4 at any batch size). ``k`` is static.
    """
    one, rot, (b, m, s, size) = _global_chunks(volume_pairs, data, ctf, rotations, shifts, grid, pixel_weights,
                                               r_limit, interpolation, chunk, precision)
    k = int(k)
    if not 1 <= k <= m * s:
        raise ValueError(f"k must be in 1..{m * s} (rotations x shifts), got {k}")
    dtype = data.dtype
    neg_inf = jnp.asarray(-jnp.inf, dtype)

    def body(carry, xs):
        vals, index, lse = carry
        start, rc = xs
        scores = jnp.transpose(one(rc), (0, 2, 1)) / temperature  # (B, C, S): (M, S) order, as top_k
        rot_index = start + jnp.arange(size)
        scores = jnp.where(rot_index[None, :, None] < m, scores, neg_inf)  # padding rotations
        flat_index = (rot_index[:, None] * s + jnp.arange(s)[None, :]).reshape(-1)  # (C*S,) index into (M, S)
        flat = scores.reshape(b, size * s)
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(flat, axis=-1))
        kk = min(k, s * size)
        v, i = jax.lax.top_k(flat, kk)
        both_vals = jnp.concatenate([vals, v], axis=1)
        both_index = jnp.concatenate([index, flat_index[i]], axis=1)
        # earlier chunks first, so ties keep the lower (M, S) index, as lax.top_k over all scores
        best, j = jax.lax.top_k(both_vals, k)
        return (best, jnp.take_along_axis(both_index, j, axis=1), lse), None

    init = (jnp.full((b, k), -jnp.inf, dtype), jnp.zeros((b, k), jnp.int32), jnp.full((b,), -jnp.inf, dtype))
    starts = jnp.arange(rot.shape[0], dtype=jnp.int32) * size
    (vals, index, lse), _ = jax.lax.scan(body, init, (starts, rot))
    weights = jax.nn.softmax(vals, axis=-1)
    return index // s, index % s, weights, jnp.exp(vals[:, 0] - lse)


def score_local(volume_pairs, data, ctf, rotations, shifts, grid: FourierGrid, *, pixel_weights=None,
                r_limit: float | None = None, interpolation: str = "trilinear", chunk: int = 4096,
                precision=None):
    """Log-likelihoods (B, L, S) of each image against its own candidate poses (a local search).

    Same score and conventions as :func:`score_poses`, with per-image candidates:
    rotations (B, L, 3, 3) (e.g. :func:`local_rotations`) and shifts (B, S, 2) (e.g.
    :func:`local_shifts`) or (S, 2) shared by all images. Images are processed in chunks of
    max(1, chunk // L) under ``lax.map``.
    """
    _check(volume_pairs, data, grid, rotations, shifts, local=True)
    dtype = data.dtype
    b, n_rot = rotations.shape[:2]
    shifts = jnp.asarray(shifts, dtype)
    if shifts.ndim == 2:
        shifts = jnp.broadcast_to(shifts, (b,) + shifts.shape)
    s = shifts.shape[1]
    pix, project, y, w, c = _scored_pixels(volume_pairs, data, ctf, grid, pixel_weights, r_limit, interpolation)
    p = y.shape[1]

    per = int(max(1, min(b, chunk // max(n_rot, 1))))
    n_chunks = -(-b // per)
    pad = n_chunks * per - b

    def padded(x):
        x = jnp.asarray(x)
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
        return x.reshape((n_chunks, per) + x.shape[1:])

    xs = tuple(padded(x) for x in (y, w, c, jnp.asarray(rotations, dtype), shifts))

    def one(args):
        yc, wc, cc, rc, tc = args
        a = project(rc.reshape(per * n_rot, 3, 3))
        a = a.reshape(per, n_rot, 2 * p)
        ramps = jax.vmap(jax.vmap(lambda t: shift_phase(pix.freqs, t, grid.box)))(tc)  # (per, S, P', 2)
        lhs = (conj_multiply(ramps, yc[:, None]) * (cc * wc)[:, None, :, None]).reshape(per, s, 2 * p)
        cross = jnp.einsum("bsq,blq->bls", lhs, a, precision=precision)
        power = jnp.sum(a.reshape(per, n_rot, p, 2) ** 2, -1)
        norm = jnp.einsum("bp,blp->bl", cc * cc * wc, power, precision=precision)
        yy = jnp.sum(wc[..., None] * yc * yc, axis=(1, 2))
        return -0.5 * (yy[:, None, None] - 2.0 * cross + norm[:, :, None])

    out = jax.lax.map(one, xs)  # (n_chunks, per, L, S)
    return out.reshape(n_chunks * per, n_rot, s)[:b]


def memory_bytes(n_images: int, n_rotations: int, n_shifts: int, grid: FourierGrid, *,
                 r_limit: float | None = None, interpolation: str = "trilinear", chunk: int = 4096,
                 local: bool = False, backend: str | None = None, itemsize: int = 4) -> int:
    """Upper estimate of the scratch and output bytes of one :func:`score_poses` call
    (``local=False``; n_rotations = M shared) or :func:`score_local` call (``local=True``;
    n_rotations = L per image), following the formula in the module docstring, for
    ``backend`` (default: JAX's default backend; CPU slices in blocks, see :func:`_projector`).
    Checked against XLA's compiled memory analysis in the tests (within 3x above it)."""
    b, m, s = int(n_images), int(n_rotations), int(n_shifts)
    idx = score_pixels(grid, r_limit)
    p = int(idx.size)
    d = 2 * (int(np.ceil(np.linalg.norm(grid.freqs[idx], axis=-1).max())) + 1) + 1
    backend = jax.default_backend() if backend is None else backend
    block = max(8, 2 ** 17 // p) if backend == "cpu" else None
    per_pixel = 16 if interpolation in ("trilinear", "nearest") else 40
    inputs = 4 * b * p  # selected images, weights, CTF

    def slicing(k):  # slices and their power (3 per pixel), and one block's coordinates
        return 3 * k * p + per_pixel * (k if block is None else min(k, block)) * p

    if local:
        per = max(1, min(b, chunk // max(m, 1)))
        n = inputs + slicing(per * m) + 4 * per * s * p + per * m * s + 2 * b * m * s + 2 * d ** 3
    else:
        c = min(chunk, m)
        n = inputs + 2 * b * s * p + slicing(c) + b * s * c + 2 * b * s * m + 2 * d ** 3
    return int(itemsize * n)


def brute_force_scores(volume_pairs, data, ctf, rotations, shifts, grid: FourierGrid, *, pixel_weights=None,
                       r_limit: float | None = None, interpolation: str = "trilinear") -> np.ndarray:
    """The explicit-loop twin of :func:`score_poses` (tests only): for each pose and shift, the
    forward model on the whole grid (slice, CTF, shift ramp), residual, masked weighted sum.

    rotations (M, 3, 3) shared, or (B, M, 3, 3) per image (the twin of :func:`score_local`);
    shifts (S, 2) shared, or (B, S, 2) per image. Returns numpy (B, M, S).
    """
    data = jnp.asarray(data)
    b = data.shape[0]
    dtype = data.dtype
    rotations = np.asarray(rotations)
    shifts = np.asarray(shifts)
    if rotations.ndim == 3:
        rotations = np.broadcast_to(rotations, (b,) + rotations.shape)
    if shifts.ndim == 2:
        shifts = np.broadcast_to(shifts, (b,) + shifts.shape)
    w = grid.multiplicity if pixel_weights is None else pixel_weights
    w = jnp.broadcast_to(jnp.asarray(w, dtype), (b, grid.n_pixels))
    radius = np.linalg.norm(grid.freqs, axis=-1)
    mask = jnp.asarray(np.ones_like(radius) if r_limit is None else radius <= float(r_limit) + 1e-9, dtype)
    c = jnp.ones((b, grid.n_pixels), dtype) if ctf is None else jnp.asarray(ctf, dtype)
    wm = w * mask
    out = np.empty((b, rotations.shape[1], shifts.shape[1]))
    for i in range(rotations.shape[1]):
        for j in range(shifts.shape[1]):
            out[:, i, j] = np.asarray(_one_pose_score(volume_pairs, data, c, wm, jnp.asarray(rotations[:, i], dtype),
                                                      jnp.asarray(shifts[:, j], dtype), grid, interpolation))
    return out


@functools.partial(jax.jit, static_argnames=("grid", "interpolation"))
def _one_pose_score(volume_pairs, data, c, weights, rotations, shifts, grid, interpolation):
    """(B,) scores of each image at its own pose and shift on the whole grid (weights masked)."""
    a = slices(volume_pairs, rotations, grid, interpolation) * c[..., None]
    ramp = jax.vmap(lambda t: shift_phase(grid.freqs, t, grid.box))(shifts)
    r = complex_multiply(a, ramp) - data
    return -0.5 * jnp.sum(weights[..., None] * r * r, axis=(1, 2))


# ----------------------------------------------------------------------------- posteriors

def posterior(scores, temperature: float = 1.0):
    """Softmax of scores / temperature over all candidates of each image: (B, K...) -> same shape."""
    b = scores.shape[0]
    flat = scores.reshape(b, -1) / temperature
    return jax.nn.softmax(flat, axis=-1).reshape(scores.shape)


def top_k(scores, k: int, temperature: float = 1.0):
    """The k best (rotation, shift) pairs of each image from scores (B, M, S).

    Returns:
      idx_rot: (B, k) int32 rotation indices, best first.
      idx_shift: (B, k) int32 shift indices.
      weights: (B, k) softmax of the kept scores / temperature (sums to 1 per image).
      max_prob: (B,) the best pose's probability under the full posterior (all M * S poses),
        RELION's rlnMaxValueProbDistribution.
    """
    b, _, s = scores.shape
    flat = scores.reshape(b, -1) / temperature
    vals, idx = jax.lax.top_k(flat, int(k))
    weights = jax.nn.softmax(vals, axis=-1)
    max_prob = jnp.exp(vals[:, 0] - jax.nn.logsumexp(flat, axis=-1))
    idx = idx.astype(jnp.int32)
    return idx // s, idx % s, weights, max_prob
