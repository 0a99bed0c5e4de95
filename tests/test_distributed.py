"""Data parallelism gives the single-device answer on any number of devices and processes.

Device counts need a fresh process (XLA_FLAGS=--xla_force_host_platform_device_count=D is
read once, at start-up), so each run is a subprocess executing this file as a script: it
loads one shared simulated data set, reconstructs with each method and saves the map, the
per-epoch losses and the diagonal estimate. The particle count, 2*3*4*3 + 1 = 73, is divided
by no device count (nor is either half-set, 37 and 36, nor the batch, 16, by 3).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

N_PARTICLES = 2 * 3 * 4 * 3 + 1
BOX, PIXEL_ANGSTROM, BATCH, EPOCHS = 12, 3.0, 16, 2
METHODS = ("psgd", "psgd-exact")
HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


# ------------------------------------------------------------------ the worker (a script)

def _particles(data_path):
    import jaxcryo as jc
    from jaxcryo.forward.ctf import CTFParams
    z = np.load(data_path)
    ctf = CTFParams(*(z[f"ctf_{f}"] for f in CTFParams._fields))
    # two noise groups: the noise model is estimated per group from rows sharded over devices
    return jc.prepare_particles(z["images"], z["rotations"], z["shifts_px"], ctf, jc.FourierGrid(BOX),
                                noise_group=np.arange(len(z["images"])) % 2)


def _check_gather(particles):
    """Each device's slice of a minibatch is bitwise the single-device rows (padding included)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from jaxcryo import distributed as dist
    from jaxcryo.loss import subset
    from jaxcryo.reconstruct import half_sets

    mesh = dist.make_mesh()
    groups = half_sets(N_PARTICLES, seed=0)
    stacked = dist.shard_groups(particles, groups, mesh)
    d = dist.n_devices(mesh)
    index = np.array([5, -1, 36, 0, 17, 30, 2, -1, 11, 35, 20, 8], np.int64)  # 12: any D in 1..4
    want = subset(jax.tree.map(lambda x: x[1], _stack_np(particles, groups)), jnp.asarray(index))
    got = jax.jit(dist.shard(lambda p, i: dist.gather_batch(jax.tree.map(lambda x: x[1], p), i), mesh,
                             in_specs=(P(None, dist.AXIS), P()), out_specs=P(dist.AXIS)))(stacked, jnp.asarray(index))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "gathered rows differ"
    weight = float(np.asarray(stacked.weight).sum())
    assert weight == N_PARTICLES, f"sharded half-sets hold weight {weight}, not {N_PARTICLES}"
    assert stacked.weight.shape[1] % d == 0
    return True


def _stack_np(particles, groups):
    from jaxcryo.reconstruct import _stack_groups
    return _stack_groups(particles, groups)


def worker(argv):
    """argv: data.npz out_dir [coordinator num_processes process_id]."""
    data_path, out_dir = argv[:2]
    import jax
    from jaxcryo import distributed as dist
    from jaxcryo.reconstruct import reconstruct

    multi = len(argv) > 2
    if multi:
        assert dist.initialize(argv[2], int(argv[3]), int(argv[4]))
    particles = _particles(data_path)
    mesh = dist.make_mesh() if multi else None
    share = None
    if multi:
        share = dist.host_share(N_PARTICLES, mesh=mesh, halves=True, seed=0)
        particles = jax.tree.map(lambda x: np.asarray(x)[share.rows], particles)
    report = {"devices": jax.device_count(), "processes": jax.process_count(),
              "rows_read": int(particles.weight.shape[0])}
    if not multi and jax.device_count() > 1:
        report["gather_exact"] = _check_gather(particles)
    for method in METHODS:
        r = reconstruct(particles, box=BOX, pixel_size_angstrom=PIXEL_ANGSTROM, method=method, epochs=EPOCHS,
                        batch_size=BATCH, seed=0, mesh=mesh, share=share)
        diag = r.state.opt_state[0].diag if method.startswith("psgd") else np.zeros(1)
        if jax.process_index() == 0:
            np.savez(os.path.join(out_dir, f"{method}.npz"), volume=r.volume, params=np.asarray(r.params),
                     loss=np.asarray(r.history["loss"]), diag=np.asarray(diag))
    with open(os.path.join(out_dir, f"report{jax.process_index()}.json"), "w") as f:
        json.dump(report, f)


# ------------------------------------------------------------------ the tests

def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait(procs, timeout=240):
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out.decode()[-4000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import jax
    import jaxcryo as jc
    with jax.default_device(jax.devices("cpu")[0]):
        truth = jc.synthetic_molecule(BOX, pixel_size_angstrom=PIXEL_ANGSTROM)
        sim = jc.simulate_particles(truth, N_PARTICLES, pixel_size_angstrom=PIXEL_ANGSTROM, snr=1.0, seed=1,
                                    interpolation="trilinear")
    path = tmp_path_factory.mktemp("distributed") / "data.npz"
    np.savez(path, images=sim.images, rotations=sim.rotations, shifts_px=sim.shifts_angstrom / PIXEL_ANGSTROM,
             **{f"ctf_{f}": np.asarray(v) for f, v in zip(sim.ctf._fields, sim.ctf)})
    return path


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One subprocess per device count 1..4, run side by side."""
    outs, procs = {}, []
    for d in (1, 2, 3, 4):
        outs[d] = tmp_path_factory.mktemp(f"devices{d}")
        procs.append(subprocess.Popen([sys.executable, HERE, str(data), str(outs[d])], env=_env(d), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    _wait(procs)
    return outs


def _close(ref, other, what):
    # float32 rounding only: the sums are the same terms added in another order
    for key, rtol in (("volume", 2e-5), ("params", 2e-5), ("loss", 2e-6), ("diag", 2e-5)):
        a, b = ref[key], other[key]
        scale = np.abs(a).max() + 1e-30
        err = np.abs(a - b).max() / scale
        assert err < rtol, f"{what}: {key} differs by {err:.2e} of its largest value"


@pytest.mark.parametrize("devices", [2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
def test_device_counts_agree_with_one_device(runs, devices, method):
    ref = np.load(runs[1] / f"{method}.npz")
    other = np.load(runs[devices] / f"{method}.npz")
    assert ref["loss"].shape == (EPOCHS,)
    assert np.all(np.diff(ref["loss"]) < 0), "the loss should fall over the two epochs"
    _close(ref, other, f"{method} on {devices} devices")


@pytest.mark.parametrize("devices", [2, 3, 4])
def test_each_device_gets_exactly_the_single_device_rows(runs, devices):
    report = json.loads((runs[devices] / "report0.json").read_text())
    assert report["devices"] == devices and report["gather_exact"] is True


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(data, runs, tmp_path):
    """jax.distributed on 127.0.0.1: two processes of two CPU devices each (4 in all)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, HERE, str(data), str(tmp_path), coordinator, "2", str(i)],
                              env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    _wait(procs)
    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(2)]
    assert all(r["processes"] == 2 and r["devices"] == 4 for r in reports)
    # each process read only its share of the rows (about half), and together all of them
    assert all(r["rows_read"] < N_PARTICLES for r in reports)
    assert sum(r["rows_read"] for r in reports) >= N_PARTICLES
    for method in METHODS:
        _close(np.load(runs[1] / f"{method}.npz"), np.load(tmp_path / f"{method}.npz"), f"{method}, 2 processes")


# ------------------------------------------------------------------ in-process unit tests

def test_slurm_settings():
    from jaxcryo.distributed import slurm_settings
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "4097"}
    host, port = slurm_settings(env)[0].split(":")
    assert host == "gpu07" and slurm_settings(env)[1:] == (4, 2)
    assert 61440 <= int(port) <= 65535
    assert slurm_settings({**env, "SLURM_STEP_NODELIST": "node3,node4"})[0].startswith("node3:")
    assert slurm_settings({**env, "SLURM_NTASKS": "1"}) is None
    assert slurm_settings({}) is None


def test_initialize_needs_all_three_settings():
    from jaxcryo.distributed import initialize
    with pytest.raises(ValueError, match="together"):
        initialize("127.0.0.1:1234", num_processes=2)
    assert initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing to start


def test_host_share_and_missing_rows():
    import jax
    from jaxcryo import distributed as dist
    from jaxcryo.reconstruct import half_sets
    mesh = dist.make_mesh(1)
    share = dist.host_share(N_PARTICLES, mesh=mesh, seed=0)
    assert np.array_equal(share.rows, np.arange(N_PARTICLES)) and share.n_total == N_PARTICLES
    groups = half_sets(N_PARTICLES, seed=0)
    assert sorted(groups[groups >= 0]) == list(range(N_PARTICLES))
    import jax.numpy as jnp
    from jaxcryo.forward.model import Particles
    p = Particles(jnp.zeros((5, 3, 2)), jnp.zeros((5, 3, 3)), None, jnp.ones(5))
    bad = dist.HostShare(rows=np.arange(5), n_total=N_PARTICLES)
    with pytest.raises(ValueError, match="host_share"):
        dist.shard_groups(p, groups, mesh, bad)
    with pytest.raises(ValueError, match="local devices"):
        dist.make_mesh(jax.local_device_count() + 1)


if __name__ == "__main__":
    worker(sys.argv[1:])
