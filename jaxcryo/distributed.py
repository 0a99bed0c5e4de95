"""Data parallelism over particles with JAX's own machinery: a Mesh, NamedSharding, shard_map.

The design, and why it gives the single-device answer on any number of devices:

* The particle axis is sharded over a 1-D mesh (axis :data:`AXIS`); each device holds a
  contiguous block of rows, the set padded with zero-weight rows to a multiple of the device
  count (no particle is dropped). The volume and the optimizer state are replicated: a map of
  box N costs N^3 * 4 bytes per float32 copy (1 GB at N = 640), small beside the particles.
* A minibatch is defined without reference to devices: the epoch's permutation of the rows is
  drawn from the replicated key on every device, and step s uses rows perm[sB:(s+1)B], exactly
  as on one device. Each device then takes an equal B/D slice of those rows (balanced work):
  every device writes the rows of the batch it owns into a (B, ...) buffer of zeros and one
  ``psum_scatter`` hands each device its slice. Adding zeros is exact, so each device gets the
  very images, poses and CTFs the single-device step would use.
* Losses, gradients and Hessian-vector products are sums over images: each device computes
  its partial sum (normalised by the batch's total weight, itself a ``psum``), and one ``psum``
  combines them. Only the order of float additions differs from one device, so results agree
  to float rounding; the optimizer (Armijo search included) then runs replicated.

The traffic per step is one reduce-scatter of the batch's images and one all-reduce of the
volume-sized gradient and HVPs (the latter is what any data-parallel scheme pays).

On several hosts, :func:`initialize` starts ``jax.distributed`` (from arguments or SLURM's
environment), :func:`make_mesh` spans every process's devices, and :func:`host_share` names
the STAR rows one process must read: those its own devices hold.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcryo.curvature import exact_diagonal
from jaxcryo.forward.model import Particles
from jaxcryo.loss import Problem, loss, subset, value_grad_hvp

AXIS = "particles"

__all__ = ["AXIS", "HostShare", "split_halves", "half_sets", "initialize", "slurm_settings", "make_mesh", "mesh_for",
           "n_devices", "host_share", "shard_groups", "replicate", "to_local", "gather_batch",
           "value_grad_hvp_psum", "sharded_exact_diagonal", "shard"]


# ---------------------------------------------------------------- processes and meshes

def _first_host(nodelist: str) -> str:
    """First host name of a SLURM node list, e.g. 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if m is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_settings(environ=None) -> tuple[str, int, int] | None:
    """(coordinator 'host:port', number of processes, this process's id) from SLURM's
    environment (one process per task), or None outside an ``srun`` step with several tasks.

    The coordinator is the first node of the step; the port is derived from the job id, as
    ``jax.distributed`` does, so every task computes the same address without talking.
    """
    env = os.environ if environ is None else environ
    ntasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST")))
    if ntasks is None or int(ntasks) <= 1 or nodelist is None or "SLURM_PROCID" not in env:
        return None
    port = int(env.get("SLURM_JOB_ID", "0")) % 2**12 + (65535 - 2**12 + 1)
    return f"{_first_host(nodelist)}:{port}", int(ntasks), int(env["SLURM_PROCID"])


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None) -> bool:
    """Start ``jax.distributed`` for a multi-host run; call before any other JAX call.

    Settings come from the arguments (all three together), else from SLURM's environment
    (:func:`slurm_settings`); with neither, or one process, nothing is started.

    Args:
      coordinator: 'host:port' of process 0, reachable from every process.
      num_processes, process_id: how many processes in all, and which one this is (0-based).
      local_device_ids: devices this process uses (default: all it sees).
    Returns:
      True when several processes were joined.
    """
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("coordinator, num_processes and process_id must be given together "
                         f"(got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r})")
    settings = (coordinator, int(num_processes), int(process_id)) if all(given) else slurm_settings()
    if settings is None or settings[1] <= 1:
        return False
    jax.distributed.initialize(coordinator_address=settings[0], num_processes=settings[1],
                               process_id=settings[2], local_device_ids=local_device_ids)
    return True


def make_mesh(devices: int | Sequence | None = None) -> Mesh:
    """A 1-D mesh over the particle axis.

    Args:
      devices: None for every device of every process; an int N for the first N local
        devices of each process; or an explicit sequence of devices.
    """
    if devices is None:
        chosen = jax.devices()
    elif isinstance(devices, int):
        if devices < 1 or devices > jax.local_device_count():
            raise ValueError(f"devices must be between 1 and {jax.local_device_count()} "
                             f"(the local devices of this process), got {devices}")
        chosen = [d for p in range(jax.process_count())
                  for d in [x for x in jax.devices() if x.process_index == p][:devices]]
    else:
        chosen = list(devices)
    return Mesh(np.asarray(chosen), (AXIS,))


def mesh_for(devices: int | None = None, mesh: Mesh | None = None) -> Mesh | None:
    """The mesh a driver runs on: ``mesh``, else one over ``devices`` local devices (default:
    all) when there are several or several processes; None for one device of one process (the
    plain path, no collectives)."""
    if mesh is None and (jax.process_count() > 1 or (devices or jax.local_device_count()) > 1):
        mesh = make_mesh(devices)
    if mesh is not None and jax.process_count() == 1 and n_devices(mesh) == 1:
        mesh = None
    return mesh


def n_devices(mesh: Mesh | None) -> int:
    """Devices along the particle axis (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[AXIS])


# ---------------------------------------------------------------- placing the particles

class HostShare(NamedTuple):
    """The rows of the full particle set that this process holds.

    rows: sorted global row indices (into the STAR file's particles) this process must read;
    n_total: rows in the full set.
    """

    rows: np.ndarray
    n_total: int


def split_halves(key, n: int, halves: bool = True) -> np.ndarray:
    """Index arrays (G, m) of each half-set (G = 2, or 1 without halves), padded with -1."""
    if not halves:
        return np.arange(n)[None]
    perm = np.asarray(jax.jit(lambda k: jax.random.permutation(k, n))(key))  # eager: ~10 compiles
    m = -(-n // 2)
    out = -np.ones((2, m), np.int64)
    out[0, :m] = perm[:m]
    out[1, : n - m] = perm[m:]
    return out


def half_sets(n: int, *, halves: bool = True, seed: int = 0) -> np.ndarray:
    """(G, m) particle indices of each half-set (-1 pads), as the driver
    (:func:`jaxcryo.reconstruct.reconstruct`) draws them from ``seed``."""
    split_key, _ = jax.random.split(jax.random.PRNGKey(seed))
    return split_halves(split_key, n, halves)


def _padded_rows(m: int, d: int) -> int:
    return -(-m // d) * d


def _process_positions(mesh: Mesh, m_padded: int) -> np.ndarray:
    """Row positions (along the sharded axis) held by this process's devices."""
    per = m_padded // n_devices(mesh)
    mine = [k for k, dev in enumerate(mesh.devices.flat) if dev.process_index == jax.process_index()]
    return np.concatenate([np.arange(k * per, (k + 1) * per) for k in mine]) if mine else np.zeros(0, int)


def host_share(n_total: int, *, mesh: Mesh, halves: bool = True, seed: int = 0) -> HostShare:
    """The STAR rows this process must read for ``reconstruct(..., mesh=mesh, share=...)``.

    The split into half-sets is drawn from ``seed`` exactly as :func:`jaxcryo.reconstruct`
    draws it, so every process agrees without communication; a process then needs only the
    particles its own devices hold (about n_total / process_count of them).
    """
    groups = half_sets(n_total, halves=halves, seed=seed)
    m_padded = _padded_rows(groups.shape[1], n_devices(mesh))
    pos = _process_positions(mesh, m_padded)
    pos = pos[pos < groups.shape[1]]
    rows = np.unique(groups[:, pos])
    return HostShare(rows=rows[rows >= 0], n_total=int(n_total))


def shard_groups(particles: Particles, groups: np.ndarray, mesh: Mesh,
                 share: HostShare | None = None) -> Particles:
    """Half-sets (G, m') of particles, sharded along the rows over ``mesh``.

    Args:
      particles: the full set (share None) or this process's rows ``share.rows`` in order.
      groups: (G, m) global particle index of each half-set position, -1 for padding.
    Returns:
      Particles with leaves (G, m', ...), m' = m rounded up to a multiple of the device count;
      extra rows repeat particle 0 with weight 0 (as :func:`jaxcryo.loss.subset` pads). Each
      device's block is built on the host from numpy and placed directly on that device, so the
      whole set never sits on one device.
    """
    g, m = groups.shape
    m_padded = _padded_rows(m, n_devices(mesh))
    full = -np.ones((g, m_padded), np.int64)
    full[:, :m] = groups
    if share is None:
        lookup = full
    else:
        rows = np.asarray(share.rows)
        loc = np.searchsorted(rows, np.maximum(full, 0))
        loc = np.minimum(loc, len(rows) - 1)
        needed = _process_positions(mesh, m_padded)
        have = rows[loc[:, needed]] == np.maximum(full[:, needed], 0)
        # padding rows copy particle 0; a process need not hold it, any held row will do
        have |= full[:, needed] < 0
        if not have.all():
            raise ValueError("particles does not hold every row this process's devices need: "
                             "pass the rows of distributed.host_share(...) for this mesh, halves and seed")
        lookup = np.where(full < 0, -1, loc)
    sharding = NamedSharding(mesh, P(None, AXIS))
    leaves, treedef = jax.tree.flatten(particles)
    n_rows = particles.weight.shape[0]
    host = [np.broadcast_to(np.asarray(x), (n_rows,) + np.shape(x)[1:]) for x in leaves]
    weight_leaf = jax.tree.unflatten(treedef, range(len(leaves))).weight  # padding rows get weight 0
    out = []
    for j, x in enumerate(host):
        def block(index, x=x, j=j):
            idx = lookup[index[:2]]
            taken = x[np.maximum(idx, 0)]
            if j == weight_leaf:
                taken = np.where(idx >= 0, taken, 0).astype(x.dtype)
            return taken
        out.append(jax.make_array_from_callback((g, m_padded) + x.shape[1:], sharding, block))
    return jax.tree.unflatten(treedef, out)


def replicate(tree, mesh: Mesh):
    """Place a pytree (identical on every process) replicated over the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                                               lambda i, x=np.asarray(x): x[i]), tree)


def to_local(tree):
    """Replicated global arrays -> ordinary single-device arrays (readable by numpy on every
    process); arrays that are already fully addressable are returned as they are."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x
    return jax.tree.map(one, tree)


# ---------------------------------------------------------------- inside shard_map

def gather_batch(local: Particles, index, axis_name: str = AXIS) -> Particles:
    """This device's slice of a global minibatch (call inside ``shard_map``).

    Args:
      local: this device's block of rows (n_local, ...); device k holds rows
        [k n_local, (k+1) n_local).
      index: (B,) global rows of the minibatch, -1 for padding; B a multiple of the device count.
    Returns:
      Particles of B / D rows: positions [k B/D, (k+1) B/D) of the batch, exactly the rows
      ``subset(all_particles, index)`` would give there (padding: particle 0, weight 0).
    """
    n_local = local.weight.shape[0]
    safe = jnp.maximum(index, 0)
    row = safe - jax.lax.axis_index(axis_name) * n_local
    mine = (row >= 0) & (row < n_local)
    taken = subset(local, jnp.where(mine, row, 0))
    taken = taken._replace(weight=jnp.where(index >= 0, taken.weight, 0).astype(taken.weight.dtype))

    def keep_mine(x):
        return jnp.where(mine.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))

    # exactly one device holds each row: the sum of its values and zeros is exact
    return jax.tree.map(lambda x: jax.lax.psum_scatter(keep_mine(x), axis_name, scatter_dimension=0, tiled=True),
                        taken)


def value_grad_hvp_psum(params, batch: Particles, problem: Problem, probes=None, axis_name: str = AXIS, *,
                        regularizer=None):
    """:func:`jaxcryo.loss.value_grad_hvp` of a minibatch split over devices (inside shard_map).

    ``batch`` is this device's part; returns the loss, gradient and HVPs of the whole minibatch
    (replicated), and the minibatch loss as a function of the parameters (for line searches).
    ``regularizer`` (scalar or (N, N, H, 1)) replaces the problem's Tikhonov weights.
    """
    weight_total = jax.lax.psum(jnp.sum(batch.weight.astype(params.dtype)), axis_name)
    data = problem.data_only()
    value, grad, hvps = value_grad_hvp(params, batch, data, probes, weight_total=weight_total)
    value, grad, hvps = jax.lax.psum((value, grad, hvps), axis_name)
    lam = problem.regularizer(params.dtype) if regularizer is None else regularizer
    value = value + jnp.sum(lam * params * params)
    grad = grad + 2.0 * lam * params
    if hvps is not None:
        hvps = hvps + 2.0 * lam * probes

    def value_fn(p):
        part = loss(p, batch, data, weight_total=weight_total)
        return jax.lax.psum(part, axis_name) + jnp.sum(lam * p * p)

    return value, grad, hvps, value_fn


def sharded_exact_diagonal(local: Particles, problem: Problem, batch_size: int, dtype,
                           axis_name: str = AXIS):
    """Exact full-data diag(H) from this device's rows (inside shard_map)."""
    w_local = jnp.sum(local.weight.astype(dtype))
    part = exact_diagonal(local, problem.data_only(), int(min(batch_size, local.weight.shape[0])), dtype)
    num, w = jax.lax.psum((w_local * part, w_local), axis_name)
    return num / jnp.maximum(w, 1e-12) + 2.0 * problem.regularizer(dtype)


def shard(fn, mesh: Mesh, in_specs, out_specs):
    """``shard_map`` over the particle axis (replication checks off: the optimizer's state is
    replicated by construction, every value it reads being a psum)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
