"""cryoSPARC .cs particle files: conventions checked by projection, round trips, the CLI, bad input."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from jaxcryo import cli
from jaxcryo.forward import FourierGrid, render, volume_to_ft
from jaxcryo.geometry import euler_to_matrix
from jaxcryo.io import InputError, make_table, read_map, read_particles, write_map, write_particles, write_stack
from jaxcryo.io.cryosparc import euler_to_pose, pose_to_euler, read_cs, write_cs
from jaxcryo.pipeline import load_particles, open_particles, read_table, table_poses
from jaxcryo.simulate import simulate_particles, synthetic_molecule

BOX, N, PX = 20, 48, 3.0
FAST = ["--epochs", "2", "--batch-size", "24", "--quiet", "--wiener-after", "0"]


def random_euler(rng, n):
    return np.stack([rng.uniform(-180, 180, n), np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
                     rng.uniform(-180, 180, n)], -1)


def correlation(a, b):
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return np.sum(a * b, 1) / np.sqrt(np.sum(a * a, 1) * np.sum(b * b, 1))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A cryoSPARC-like project: stacks in J1/extract/, the .cs in J2/, the same set as a RELION STAR.

    Noise-free particles simulated in RELION's convention (poses, origins, CTF), converted to
    .cs with write_cs (the inverse mapping).
    """
    root = tmp_path_factory.mktemp("csproject")
    volume = synthetic_molecule(BOX, pixel_size_angstrom=PX, atom_sigma_angstrom=4.0, seed=3)
    sim = simulate_particles(volume, N, pixel_size_angstrom=PX, snr=0.0, seed=1, max_shift_px=2.0,
                             interpolation="trilinear")
    (root / "J1" / "extract").mkdir(parents=True)
    (root / "J2").mkdir()
    stack = root / "J1" / "extract" / "particles.mrcs"
    write_stack(stack, sim.images, pixel_size_angstrom=PX)
    ctf = sim.ctf
    table = make_table(stack_paths=str(stack), stack_indices=np.arange(N), pixel_size_angstrom=PX,
                       euler_deg=sim.euler_deg, shifts_angstrom=sim.shifts_angstrom,
                       defocus_u_angstrom=np.asarray(ctf.defocus_u_angstrom, np.float64),
                       defocus_v_angstrom=np.asarray(ctf.defocus_v_angstrom, np.float64),
                       defocus_angle_deg=np.asarray(ctf.defocus_angle_deg, np.float64),
                       voltage_kv=np.asarray(ctf.voltage_kv, np.float64), cs_mm=np.asarray(ctf.cs_mm, np.float64),
                       amplitude_contrast=np.asarray(ctf.amplitude_contrast, np.float64), box_size=BOX)
    write_particles(root / "particles.star", table)
    write_cs(root / "J2" / "particles.cs", table, project_dir=root)
    write_map(root / "truth.mrc", volume, voxel_size_angstrom=PX)
    return root, table, sim, volume


# ----------------------------------------------------------------------------- conventions


def test_pose_is_the_transpose_of_relions_matrix():
    """cryoDRGN/pyem: RELION's Euler_angles2matrix = Rodrigues(pose).T (scipy's rotvec as the twin)."""
    rng = np.random.default_rng(0)
    euler = random_euler(rng, 200)
    pose = euler_to_pose(euler)
    relion = np.asarray(euler_to_matrix(euler), np.float64)
    np.testing.assert_allclose(Rotation.from_rotvec(pose).as_matrix().transpose(0, 2, 1), relion, atol=2e-6)
    # a rotation about z by theta is RELION's rot (or psi, at tilt 0) = theta, in degrees
    e = pose_to_euler(np.array([[0.0, 0.0, 0.7]]))
    assert e[0, 1] == pytest.approx(0.0, abs=1e-9)
    assert e[0, 0] + e[0, 2] == pytest.approx(np.rad2deg(0.7))
    # and back: angles (tilt in (0, 180)) survive the round trip exactly
    np.testing.assert_allclose(pose_to_euler(pose), euler, atol=1e-9)


def test_rotvec_round_trip_near_pi_and_zero():
    rng = np.random.default_rng(1)
    axes = rng.standard_normal((50, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([np.full(20, np.pi), np.pi - 10.0 ** -rng.uniform(3, 9, 20), np.zeros(5),
                             10.0 ** -rng.uniform(6, 12, 5)])
    pose = axes * angles[:, None]
    back = euler_to_pose(pose_to_euler(pose))
    np.testing.assert_allclose(Rotation.from_rotvec(back).as_matrix(), Rotation.from_rotvec(pose).as_matrix(),
                               atol=1e-7)  # Euler angles near tilt 0 cost ~1e-9


def _brute_force_projection(coefficients, rotation):
    """Real-space projection: image(x, y) = sum_z V(rotation @ (x, y, z)), V indexed [z, y, x] and
    given by its cubic-spline coefficients."""
    n = coefficients.shape[0]
    c = n // 2
    z = np.arange(-c, n - c, 1.0)
    y, x = np.meshgrid(np.arange(-c, n - c), np.arange(-c, n - c), indexing="ij")
    xyz = np.stack(np.broadcast_arrays(x[..., None], y[..., None], z), -1)  # (y, x, z, 3)
    p = xyz @ rotation.T
    coords = np.stack([p[..., 2], p[..., 1], p[..., 0]]) + c
    return ndimage.map_coordinates(coefficients, coords, order=3, mode="constant", prefilter=False).sum(-1)


def test_cs_poses_project_like_cryodrgn_convention():
    """The projection of a .cs pose, computed independently in real space as cryoDRGN defines it
    (3-D point = Rodrigues(pose) @ (x, y, z)), matches jaxcryo's Fourier projection at the RELION
    angles read from the .cs file; the untransposed rotation does not."""
    box = 20
    volume = synthetic_molecule(box, pixel_size_angstrom=PX, atom_sigma_angstrom=5.0, seed=2)
    pose = Rotation.random(5, random_state=3).as_rotvec()
    euler = pose_to_euler(pose)
    grid = FourierGrid(box, box // 2)
    vft = volume_to_ft(jnp.asarray(volume), "trilinear")
    draw = jax.jit(lambda r: render(vft, r, jnp.zeros((len(pose), 2), jnp.float32), None, grid, "trilinear"))
    rendered = np.asarray(draw(jnp.asarray(euler_to_matrix(euler), jnp.float32)))
    rodrigues = Rotation.from_rotvec(pose).as_matrix()
    coefficients = ndimage.spline_filter(volume.astype(np.float64), order=3)
    right = np.stack([_brute_force_projection(coefficients, r) for r in rodrigues])
    wrong = np.stack([_brute_force_projection(coefficients, r.T) for r in rodrigues])
    assert correlation(rendered, right).min() > 0.99
    assert correlation(rendered, wrong).mean() < 0.9


def test_cs_shift_is_in_pixels_of_the_alignment(tmp_path):
    """alignments3D/shift is in pixels of alignments3D/psize_A, with rlnOriginX/Y's sign: after the
    stacks are downsampled 2x (blob/psize_A doubled) the shift in Å is unchanged, in pixels halved."""
    rng = np.random.default_rng(4)
    table = make_table(stack_paths=str(tmp_path / "s.mrcs"), stack_indices=np.arange(5), pixel_size_angstrom=1.5,
                       euler_deg=random_euler(rng, 5), shifts_angstrom=rng.uniform(-6, 6, (5, 2)))
    write_cs(tmp_path / "p.cs", table)
    data = np.load(tmp_path / "p.cs")
    np.testing.assert_allclose(data["alignments3D/shift"], table.shifts_angstrom / 1.5, rtol=1e-6)
    data["blob/psize_A"] = 3.0
    np.save(tmp_path / "p.npy", data)
    os.replace(tmp_path / "p.npy", tmp_path / "p.cs")
    back = read_cs(tmp_path / "p.cs")
    np.testing.assert_allclose(back.shifts_angstrom, table.shifts_angstrom, rtol=1e-6)
    np.testing.assert_allclose(table_poses(back, dtype=np.float64)[1], table.shifts_angstrom / 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------- round trips and the pipeline


def test_relion_to_cs_to_relion_round_trip(project):
    root, table, sim, _ = project
    back = read_cs(root / "J2" / "particles.cs")
    assert back.has_ctf and len(back) == N
    np.testing.assert_array_equal(back.stack_paths, table.stack_paths)  # found via the project folder
    np.testing.assert_array_equal(back.stack_indices, np.arange(N))
    np.testing.assert_allclose(np.asarray(euler_to_matrix(back.euler_deg)), np.asarray(euler_to_matrix(table.euler_deg)),
                               atol=2e-6)
    np.testing.assert_allclose(back.shifts_angstrom, table.shifts_angstrom, atol=1e-5)
    for name in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv", "cs_mm",
                 "amplitude_contrast", "pixel_size_angstrom", "phase_shift_deg"):
        np.testing.assert_allclose(getattr(back, name), getattr(table, name), rtol=1e-6, atol=1e-5, err_msg=name)
    assert (back.box_size == BOX).all() and (back.optics_group == 1).all()
    # and .cs -> STAR -> read gives the same table again
    write_particles(root / "again.star", back)
    again = read_particles(root / "again.star")
    np.testing.assert_allclose(again.euler_deg, back.euler_deg)
    np.testing.assert_allclose(again.shifts_angstrom, back.shifts_angstrom)


def test_projections_at_cs_poses_match_the_images(project):
    """Rendering the truth at the poses, shifts and CTF read from the .cs gives the images."""
    root, _, sim, volume = project
    table, stack = open_particles(root / "J2" / "particles.cs")
    with stack:
        images = stack.read(np.arange(N))
    rotations, shifts_px, ctf = table_poses(table)
    grid = FourierGrid(BOX, BOX // 2)
    vft = volume_to_ft(jnp.asarray(volume), "trilinear")
    draw = jax.jit(lambda r, s, c: render(vft, r, s, c, grid, "trilinear"))
    drawn = np.asarray(draw(jnp.asarray(rotations), jnp.asarray(shifts_px), ctf))
    assert correlation(drawn, images).min() > 0.99
    # the shift sign matters: flipping it breaks the match
    flipped = np.asarray(draw(jnp.asarray(rotations), -jnp.asarray(shifts_px), ctf))
    assert correlation(flipped, images).mean() < correlation(drawn, images).mean() - 0.05


def _moved_cs(root, tmp_path):
    """The project's .cs with blob/path pointing at a job folder that is not there (cryoSPARC's '>' kept)."""
    data = np.load(root / "J2" / "particles.cs")
    new = data.astype([(name, ("S64" if name == "blob/path" else data.dtype.fields[name][0]))
                       for name in data.dtype.names])
    new["blob/path"] = b">J9/extract/particles.mrcs"
    cs = tmp_path / "moved.cs"
    with open(cs, "wb") as fh:
        np.save(fh, new)
    return cs


def test_cs_and_star_give_the_same_particles_and_reconstruct_runs(project, tmp_path, capsys):
    """The driver's input from the .cs equals that from the STAR file (so the maps are the same;
    reconstruct is deterministic), and `jaxcryo reconstruct particles.cs --datadir DIR` runs."""
    root, *_ = project
    cs = _moved_cs(root, tmp_path)
    grid = FourierGrid(BOX)
    parts = []
    for source, datadir in ((cs, root / "J1" / "extract"), (root / "particles.star", None)):
        table, stack = open_particles(source, datadir=datadir)
        with stack:
            parts.append(load_particles(table, stack, grid))
    a, b = parts
    np.testing.assert_allclose(a.data, b.data, atol=2e-5 * np.abs(b.data).max())
    np.testing.assert_allclose(a.rotations, b.rotations, atol=2e-6)
    for x, y in zip(a.ctf, b.ctf):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    out = tmp_path / "rec" / "map.mrc"
    out.parent.mkdir()
    assert cli.main(["reconstruct", str(cs), "--datadir", str(root / "J1" / "extract"), "--out", str(out),
                     *FAST, "--no-halves"]) == 0
    rec, _ = read_map(out)
    truth, _ = read_map(root / "truth.mrc")
    assert correlation(rec[None], truth[None])[0] > 0.5  # 48 noise-free CTF images, 2 epochs: ~0.64


def test_project_and_condition_take_cs(project, tmp_path, capsys):
    root, *_ = project
    cs = root / "J2" / "particles.cs"
    fast = ["--quiet", "--interpolation", "trilinear"]
    code = cli.main(["project", str(root / "truth.mrc"), "--star", str(cs), "--out", str(tmp_path / "p_cs.mrcs"),
                     *fast])
    assert code == 0
    assert cli.main(["project", str(root / "truth.mrc"), "--star", str(root / "particles.star"),
                     "--out", str(tmp_path / "p_star.mrcs"), *fast]) == 0
    import mrcfile
    with mrcfile.open(tmp_path / "p_cs.mrcs") as f1, mrcfile.open(tmp_path / "p_star.mrcs") as f2:
        assert correlation(np.asarray(f1.data), np.asarray(f2.data)).min() > 0.9999
    reports = []
    for name, source in (("cs", cs), ("star", root / "particles.star")):
        assert cli.main(["condition", str(source), "--out", str(tmp_path / name), "--box", "8"]) == 0
        reports.append(json.loads((tmp_path / name / "condition.json").read_text()))
    assert reports[0]["with_ctf"] and reports[1]["with_ctf"]
    np.testing.assert_allclose(reports[0]["kappa"], reports[1]["kappa"], rtol=1e-4)


def test_heterogeneous_refinement_takes_the_most_likely_class(tmp_path):
    rng = np.random.default_rng(5)
    n, k = 6, 3
    poses = Rotation.random(n * k, random_state=6).as_rotvec().reshape(n, k, 3)
    shifts = rng.uniform(-3, 3, (n, k, 2))
    posterior = rng.dirichlet(np.ones(k), n)
    data = np.zeros(n, dtype=[("blob/path", "S8"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"),
                              ("alignments3D_multi/pose", "<f4", (k, 3)), ("alignments3D_multi/shift", "<f4", (k, 2)),
                              ("alignments3D_multi/class_posterior", "<f4", (k,)),
                              ("alignments3D_multi/psize_A", "<f4")])
    data["blob/path"], data["blob/idx"], data["blob/psize_A"] = b"s.mrcs", np.arange(n), 1.0
    data["alignments3D_multi/pose"], data["alignments3D_multi/shift"] = poses, shifts
    data["alignments3D_multi/class_posterior"], data["alignments3D_multi/psize_A"] = posterior, 2.0
    np.save(tmp_path / "het.npy", data)
    os.replace(tmp_path / "het.npy", tmp_path / "het.cs")
    table = read_cs(tmp_path / "het.cs")
    best = posterior.argmax(1)
    np.testing.assert_allclose(table.euler_deg, pose_to_euler(poses[np.arange(n), best].astype(np.float32)),
                               atol=1e-9)
    np.testing.assert_allclose(table.shifts_angstrom, 2.0 * shifts[np.arange(n), best].astype(np.float32), rtol=1e-6)
    assert not table.has_ctf


# ----------------------------------------------------------------------------- paths


def test_stack_paths_resolve_via_datadir_and_leading_marker(project, tmp_path):
    root, *_ = project
    cs = _moved_cs(root, tmp_path)
    assert read_cs(cs).image_names[0] == "1@J9/extract/particles.mrcs"
    with pytest.raises(InputError, match="row 1, blob/path 'J9/extract/particles.mrcs'.*--datadir"):
        open_particles(cs)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    os.symlink(root / "J1" / "extract" / "particles.mrcs", moved / "particles.mrcs")
    table, stack = open_particles(cs, datadir=moved)
    with stack:
        assert table.stack_paths[0] == str(moved / "particles.mrcs") and stack.box_size == BOX
    # datadir/blob_path is tried before datadir/basename
    (tmp_path / "J9" / "extract").mkdir(parents=True)
    os.symlink(root / "J1" / "extract" / "particles.mrcs", tmp_path / "J9" / "extract" / "particles.mrcs")
    assert read_table(cs, datadir=tmp_path).stack_paths[0] == str(tmp_path / "J9" / "extract" / "particles.mrcs")


# ----------------------------------------------------------------------------- bad input


def _write_fields(path, **fields):
    n = len(next(iter(fields.values())))
    dtype = [(name, value.dtype, value.shape[1:]) for name, value in fields.items()]
    data = np.zeros(n, dtype=dtype)
    for name, value in fields.items():
        data[name] = value
    with open(path, "wb") as fh:
        np.save(fh, data, allow_pickle=True)
    return path


def _good_fields(n=4):
    rng = np.random.default_rng(7)
    return {"blob/path": np.array([b"s.mrcs"] * n), "blob/idx": np.arange(n, dtype="<u4"),
            "blob/psize_A": np.full(n, 2.0, "<f4"), "blob/shape": np.full((n, 2), 16, "<u4"),
            "alignments3D/pose": rng.normal(size=(n, 3)).astype("<f4"),
            "alignments3D/shift": rng.normal(size=(n, 2)).astype("<f4"),
            "ctf/accel_kv": np.full(n, 300, "<f4"), "ctf/cs_mm": np.full(n, 2.7, "<f4"),
            "ctf/amp_contrast": np.full(n, 0.1, "<f4"), "ctf/df1_A": np.full(n, 1.2e4, "<f4"),
            "ctf/df2_A": np.full(n, 1.1e4, "<f4"), "ctf/df_angle_rad": np.full(n, 0.3, "<f4")}


class _Trap:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad(kind, tmp_path):
    fields = _good_fields()
    path = tmp_path / f"{kind}.cs"
    if kind == "missing_idx":
        del fields["blob/idx"]
    elif kind == "missing_pose":
        del fields["alignments3D/pose"], fields["alignments3D/shift"]
    elif kind == "partial_ctf":
        del fields["ctf/cs_mm"]
    elif kind == "nan_pose":
        fields["alignments3D/pose"][2, 1] = np.nan
    elif kind == "wrong_shape":
        fields["alignments3D/shift"] = np.zeros((4, 3), "<f4")
    elif kind == "object":
        fields["blob/path"] = np.array([_Trap(tmp_path / "pwned")] * 4, dtype=object)
    elif kind == "not_structured":
        np.save(path.with_suffix(".npy"), np.zeros((4, 3)))
        os.replace(path.with_suffix(".npy"), path)
        return path
    elif kind == "text":
        path.write_text("data_particles\nloop_\n_rlnImageName\n")
        return path
    elif kind == "truncated":
        _write_fields(path, **fields)
        path.write_bytes(path.read_bytes()[:-20])
        return path
    elif kind == "missing_file":
        return path
    return _write_fields(path, **fields)


@pytest.mark.parametrize("kind, words", [
    ("missing_idx", ["'blob/idx'"]), ("missing_pose", ["'alignments3D/pose'"]), ("partial_ctf", ["'ctf/cs_mm'"]),
    ("nan_pose", ["row 3", "'alignments3D/pose'"]), ("wrong_shape", ["'alignments3D/shift'"]),
    ("object", ["'blob/path'", "pickle"]), ("not_structured", ["structured"]), ("text", ["not a cryoSPARC"]),
    ("truncated", ["truncated"]), ("missing_file", ["not found"]),
])
def test_bad_cs_one_clear_message_exit_2(kind, words, tmp_path, capsys):
    path = _bad(kind, tmp_path)
    code = cli.main(["reconstruct", str(path), "--out", str(tmp_path / "m.mrc"), *FAST])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "m.mrc").exists()
    if kind == "object":  # the trap is armed: numpy's own pickle loading would have sprung it
        np.load(path, allow_pickle=True)
        assert (tmp_path / "pwned").exists()


def test_many_fields_beyond_numpys_default_header_limit(tmp_path):
    """A .cs with hundreds of fields (one group per class) has a >10 kB header; it is read all the same."""
    fields = _good_fields()
    for k in range(120):
        for name in ("pose", "shift", "class_posterior"):
            fields[f"alignments_class_{k}/{name}"] = np.zeros((4, 3 if name == "pose" else 2 if name == "shift" else 1),
                                                              "<f4")
    path = _write_fields(tmp_path / "wide.cs", **fields)
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        with pytest.raises(ValueError):
            np.lib.format.read_array_header_1_0(fh)  # NumPy's default limit refuses it
    table = read_cs(path)
    np.testing.assert_allclose(table.euler_deg, pose_to_euler(fields["alignments3D/pose"]), atol=1e-9)


def test_pose_less_cs_where_poses_are_not_needed(tmp_path):
    fields = _good_fields()
    del fields["alignments3D/pose"], fields["alignments3D/shift"]
    path = _write_fields(tmp_path / "noposes.cs", **fields)
    table = read_cs(path, require_poses=False)
    assert (table.euler_deg == 0).all() and (table.shifts_angstrom == 0).all() and table.has_ctf
    np.testing.assert_allclose(table.defocus_angle_deg, np.rad2deg(np.float32(0.3)))
    with pytest.raises(InputError, match="alignments3D/pose"):
        read_cs(path)
