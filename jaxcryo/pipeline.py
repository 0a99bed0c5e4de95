"""From RELION files to the driver and back: STAR + stacks -> Particles, memory plans, checkpoints.

This is the glue between :mod:`jaxcryo.io` (numpy in, numpy out) and the maths. It converts a
:class:`~jaxcryo.io.ParticleTable` into rotations, pixel shifts and :class:`CTFParams`, turns
image chunks into Fourier pairs once (``prepare_particles``), states the memory a run needs,
and saves/loads a :class:`~jaxcryo.reconstruct.ReconState` atomically so a killed run resumes.

Example:
    >>> table, stack = open_particles("particles.star")            # doctest: +SKIP
    >>> particles = load_particles(table, stack, FourierGrid(stack.box_size))  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward.ctf import CTFParams
from jaxcryo.forward.model import Particles, prepare_particles
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.geometry import euler_to_matrix
from jaxcryo.io import InputError, ParticleStack, ParticleTable, read_particles
from jaxcryo.io.errors import atomic_output
from jaxcryo.reconstruct import ReconState

GIB = 1024 ** 3
CHECKPOINT_VERSION = 1

__all__ = ["open_particles", "table_poses", "load_particles", "iter_particle_chunks", "MemoryPlan",
           "plan_memory", "available_memory_bytes", "save_checkpoint", "load_checkpoint",
           "checkpoint_path", "format_bytes", "plan_streaming_bytes", "reconstruct_streaming", "GIB"]


# ----------------------------------------------------------------------------- particles


def open_particles(star_path, *, require_poses: bool = True) -> tuple[ParticleTable, ParticleStack]:
    """Read a particle STAR file and open its stacks, checking everything that can be checked cheaply.

    Checks: the STAR (columns, rows), every stack header (readable, square images), rows past
    the end of their stack, box against the optics table's rlnImageSize, one pixel size and one
    box for all particles. Pixel NaN/Inf are found when the images are read.

    Raises:
      InputError: naming the file and the problem.
    """
    table = read_particles(star_path, require_poses=require_poses)
    stack = ParticleStack(table)
    try:
        stack.validate()
        px = table.pixel_size_angstrom
        if not np.allclose(px, px[0], rtol=1e-4):
            groups = np.unique(table.optics_group[~np.isclose(px, px[0], rtol=1e-4)])
            raise InputError(
                f"{table.star_path}: particles have different pixel sizes ({px[0]:g} Å and "
                f"{px[~np.isclose(px, px[0], rtol=1e-4)][0]:g} Å, optics group(s) {groups.tolist()}); "
                "jaxcryo reconstructs from one pixel size: rescale to a common one first")
        if stack.box_size < 4:
            raise InputError(f"{table.star_path}: images are {stack.box_size} px; need at least 4 px")
    except BaseException:
        stack.close()
        raise
    return table, stack


def table_poses(table: ParticleTable, rows=None, *, with_ctf: bool = True, dtype=np.float32):
    """Rotations (n, 3, 3), shifts in pixels (n, 2) and CTFParams (or None) of ``rows`` of a table.

    Shifts are rlnOriginX/YAngst divided by the (STAR's) pixel size. The CTF is None when
    ``with_ctf`` is False or the STAR has no CTF columns.
    """
    rows = np.arange(len(table)) if rows is None else np.asarray(rows, np.int64)
    rotations = np.asarray(euler_to_matrix(np.asarray(table.euler_deg[rows], np.float64)), dtype)
    px = table.pixel_size_angstrom[rows]
    shifts_px = (table.shifts_angstrom[rows] / px[:, None]).astype(dtype)
    ctf = None
    if with_ctf and table.has_ctf:
        ctf = CTFParams(
            defocus_u_angstrom=table.defocus_u_angstrom[rows], defocus_v_angstrom=table.defocus_v_angstrom[rows],
            defocus_angle_deg=table.defocus_angle_deg[rows], voltage_kv=table.voltage_kv[rows],
            cs_mm=table.cs_mm[rows], amplitude_contrast=table.amplitude_contrast[rows],
            phase_shift_deg=table.phase_shift_deg[rows], bfactor_angstrom2=table.ctf_bfactor[rows],
            pixel_size_angstrom=px)
        ctf = CTFParams(*(np.asarray(f, dtype) for f in ctf))
    return rotations, shifts_px, ctf


def iter_particle_chunks(table: ParticleTable, stack: ParticleStack, grid: FourierGrid, *,
                         chunk_size: int = 1024, order=None, dtype=np.float32, prefetch: int = 2
                         ) -> Iterator[tuple[np.ndarray, Particles]]:
    """Yield (rows, Particles) chunks: images read (prefetched) and Fourier transformed once.

    The Particles hold numpy arrays (pairs inside the grid's disk, shift already undone).
    """
    prepare = _prepare_fn(grid)
    for rows, images in stack.iter_chunks(chunk_size, order=order, prefetch=prefetch):
        rotations, shifts_px, ctf = table_poses(table, rows, dtype=dtype)
        data = prepare(jnp.asarray(images, dtype), jnp.asarray(shifts_px))
        yield rows, Particles(data=np.asarray(data), rotations=rotations, ctf=ctf,
                              weight=np.ones(len(rows), dtype))


def _prepare_fn(grid: FourierGrid):
    @jax.jit
    def prepare(images, shifts_px):
        return prepare_particles(images, jnp.zeros((images.shape[0], 3, 3), images.dtype), shifts_px, None,
                                 grid).data
    return prepare


def load_particles(table: ParticleTable, stack: ParticleStack, grid: FourierGrid, *, chunk_size: int = 1024,
                   dtype=np.float32, progress: Callable[[int], Any] | None = None) -> Particles:
    """All particles of a table in memory as Fourier pairs (numpy), read and transformed chunk by chunk.

    ``progress(k)`` is called with the number of images done after each chunk. Peak memory is
    the pairs plus a few chunks of images.
    """
    n = len(table)
    data = np.empty((n, grid.n_pixels, 2), dtype)
    for rows, chunk in iter_particle_chunks(table, stack, grid, chunk_size=chunk_size, dtype=dtype):
        data[rows] = chunk.data
        if progress is not None:
            progress(len(rows))
    rotations, _, ctf = table_poses(table, dtype=dtype)
    return Particles(data=data, rotations=rotations, ctf=ctf, weight=np.ones(n, dtype))


# ----------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes a reconstruction needs: the particles as Fourier pairs, the volumes, the chunks read."""

    particles_bytes: int
    volumes_bytes: int
    chunk_bytes: int

    @property
    def in_memory_bytes(self) -> int:
        return self.particles_bytes + self.volumes_bytes + self.chunk_bytes

    def describe(self) -> str:
        return (f"{format_bytes(self.in_memory_bytes)} ({format_bytes(self.particles_bytes)} of particles in "
                f"Fourier space, {format_bytes(self.volumes_bytes)} of volumes and optimizer state, "
                f"{format_bytes(self.chunk_bytes)} of image chunks)")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def plan_memory(n_images: int, box: int, *, r_max: int | None = None, groups: int = 2, chunk_size: int = 1024,
                dtype_bytes: int = 4) -> MemoryPlan:
    """Estimate the memory of an in-memory reconstruction.

    Particles: the disk's pairs plus rotation and CTF (about 0.8 x the images' bytes), held
    twice (the caller's copy and the driver's half-set stack). Volumes: about 10 pair volumes
    per half-set (parameters, gradient, curvature samples, running mean, line-search trials).
    Chunks: the images read ahead (prefetch 2) and in flight.
    """
    grid = FourierGrid(box, r_max)
    per_image = (grid.n_pixels * 2 + 9 + 9 + 1) * dtype_bytes
    volume = int(np.prod(grid.volume_shape)) * 2 * dtype_bytes
    return MemoryPlan(particles_bytes=2 * n_images * per_image, volumes_bytes=10 * groups * volume,
                      chunk_bytes=4 * min(chunk_size, n_images) * box * box * dtype_bytes)


def available_memory_bytes() -> int:
    """Physical memory available now (Linux MemAvailable), or total RAM where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_path(map_path) -> str:
    """MAP.mrc -> MAP.ckpt.npz beside it."""
    root, _ = os.path.splitext(os.fspath(map_path))
    return root + ".ckpt.npz"


def save_checkpoint(path, state: ReconState, settings: dict) -> None:
    """Write a ReconState and the run's settings to ``path`` (.npz), atomically.

    The pytree (parameters, optimizer state, PRNG keys) is stored as its numpy leaves plus its
    pickled tree structure; the history and settings as JSON. A reader sees the old file or
    the new one, never half of one.
    """
    leaves, treedef = jax.tree.flatten((state.params, state.opt_state, state.key))
    history = {k: list(v) for k, v in state.history.items() if isinstance(v, list)}
    meta = {"version": CHECKPOINT_VERSION, "epoch": int(state.epoch), "history": history, "settings": settings}
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["treedef"] = np.frombuffer(pickle.dumps(treedef), np.uint8)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_checkpoint(path) -> tuple[ReconState, dict]:
    """Read a checkpoint written by :func:`save_checkpoint` -> (ReconState, settings).

    Raises:
      InputError: unreadable or from another checkpoint version.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            treedef = pickle.loads(bytes(z["treedef"]))
            leaves = [z[f"leaf_{i:05d}"] for i in range(treedef.num_leaves)]
    except FileNotFoundError:
        raise InputError(f"{path}: no checkpoint to resume from") from None
    except Exception as err:
        raise InputError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err}); "
                         "delete it to start afresh") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {meta.get('version')} is not {CHECKPOINT_VERSION}; "
                         "delete it to start afresh")
    params, opt_state, key = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])
    state = ReconState(meta["epoch"], params, opt_state, key, meta["history"])
    return state, meta["settings"]


# ----------------------------------------------------------------------------- streaming


def plan_streaming_bytes(box: int, *, r_max: int | None = None, groups: int = 2, chunk_size: int = 4096,
                         dtype_bytes: int = 4) -> int:
    """Memory of a streamed reconstruction: the volumes plus ~4 chunks of images and one of pairs."""
    grid = FourierGrid(box, r_max)
    volumes = plan_memory(1, box, r_max=r_max, groups=groups).volumes_bytes
    chunk_images = 4 * chunk_size * box * box * dtype_bytes
    chunk_pairs = 2 * chunk_size * (grid.n_pixels * 2 + 19) * dtype_bytes
    return volumes + chunk_images + chunk_pairs


def reconstruct_streaming(table: ParticleTable, stack: ParticleStack, *, box: int, pixel_size_angstrom: float,
                          method: str = "psgd", interpolation: str = "trilinear", epochs: int = 10,
                          batch_size: int = 128, lam: float = 1e-4, halves: bool = True, seed: int = 0,
                          chunk_size: int = 4096, resume: ReconState | None = None,
                          callback: Callable[[ReconState], Any] | None = None,
                          progress: Callable[[int], Any] | None = None):
    """:func:`~jaxcryo.reconstruct.reconstruct` for particle sets larger than memory.

    Each epoch visits the particles of each half-set in a fresh random order, ``chunk_size``
    images at a time (both halves together): the chunk is read from disk (prefetched in a
    thread), Fourier transformed, and swept by the same compiled epoch function
    (:func:`~jaxcryo.reconstruct.make_epoch`: shuffled minibatches under ``lax.scan``). A
    second pass computes the full-data loss. Memory: the volumes plus a few chunks. The half
    split, optimizer and history are those of ``reconstruct``; the minibatches differ (they
    are drawn within chunks), so the map equals ``reconstruct``'s only up to optimisation noise.

    ``progress(k)`` is called with the images done after each chunk of the training pass.
    """
    from jaxcryo.loss import Problem
    from jaxcryo.reconstruct import _split_halves, finish, make_epoch, make_full_loss, make_optimizer, map_groups

    if method == "psgd-exact":
        raise InputError("psgd-exact needs every particle in memory for its diagonal; "
                         "use --method psgd with streaming")
    import time

    grid = FourierGrid(box)
    problem = Problem(grid=grid, interpolation=interpolation, lam=lam)
    dtype = np.float32
    split_key, key = jax.random.split(jax.random.PRNGKey(seed))
    groups = _split_halves(split_key, len(table), halves)
    g, m = groups.shape
    batch_size = int(min(batch_size, m))
    per_half = max(batch_size, (chunk_size // g) // batch_size * batch_size)  # whole minibatches per chunk
    tx = make_optimizer(method, box=box, r_max=grid.radius, seed=seed)
    probes = 1 if method == "psgd" else 0
    if resume is None:
        params = jnp.stack([problem.zeros(dtype)] * g)
        state = ReconState(0, params, jax.vmap(tx.init)(params), jax.random.split(key, g),
                           {"epoch": [], "loss": [], "seconds": []})
    else:
        state = resume
    epoch_fn = jax.jit(map_groups(make_epoch(problem, tx, batch_size=batch_size, n_probes=probes, exact=False,
                                             average=True), interpolation, (0, 0, 0, 0, None, None)),
                       donate_argnums=(0, 1))
    full_loss = jax.jit(map_groups(make_full_loss(problem, batch_size), interpolation))
    prepare = _prepare_fn(grid)

    def chunks(order):
        """Stacked (g, c, ...) Particles of the columns of ``order`` (g, m), per_half at a time."""
        blocks = [order[:, s:s + per_half] for s in range(0, m, per_half)]
        flat = np.concatenate([b.ravel() for b in blocks])
        rows_iter = stack.iter_chunks(g * per_half, order=np.maximum(flat, 0))
        for block, (rows, images) in zip(blocks, rows_iter):
            rotations, shifts_px, ctf = table_poses(table, rows, dtype=dtype)
            data = np.asarray(prepare(jnp.asarray(images), jnp.asarray(shifts_px)))
            part = Particles(data=data, rotations=rotations, ctf=ctf, weight=(block.ravel() >= 0).astype(dtype))
            yield jax.tree.map(lambda x: jnp.asarray(x).reshape((g, -1) + x.shape[1:]), part)

    history = {k: list(v) for k, v in state.history.items() if isinstance(v, list)}
    history["compile_seconds"] = 0.0
    elapsed = history["seconds"][-1] if history["seconds"] else 0.0
    params, opt_state, keys = state.params, state.opt_state, state.key
    for epoch in range(state.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        split = jax.vmap(jax.random.split)(keys)
        keys = split[:, 0]
        order = np.stack([groups[i][np.asarray(jax.random.permutation(split[i, 1], m))] for i in range(g)])
        for part in chunks(order):
            t1 = time.perf_counter()
            average_from = jnp.asarray(0.5 if epoch == 1 else 0.0, dtype)  # as reconstruct() does
            params, opt_state, keys, _ = epoch_fn(params, opt_state, keys, part, None, average_from)
            if epoch == state.epoch + 1 and not history["compile_seconds"]:
                jax.block_until_ready(params)
                history["compile_seconds"] = time.perf_counter() - t1
            if progress is not None:
                progress(int(np.sum(np.asarray(part.weight))))
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - t0
        ridge = lam * jnp.sum(params * params, axis=tuple(range(1, params.ndim)))
        data_sum = jnp.zeros(g)
        for part in chunks(groups):
            w = jnp.sum(part.weight, axis=1)
            data_sum = data_sum + (full_loss(params, part) - ridge) * w
        totals = np.maximum((groups >= 0).sum(1), 1)
        history["epoch"].append(epoch)
        history["loss"].append(float(jnp.mean(data_sum / totals + ridge)))
        history["seconds"].append(elapsed)
        state = ReconState(epoch, params, opt_state, keys, history)
        if callback is not None:
            callback(state)
    return finish(ReconState(state.epoch, params, opt_state, keys, history), interpolation, pixel_size_angstrom)


# ----------------------------------------------------------------------------- refined poses


def write_refined_particles(path, table: ParticleTable, *, euler_deg, shifts_angstrom, random_subset,
                            max_prob) -> None:
    """The input STAR's particle rows (``table.source_rows``, every column kept) with refined poses.

    Sets rlnAngleRot/Tilt/Psi, the origin (rlnOriginX/YAngst; RELION 3.0 files: rlnOriginX/Y in
    pixels), rlnRandomSubset (1 or 2, the half-set) and rlnMaxValueProbDistribution; other
    blocks (optics) are copied. Image names are made absolute when ``path`` is in another
    folder than the input STAR, so relion_reconstruct reads the stacks from anywhere. Atomic.
    """
    import warnings

    import starfile

    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks = starfile.read(table.star_path, always_dict=True)
    name = next((b for b in ("particles", "images", "") if b in blocks and "rlnImageName" in blocks[b]),
                next(b for b in blocks if hasattr(blocks[b], "columns") and "rlnImageName" in blocks[b].columns))
    df = blocks[name].reset_index(drop=True).iloc[np.asarray(table.source_rows)].reset_index(drop=True).copy()
    euler = np.asarray(euler_deg, np.float64)
    shifts = np.asarray(shifts_angstrom, np.float64)
    for i, col in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        df[col] = euler[:, i]
    if "rlnOriginXAngst" in df.columns or "optics" in blocks:
        df["rlnOriginXAngst"], df["rlnOriginYAngst"] = shifts[:, 0], shifts[:, 1]
        df = df.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in df.columns])
    else:  # RELION 3.0: origins in pixels
        px = table.pixel_size_angstrom
        df["rlnOriginX"], df["rlnOriginY"] = shifts[:, 0] / px, shifts[:, 1] / px
    df["rlnRandomSubset"] = np.asarray(random_subset, np.int64)
    df["rlnMaxValueProbDistribution"] = np.asarray(max_prob, np.float64)
    star_dir = os.path.dirname(os.path.abspath(table.star_path))
    if os.path.dirname(os.path.abspath(path)) != star_dir:
        df["rlnImageName"] = [f"{i + 1}@{p}" for i, p in zip(table.stack_indices, table.stack_paths)]
    blocks[name] = df
    with atomic_output(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f", sep=" ")
