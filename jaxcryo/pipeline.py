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
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcryo.forward.ctf import CTFParams
from jaxcryo.forward.model import Particles, prepare_particles
from jaxcryo.forward.slicing import FourierGrid
from jaxcryo.geometry import euler_to_matrix
from jaxcryo.io import InputError, ParticleStack, ParticleTable, read_particles
from jaxcryo.io.cryosparc import check_stacks, read_cs
from jaxcryo.io.errors import atomic_output
from jaxcryo.reconstruct import ParticleBlocks, ReconState, reconstruct

GIB = 1024 ** 3
CHECKPOINT_VERSION = 2  # 2: arrays + JSON only (1 pickled the tree structure)

__all__ = ["read_table", "open_particles", "table_poses", "load_particles", "iter_particle_chunks", "MemoryPlan",
           "plan_memory", "plan_streaming", "step_scratch_bytes", "runtime_memory_bytes", "limit_heap_growth",
           "REFINE_PROGRAMS_BYTES", "XLA_PROGRAMS_BYTES",
           "available_memory_bytes", "save_checkpoint", "load_checkpoint", "checkpoint_settings",
           "state_template", "refine_state_template", "abinitio_state_template",
           "checkpoint_path", "format_bytes", "plan_streaming_bytes", "reconstruct_streaming",
           "StreamedBlocks", "GIB"]


# ----------------------------------------------------------------------------- particles


def read_table(path, *, require_poses: bool = True, require_images: bool = True, datadir=None) -> ParticleTable:
    """A ParticleTable from a cryoSPARC ``.cs`` file (by its suffix) or a RELION STAR file.

    ``require_images``: False for pose-only STAR files (commands that read no image).
    ``datadir``: where a .cs file's stacks are, when its ``blob/path`` does not resolve.
    """
    if os.fspath(path).lower().endswith(".cs"):
        return read_cs(path, require_poses=require_poses, datadir=datadir)
    return read_particles(path, require_poses=require_poses, require_images=require_images)


def open_particles(star_path, *, require_poses: bool = True, datadir=None) -> tuple[ParticleTable, ParticleStack]:
    """Read a particle STAR (or cryoSPARC .cs) file and open its stacks, checking what can be checked cheaply.

    Checks: the STAR (columns, rows), every stack header (readable, square images), rows past
    the end of their stack, box against the optics table's rlnImageSize, one pixel size and one
    box for all particles. Pixel NaN/Inf are found when the images are read.

    Raises:
      InputError: naming the file and the problem.
    """
    table = read_table(star_path, require_poses=require_poses, datadir=datadir)
    if table.star_path.lower().endswith(".cs"):
        check_stacks(table)
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
    rotations = np.asarray(_euler_to_matrix(np.asarray(table.euler_deg[rows], np.float64)), dtype)
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


_euler_to_matrix = jax.jit(euler_to_matrix)  # one compile per chunk shape, not one per eager op


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
                   dtype=np.float32, progress: Callable[[int], Any] | None = None,
                   optics_groups=None) -> Particles:
    """All particles of a table in memory as Fourier pairs (numpy), read and transformed chunk by chunk.

    ``progress(k)`` is called with the number of images done after each chunk. Peak memory is
    the pairs plus a few chunks of images. Each particle's ``noise_group`` is the position of
    its rlnOpticsGroup in ``optics_groups`` (sorted group numbers; default: this table's), so
    the noise model is estimated per optics group; pass the whole STAR's groups when ``table``
    is one process's share.
    """
    n = len(table)
    ids = np.unique(table.optics_group) if optics_groups is None else np.asarray(optics_groups, np.int64)
    noise_group = np.searchsorted(ids, table.optics_group)
    if np.any(noise_group >= len(ids)) or np.any(ids[np.minimum(noise_group, len(ids) - 1)] != table.optics_group):
        raise ValueError(f"{table.star_path}: optics groups {np.setdiff1d(table.optics_group, ids).tolist()} "
                         f"are not among optics_groups {ids.tolist()}")
    data = np.empty((n, grid.n_pixels, 2), dtype)
    for rows, chunk in iter_particle_chunks(table, stack, grid, chunk_size=chunk_size, dtype=dtype):
        data[rows] = chunk.data
        if progress is not None:
            progress(len(rows))
    rotations, _, ctf = table_poses(table, dtype=dtype)
    return Particles(data=data, rotations=rotations, ctf=ctf, weight=np.ones(n, dtype),
                     noise_group=noise_group.astype(np.int32))


# ----------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes a run holds: the particles as Fourier pairs (in memory: all of them; streamed: the
    blocks in flight), the volumes and optimizer state, the image chunks read (and their FFT),
    the scratch of the compiled steps, and the runtime (Python, JAX and XLA, measured)."""

    particles_bytes: int
    volumes_bytes: int
    chunk_bytes: int
    scratch_bytes: int = 0
    runtime_bytes: int = 0

    @property
    def in_memory_bytes(self) -> int:
        """The total (the name is historical: it is the total of a streamed plan too)."""
        return self.particles_bytes + self.volumes_bytes + self.chunk_bytes + self.scratch_bytes + self.runtime_bytes

    total_bytes = in_memory_bytes

    def describe(self, particles: str = "particles in Fourier space") -> str:
        parts = [(self.runtime_bytes, "runtime"), (self.particles_bytes, particles),
                 (self.volumes_bytes, "volumes and optimizer state"), (self.scratch_bytes, "compiled-step scratch"),
                 (self.chunk_bytes, "image chunks read")]
        return (f"{format_bytes(self.in_memory_bytes)} ("
                + ", ".join(f"{format_bytes(b)} {what}" for b, what in parts if b) + ")")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


XLA_PROGRAMS_BYTES = 256 * 1024 ** 2
"""What a run's compilations add to the process for good: XLA's compiled programs (the block
function, the diagonal, residual and loss passes, the FFT), its thread pools and the allocator's
pages kept after compiling (measured on CPU: +220 MiB at box 32, +250 at box 64, with
:func:`limit_heap_growth`)."""


REFINE_PROGRAMS_BYTES = 512 * 1024 ** 2
"""What refinement's compilations add beyond :data:`XLA_PROGRAMS_BYTES`: the global and local
epochs with their pose stages (recompiled when the frequency limit steps up), the statistics
pass, the reference scaling (measured on CPU at box 24, global order 1: 996 MiB peak against
491 MiB of runtime, 80 MiB of data and scratch)."""


def limit_heap_growth() -> None:
    """Keep freed memory from piling up in glibc's heaps (Linux; elsewhere nothing happens): at most
    two malloc arenas, and blocks of 1 MiB or more from mmap, returned to the system when freed.

    A streamed run reads image chunks in a thread and frees them in another; glibc's default
    (one arena per thread, a threshold that rises to 32 MiB) kept every freed chunk, and the
    resident memory crept up epoch after epoch (measured: 599 -> 507 MiB peak at box 32 with
    these settings, flat across epochs)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixed: no longer raised by frees)
    except (OSError, AttributeError):
        pass


def runtime_memory_bytes() -> int:
    """Resident memory of this process now, with JAX's backend started (Python, numpy, JAX, XLA,
    what the caller holds), plus :data:`XLA_PROGRAMS_BYTES` for the programs a run compiles."""
    jax.devices()  # starts the backend: its memory is part of every run
    try:
        with open("/proc/self/statm") as fh:
            resident = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(resident) + XLA_PROGRAMS_BYTES


def step_scratch_bytes(box: int, *, batch_size: int = 128, n_probes: int = 1, groups: int = 2,
                       interpolation: str = "trilinear", r_max: int | None = None, dtype_bytes: int = 4) -> int:
    """Scratch of one compiled minibatch step for all half-sets: the batch's pairs, its slices and
    residuals for the map and each Hutchinson probe (forward, adjoint and line-search trials),
    and the interpolation stencil of every pixel (8 corners for trilinear: indices, weights and
    their products); about 110 floats per pixel and image with one probe (XLA's memory analysis
    of the compiled block function: 38 MiB at box 32, 163 MiB at box 64, batch 128; this gives
    43 and 178 MiB; a test checks it stays above)."""
    grid = FourierGrid(box, r_max)
    corners = 8 if interpolation == "trilinear" else 1
    per_pixel = 4 + 12 * (1 + n_probes) + 10 * corners
    return int(groups * batch_size * grid.n_pixels * per_pixel * dtype_bytes)


def plan_memory(n_images: int, box: int, *, r_max: int | None = None, groups: int = 2, chunk_size: int = 1024,
                dtype_bytes: int = 4, batch_size: int = 128, n_probes: int = 1, interpolation: str = "trilinear",
                runtime_bytes: int = 0) -> MemoryPlan:
    """Estimate the memory of an in-memory reconstruction.

    Particles: the disk's pairs plus rotation and CTF (about 0.8 x the images' bytes), held
    twice (the caller's copy and the driver's half-set stack). Volumes: about 10 pair volumes
    per half-set (parameters, gradient, curvature samples, running mean, line-search trials).
    Chunks: the images read ahead (prefetch 2) and in flight. Scratch: :func:`step_scratch_bytes`.
    ``runtime_bytes``: the process's own memory (:func:`runtime_memory_bytes`), 0 to leave it out.
    """
    grid = FourierGrid(box, r_max)
    per_image = (grid.n_pixels * 2 + 9 + 9 + 1) * dtype_bytes
    volume = int(np.prod(grid.volume_shape)) * 2 * dtype_bytes
    return MemoryPlan(particles_bytes=2 * n_images * per_image, volumes_bytes=10 * groups * volume,
                      chunk_bytes=4 * min(chunk_size, n_images) * box * box * dtype_bytes,
                      scratch_bytes=step_scratch_bytes(box, batch_size=min(batch_size, max(1, n_images // groups)),
                                                       n_probes=n_probes, groups=groups, interpolation=interpolation,
                                                       r_max=r_max, dtype_bytes=dtype_bytes),
                      runtime_bytes=int(runtime_bytes))


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


def state_template(*, method: str, box: int, groups: int = 2, r_max: int | None = None, dtype=np.float32):
    """Shapes and dtypes (jax.ShapeDtypeStruct) of a run's (params, opt_state, key), built from its
    settings exactly as :func:`~jaxcryo.reconstruct.reconstruct` builds them; nothing is allocated.

    This is how a checkpoint's tree structure is rebuilt: a checkpoint stores only arrays and JSON.
    """
    from jaxcryo.loss import Problem
    from jaxcryo.reconstruct import make_optimizer

    grid = FourierGrid(box, r_max)
    # The normal-equation route keeps no optimizer state (its checkpoints hold opt_state None).
    tx = None if method == "normal" else make_optimizer(method, box=box, r_max=grid.radius)

    def build():
        params = jnp.stack([Problem(grid=grid).zeros(dtype)] * groups)
        opt_state = None if tx is None else jax.vmap(tx.init)(params)
        return params, opt_state, jax.random.split(jax.random.PRNGKey(0), groups)

    return jax.eval_shape(build)


def refine_state_template(*, method: str, box: int, n_particles: int, dtype=np.float32):
    """Shapes of a refinement checkpoint's (params, (opt_state, pose state), key): the
    reconstruction's :func:`state_template` plus each half-set's poses (rotations, shifts,
    max_prob), ceil(n/2) rows per half (see :func:`jaxcryo.refine.refine`)."""
    params, opt_state, key = state_template(method=method, box=box, groups=2, dtype=dtype)
    m = -(-int(n_particles) // 2)
    poses = (jax.ShapeDtypeStruct((2, m, 3, 3), dtype), jax.ShapeDtypeStruct((2, m, 2), dtype),
             jax.ShapeDtypeStruct((2, m), dtype))
    return params, (opt_state, poses), key


def abinitio_state_template(*, method: str, box: int, n_particles: int, dtype=np.float32):
    """Shapes of an ab initio checkpoint's (params, (opt_state, rotations, shifts, max_prob), key):
    one map, each particle's pose (see :meth:`jaxcryo.abinitio.AbInitioState.to_recon_state`)."""
    params, opt_state, key = state_template(method=method, box=box, groups=1, dtype=dtype)
    one = lambda t: jax.ShapeDtypeStruct(t.shape[1:], t.dtype)  # noqa: E731  (drop the group axis)
    n = int(n_particles)
    poses = (jax.ShapeDtypeStruct((n, 3, 3), dtype), jax.ShapeDtypeStruct((n, 2), dtype),
             jax.ShapeDtypeStruct((n,), dtype))
    return one(params), (jax.tree.map(one, opt_state), *poses), one(key)


def save_checkpoint(path, state: ReconState, settings: dict) -> None:
    """Write a ReconState and the run's settings to ``path`` (.npz), atomically.

    Only data: the numeric leaves of (parameters, optimizer state, PRNG keys) as plain arrays,
    and the epoch, history, settings and each leaf's shape and dtype as JSON. No pickle: the tree
    structure is rebuilt from the settings on load (:func:`state_template`), so a checkpoint
    planted in a shared folder cannot run code. A reader sees the old file or the new one, never
    half of one; a write interrupted (SIGTERM through the CLI, an exception) leaves no temporary.
    """
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves((state.params, state.opt_state, state.key))]
    history = {k: list(v) for k, v in state.history.items() if isinstance(v, list)}
    meta = {"version": CHECKPOINT_VERSION, "epoch": int(state.epoch), "history": history, "settings": settings,
            "leaves": [{"shape": list(x.shape), "dtype": x.dtype.str} for x in leaves]}
    arrays = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def checkpoint_settings(path) -> dict:
    """The settings a checkpoint was made with (its JSON only; no array is read).

    Raises:
      InputError: missing, unreadable, or from another checkpoint version.
    """
    return _checkpoint_meta(os.fspath(path))[0]["settings"]


def load_checkpoint(path, template) -> tuple[ReconState, dict]:
    """Read a checkpoint written by :func:`save_checkpoint` -> (ReconState, settings).

    Args:
      path: the .npz file.
      template: the (params, opt_state, key) pytree the state must have (arrays or
        ``jax.ShapeDtypeStruct``, e.g. from :func:`state_template`); the stored leaves are put
        into its tree structure after checking their number, shapes and dtypes.

    Raises:
      InputError: missing, unreadable, another version, or leaves that do not fit ``template``
        (a checkpoint of other settings, or a crafted file); never runs code from the file.
    """
    path = os.fspath(path)
    meta, z = _checkpoint_meta(path, keep_open=True)
    with z:
        leaves_meta = meta.get("leaves")
        shapes, treedef = jax.tree.flatten(template)
        if not isinstance(leaves_meta, list) or len(leaves_meta) != len(shapes):
            raise InputError(f"{path}: checkpoint holds {len(leaves_meta) if isinstance(leaves_meta, list) else 'no'}"
                             f" arrays, these settings need {len(shapes)}; delete it to start afresh")
        leaves = []
        for i, want in enumerate(shapes):
            name = f"leaf_{i:05d}"
            try:
                x = z[name]
            except Exception as err:
                raise InputError(f"{path}: unreadable checkpoint array {name} ({type(err).__name__}: {err}); "
                                 "delete it to start afresh") from None
            if x.shape != tuple(want.shape) or x.dtype != np.dtype(want.dtype):
                raise InputError(f"{path}: checkpoint array {name} is {x.dtype}{list(x.shape)}, these settings "
                                 f"need {np.dtype(want.dtype)}{list(want.shape)}; delete it to start afresh")
            leaves.append(jnp.asarray(x))
    params, opt_state, key = jax.tree.unflatten(treedef, leaves)
    state = ReconState(int(meta["epoch"]), params, opt_state, key, meta["history"])
    return state, meta["settings"]


def _checkpoint_meta(path: str, keep_open: bool = False):
    """(meta dict, open NpzFile or None); every failure is an InputError naming ``path``."""
    z = None
    try:
        z = np.load(path, allow_pickle=False)  # object arrays (pickles) are refused by numpy itself
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        meta = json.loads(bytes(z["meta"]).decode())
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
    except FileNotFoundError:
        raise InputError(f"{path}: no checkpoint to resume from") from None
    except Exception as err:
        if z is not None and hasattr(z, "close"):
            z.close()
        raise InputError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err}); "
                         "delete it to start afresh") from None
    problems = [k for k, kind in (("epoch", int), ("history", dict), ("settings", dict))
                if not isinstance(meta.get(k), kind)]
    if meta.get("version") != CHECKPOINT_VERSION or problems:
        z.close()
        what = f"version {meta.get('version')} is not {CHECKPOINT_VERSION}" if not problems else \
            f"metadata lacks {', '.join(problems)}"
        raise InputError(f"{path}: checkpoint {what}; delete it to start afresh")
    if not keep_open:
        z.close()
        z = None
    return meta, z


# ----------------------------------------------------------------------------- streaming


PREPARE_BATCH = 256  # images Fourier transformed at a time (bounds the FFT's scratch)


class StreamedBlocks(ParticleBlocks):
    """The particles of a STAR file as the driver's blocks, read from disk for every pass.

    Each block (about ``chunk_size`` images, both half-sets together) is read from the stacks by
    a background thread one block ahead (``prefetch``), Fourier transformed ``PREPARE_BATCH``
    images at a time (shifts undone, as :func:`load_particles` does) and handed to the driver;
    nothing else of the stack is held. With ``chunk_size`` at least the set's size the driver
    gets one block, the in-memory layout.
    """

    def __init__(self, table: ParticleTable, stack: ParticleStack, grid: FourierGrid, *, chunk_size: int = 4096,
                 dtype=np.float32, prefetch: int = 1):
        self.table, self.stack, self.grid = table, stack, grid
        self.n_particles = len(table)
        self.optics = np.unique(table.optics_group)
        self.n_noise_groups = len(self.optics)
        self.dtype = np.dtype(dtype)
        self.block_size = int(chunk_size)
        self.prefetch = int(prefetch)
        self._prepare = _prepare_fn(grid)

    def particles(self, rows, images) -> Particles:
        """Particles (numpy) of table ``rows`` (-1: padding, weight 0) from their ``images``."""
        safe = np.maximum(rows, 0)
        rotations, shifts_px, ctf = table_poses(self.table, safe, dtype=self.dtype)
        data = np.empty((len(rows), self.grid.n_pixels, 2), self.dtype)
        for s in range(0, len(rows), PREPARE_BATCH):  # fixed shape: one compilation
            part = images[s:s + PREPARE_BATCH]
            shift = shifts_px[s:s + PREPARE_BATCH]
            k = part.shape[0]
            if k < PREPARE_BATCH:
                part = np.concatenate([part, np.zeros((PREPARE_BATCH - k,) + part.shape[1:], part.dtype)])
                shift = np.concatenate([shift, np.zeros((PREPARE_BATCH - k, 2), shift.dtype)])
            data[s:s + k] = np.asarray(self._prepare(jnp.asarray(part, self.dtype), jnp.asarray(shift)))[:k]
        return Particles(data=data, rotations=rotations, ctf=ctf, weight=(rows >= 0).astype(self.dtype),
                         noise_group=np.searchsorted(self.optics, self.table.optics_group[safe]).astype(np.int32))

    def blocks(self, rows_list, mesh=None):
        from jaxcryo import distributed as dist

        rows_list = [np.asarray(r) for r in rows_list]
        if not rows_list:
            return
        g, c = rows_list[0].shape
        flat = np.concatenate([np.maximum(r, 0).ravel() for r in rows_list])
        reads = self.stack.iter_chunks(g * c, order=flat, prefetch=self.prefetch)
        for rows, (_, images) in zip(rows_list, reads):
            part = self.particles(rows.ravel(), images)
            del images
            if mesh is None:
                yield jax.tree.map(lambda x: jnp.asarray(x.reshape((g, c) + x.shape[1:])), part)
            else:
                layout = np.where(rows >= 0, np.arange(g * c).reshape(g, c), -1)
                yield dist.shard_groups(part, layout, mesh)


def plan_streaming(box: int, *, n_images: int, r_max: int | None = None, groups: int = 2, chunk_size: int = 4096,
                   batch_size: int = 128, n_probes: int = 1, interpolation: str = "trilinear", prefetch: int = 1,
                   dtype_bytes: int = 4, runtime_bytes: int = 0) -> MemoryPlan:
    """Memory of a streamed run (:func:`reconstruct_streaming`), by what it holds at its peak.

    Blocks: the driver's blocks of ``groups x rows`` images (:class:`~jaxcryo.reconstruct.BlockLayout`
    of ``chunk_size``) as Fourier pairs with poses and CTF: the block being swept, the next one
    (placed while the first runs), and the host copy it is built from. Chunks: the blocks' images
    read ahead (``prefetch``), being read and being transformed, and the FFT's scratch
    (``PREPARE_BATCH`` images). Volumes and scratch as :func:`plan_memory`. The total does not
    depend on ``n_images`` beyond the block size: the stack is never held (its pages are released
    after every read, see :class:`~jaxcryo.io.ParticleStack`).
    """
    grid = FourierGrid(box, r_max)
    m = -(-int(n_images) // groups)
    per = max(1, int(chunk_size) // groups)
    n_blocks = -(-m // per) if per < m else 1
    block_images = groups * -(-m // n_blocks)
    per_pair = (grid.n_pixels * 2 + 9 + 9 + 1 + 1) * dtype_bytes
    image = box * box * dtype_bytes
    volumes = plan_memory(1, box, r_max=r_max, groups=groups, dtype_bytes=dtype_bytes).volumes_bytes
    scratch = step_scratch_bytes(box, batch_size=min(batch_size, block_images // groups), n_probes=n_probes,
                                 groups=groups, interpolation=interpolation, r_max=r_max, dtype_bytes=dtype_bytes)
    prepare = PREPARE_BATCH * box * box * 8 * dtype_bytes  # complex FFT input, output and shift ramp
    return MemoryPlan(particles_bytes=3 * block_images * per_pair, volumes_bytes=volumes,
                      chunk_bytes=(int(prefetch) + 2) * block_images * image + prepare,
                      scratch_bytes=scratch, runtime_bytes=int(runtime_bytes))


def plan_streaming_bytes(box: int, *, r_max: int | None = None, groups: int = 2, chunk_size: int = 4096,
                         dtype_bytes: int = 4, n_images: int | None = None, **kw) -> int:
    """:func:`plan_streaming`'s total (``n_images`` default: a set of many blocks)."""
    n = 64 * chunk_size if n_images is None else n_images
    return plan_streaming(box, n_images=n, r_max=r_max, groups=groups, chunk_size=chunk_size,
                          dtype_bytes=dtype_bytes, **kw).in_memory_bytes


def reconstruct_streaming(table: ParticleTable, stack: ParticleStack, *, box: int, pixel_size_angstrom: float,
                          chunk_size: int = 4096, prefetch: int = 1, **settings):
    """:func:`~jaxcryo.reconstruct.reconstruct` for particle sets larger than memory: the same
    driver and settings (``**settings``: any of reconstruct's keyword arguments, e.g. method,
    epochs, batch_size, wiener_after, noise_model, resume, callback, progress), fed
    :class:`StreamedBlocks` of about ``chunk_size`` images read from disk for every pass.

    Each epoch visits each half-set's particles in a fresh random order, cut into equal blocks;
    the running mean of the iterates, the exact-diagonal start of the Hutchinson estimate, the
    noise model and the Wiener prior are those of the in-memory run (sums over the blocks; each
    costs one more pass over the disk when it is computed). With ``chunk_size`` at least the set
    the run is the in-memory one; with smaller blocks only the minibatches differ (drawn within
    blocks). Memory: :func:`plan_streaming_bytes`.
    """
    source = StreamedBlocks(table, stack, FourierGrid(box), chunk_size=chunk_size, prefetch=prefetch)
    return reconstruct(source, box=box, pixel_size_angstrom=pixel_size_angstrom, **settings)


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
