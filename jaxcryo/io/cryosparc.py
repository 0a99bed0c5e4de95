"""cryoSPARC particle files (``.cs``) <-> `ParticleTable`.

A ``.cs`` file is a NumPy ``.npy`` file holding one structured array, one row per
particle, with fields named like ``blob/path`` or ``alignments3D/pose``. It is read
here with ``allow_pickle=False``: a field of object dtype (which only a pickle can
hold) is refused, so a ``.cs`` file cannot run code.

Conventions, as cryoDRGN (``parse_pose_csparc``, ``parse_ctf_csparc``) and pyem
(``csparc2star``) convert them to RELION's, and as a projection test in
tests/test_cryosparc.py checks:

* ``alignments3D/pose`` is an axis-angle (Rodrigues) vector in radians. Its rotation
  ``R = exp([pose]x)`` is the *transpose* of RELION's ``Euler_angles2matrix(rot, tilt,
  psi)`` (jaxcryo's ``geometry.euler_to_matrix``): ``A_relion = R.T``. Here it is turned
  into RELION Euler angles, so the table holds RELION's convention.
* ``alignments3D/shift`` is in pixels of ``alignments3D/psize_A`` (``blob/psize_A`` when
  that field is absent), with the sign of RELION's ``rlnOriginX/Y``.
* ``ctf/df1_A``, ``ctf/df2_A`` are RELION's rlnDefocusU/V; ``ctf/df_angle_rad`` and
  ``ctf/phase_shift_rad`` are rlnDefocusAngle and rlnPhaseShift in radians; ``ctf/accel_kv``,
  ``ctf/cs_mm``, ``ctf/amp_contrast`` are voltage (kV), Cs (mm) and amplitude contrast.
* ``blob/idx`` is 0-based; ``blob/path`` is relative to the cryoSPARC project folder
  (a leading ``>``, as cryoSPARC writes in exported files, is dropped).

Not applied (as in cryoDRGN and pyem): ``blob/sign`` (images are used as stored, as for
RELION files), ``ctf/bfactor``, ``ctf/scale``, ``ctf/tilt_A``, ``ctf/trefoil_A``,
``ctf/tetra_A``, ``ctf/anisomag`` (higher-order aberrations).
"""

from __future__ import annotations

import os

import numpy as np

from jaxcryo.io.errors import InputError, atomic_output
from jaxcryo.io.star import ParticleTable

__all__ = ["read_cs", "write_cs", "check_stacks", "euler_to_pose", "pose_to_euler"]

_CTF_FIELDS = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")
_NPY_MAGIC = b"\x93NUMPY"
# cryoSPARC files with many fields (e.g. one alignments_class_K/* group per class) have .npy headers
# beyond NumPy's default 10 kB limit; the header is a Python literal, parsed safely either way.
_MAX_HEADER_BYTES = 1 << 22


# --------------------------------------------------------------------------- rotations (numpy only)


def _relion_matrix(euler_deg: np.ndarray) -> np.ndarray:
    """RELION's Euler_angles2matrix(rot, tilt, psi) for (n, 3) degrees -> (n, 3, 3)."""
    a, b, g = np.deg2rad(np.asarray(euler_deg, np.float64)).T
    ca, cb, cg, sa, sb, sg = np.cos(a), np.cos(b), np.cos(g), np.sin(a), np.sin(b), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.stack([
        np.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        np.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        np.stack([sc, ss, cb], -1),
    ], -2)


def _relion_angles(matrix: np.ndarray) -> np.ndarray:
    """Inverse of `_relion_matrix` (RELION's Euler_matrix2angles): tilt in [0, 180], rot 0 at tilt 0/180."""
    m = np.asarray(matrix, np.float64)
    sb = np.hypot(m[:, 0, 2], m[:, 1, 2])
    regular = sb > 16 * np.finfo(np.float64).eps
    tilt = np.arctan2(sb, m[:, 2, 2])
    rot = np.where(regular, np.arctan2(m[:, 2, 1], m[:, 2, 0]), 0.0)
    psi = np.where(regular, np.arctan2(m[:, 1, 2], -m[:, 0, 2]), np.arctan2(m[:, 0, 1], m[:, 1, 1]))
    return np.rad2deg(np.stack([rot, tilt, psi], -1))


def _rodrigues(rotvec: np.ndarray) -> np.ndarray:
    """exp of the skew matrix of (n, 3) axis-angle vectors (radians) -> (n, 3, 3), right-handed."""
    v = np.asarray(rotvec, np.float64)
    theta = np.linalg.norm(v, axis=-1)
    safe = np.where(theta > 0, theta, 1.0)
    x, y, z = (v / safe[:, None]).T
    zero = np.zeros_like(x)
    k = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)], -2)
    s, c = np.sin(theta)[:, None, None], (1 - np.cos(theta))[:, None, None]
    return np.eye(3) + s * k + c * (k @ k)


def _rotvec(matrix: np.ndarray) -> np.ndarray:
    """Inverse of `_rodrigues` (angle in [0, pi]), through the quaternion, stable near pi."""
    m = np.asarray(matrix, np.float64)
    # Shepperd: build the quaternion from the largest of w^2, x^2, y^2, z^2.
    tr = np.trace(m, axis1=1, axis2=2)
    diag = np.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    which = np.argmax(diag, axis=-1)
    q = np.empty((len(m), 4))
    for k in range(4):
        rows = which == k
        r = m[rows]
        if k == 0:
            s = 2 * np.sqrt(1 + tr[rows])
            q[rows] = np.stack([s / 4, (r[:, 2, 1] - r[:, 1, 2]) / s, (r[:, 0, 2] - r[:, 2, 0]) / s,
                                (r[:, 1, 0] - r[:, 0, 1]) / s], -1)
        else:
            i, j, l = k - 1, k % 3, (k + 1) % 3
            s = 2 * np.sqrt(np.maximum(1 + r[:, i, i] - r[:, j, j] - r[:, l, l], 0))
            part = np.empty((len(r), 4))
            part[:, 0] = (r[:, l, j] - r[:, j, l]) / s
            part[:, 1 + i] = s / 4
            part[:, 1 + j] = (r[:, j, i] + r[:, i, j]) / s
            part[:, 1 + l] = (r[:, l, i] + r[:, i, l]) / s
            q[rows] = part
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)  # w >= 0: angle in [0, pi]
    norm_v = np.linalg.norm(q[:, 1:], axis=-1)
    angle = 2 * np.arctan2(norm_v, q[:, 0])
    scale = np.where(norm_v > 0, angle / np.where(norm_v > 0, norm_v, 1.0), 2.0)
    return q[:, 1:] * scale[:, None]


def pose_to_euler(pose_rad) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` (n, 3) radians -> RELION rot, tilt, psi (n, 3) degrees.

    RELION's matrix is the transpose of the Rodrigues rotation of ``pose`` (as cryoDRGN's
    parse_pose_csparc and pyem's csparc2star read it).
    """
    pose = np.asarray(pose_rad, np.float64).reshape(-1, 3)
    return _relion_angles(np.swapaxes(_rodrigues(pose), -1, -2))


def euler_to_pose(euler_deg) -> np.ndarray:
    """RELION rot, tilt, psi (n, 3) degrees -> cryoSPARC ``alignments3D/pose`` (n, 3) radians.

    Inverse of :func:`pose_to_euler` (up to the Euler angles' own ambiguities).
    """
    euler = np.asarray(euler_deg, np.float64).reshape(-1, 3)
    return _rotvec(np.swapaxes(_relion_matrix(euler), -1, -2))


# --------------------------------------------------------------------------- reading


def read_cs(path, *, require_poses: bool = True, require_ctf: bool = False, datadir=None) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file into a `ParticleTable` in RELION's conventions.

    Args:
        path: the .cs file (a NumPy .npy structured array).
        require_poses: raise InputError unless ``alignments3D/pose`` and ``alignments3D/shift``
            are present (``alignments3D_multi``, from a heterogeneous refinement, is read at each
            particle's most likely class); if False, missing poses read as zeros.
        require_ctf: raise InputError unless the ``ctf/*`` fields are present.
        datadir: folder that holds the stacks, when ``blob/path`` does not resolve (like
            cryoDRGN's ``--datadir``): ``datadir/blob_path`` and ``datadir/basename`` are tried first.

    Returns:
        a ParticleTable (star_path is the .cs file). Stacks are looked up, in order, under
        ``datadir``, beside the .cs file, in the folder above it (the cryoSPARC project folder
        when the .cs file lies in its job folder) and in the current directory; the first that
        exists is taken.

    Raises:
        InputError: naming the file and the field for any problem.
    """
    path = os.fspath(path)
    data = _load(path)
    n = len(data)
    names = set(data.dtype.names)

    def field(name, tail=(), kind="f"):
        if name not in names:
            raise InputError(f"{path}: no field {name!r}")
        return _field(path, data, name, tail, kind)

    # Images.
    raw_paths = field("blob/path", kind="S")
    indices = field("blob/idx", kind="i")
    if np.any(indices < 0):
        row = int(np.flatnonzero(indices < 0)[0])
        raise InputError(f"{path}: row {row + 1}, blob/idx = {indices[row]} is negative")
    pixel_size = field("blob/psize_A")
    if np.any(pixel_size <= 0):
        row = int(np.flatnonzero(pixel_size <= 0)[0])
        raise InputError(f"{path}: row {row + 1}, blob/psize_A = {pixel_size[row]:g} Å; must be > 0")
    box = np.full(n, -1, np.int64)
    if "blob/shape" in names:
        shape = field("blob/shape", (2,), kind="i")
        if np.any(shape[:, 0] != shape[:, 1]) or np.any(shape < 1):
            row = int(np.flatnonzero((shape[:, 0] != shape[:, 1]) | np.any(shape < 1, axis=1))[0])
            raise InputError(f"{path}: row {row + 1}, blob/shape = {shape[row].tolist()}; "
                             "images must be square")
        box = shape[:, 0].astype(np.int64)
    stack_names = np.array([p[1:] if p.startswith(">") else p for p in raw_paths], dtype=str)
    unique_names, inverse = np.unique(stack_names, return_inverse=True)
    cs_dir = os.path.dirname(os.path.abspath(path))
    resolved = np.array([_resolve_stack(s, cs_dir, datadir) for s in unique_names], dtype=str)
    stack_paths = resolved[inverse.reshape(-1)]
    image_names = np.array([f"{i + 1}@{s}" for i, s in zip(indices, stack_names)], dtype=str)

    # Poses.
    euler = np.zeros((n, 3))
    shifts_px = np.zeros((n, 2))
    prefix = "alignments3D"
    have_pose = "alignments3D/pose" in names
    if not have_pose and "alignments3D_multi/pose" in names:
        prefix, have_pose = "alignments3D_multi", True
    if have_pose:
        if prefix == "alignments3D":
            pose = field("alignments3D/pose", (3,))
            shifts_px = field("alignments3D/shift", (2,))
        else:
            posterior = field("alignments3D_multi/class_posterior", (-1,))
            best = np.argmax(posterior, axis=1)
            k = posterior.shape[1]
            pose = field("alignments3D_multi/pose", (k, 3))[np.arange(n), best]
            shifts_px = field("alignments3D_multi/shift", (k, 2))[np.arange(n), best]
        euler = pose_to_euler(pose)
    elif require_poses:
        raise InputError(f"{path}: no field 'alignments3D/pose'; this step needs particles with known "
                         "orientations (e.g. from a cryoSPARC homogeneous or non-uniform refinement)")
    align_psize = pixel_size
    psize_name = f"{prefix}/psize_A"
    if have_pose and psize_name in names:
        align_psize = field(psize_name)
        if np.any(align_psize <= 0):
            row = int(np.flatnonzero(align_psize <= 0)[0])
            raise InputError(f"{path}: row {row + 1}, {psize_name} = {align_psize[row]:g} Å; must be > 0")

    # CTF.
    present = [f for f in _CTF_FIELDS if f in names]
    has_ctf = len(present) == len(_CTF_FIELDS)
    if present and not has_ctf or require_ctf and not has_ctf:
        missing = ", ".join(repr(f) for f in _CTF_FIELDS if f not in names)
        raise InputError(f"{path}: no field {missing}" + (
            f" but has {', '.join(repr(f) for f in present)}; a partial CTF is refused, not dropped"
            if present else "; this step needs the CTF"))
    ctf = {f: (field(f) if has_ctf else np.zeros(n)) for f in _CTF_FIELDS}
    phase_shift = field("ctf/phase_shift_rad") if has_ctf and "ctf/phase_shift_rad" in names else np.zeros(n)
    groups = field("ctf/exp_group_id", kind="i") + 1 if "ctf/exp_group_id" in names else np.ones(n, np.int64)

    return ParticleTable(
        star_path=path,
        image_names=image_names,
        stack_paths=stack_paths,
        stack_indices=indices.astype(np.int64),
        euler_deg=euler,
        shifts_angstrom=shifts_px * align_psize[:, None],
        defocus_u_angstrom=ctf["ctf/df1_A"],
        defocus_v_angstrom=ctf["ctf/df2_A"],
        defocus_angle_deg=np.rad2deg(ctf["ctf/df_angle_rad"]),
        phase_shift_deg=np.rad2deg(phase_shift),
        ctf_bfactor=np.zeros(n),
        voltage_kv=ctf["ctf/accel_kv"],
        cs_mm=ctf["ctf/cs_mm"],
        amplitude_contrast=ctf["ctf/amp_contrast"],
        pixel_size_angstrom=pixel_size,
        box_size=box,
        optics_group=groups.astype(np.int64),
        has_ctf=has_ctf,
    )


def check_stacks(table: ParticleTable) -> None:
    """Raise InputError, naming the row, its ``blob/path`` and ``--datadir``, if a stack of a .cs table is missing."""
    paths, first = np.unique(table.stack_paths, return_index=True)
    for path, row in zip(paths, first):
        if not os.path.exists(path):
            name = table.image_names[row].split("@", 1)[1]
            raise InputError(f"{table.star_path}: row {table.source_rows[row] + 1}, blob/path {name!r}: no stack "
                             f"at {path} (nor beside the .cs file or in its project folder); pass --datadir with the "
                             "folder that holds the stacks")


def _load(path: str) -> np.ndarray:
    """The .cs file's structured array, refusing object fields before anything is unpickled."""
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a cryoSPARC .cs file")
    try:
        with open(path, "rb") as fh:
            if fh.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                raise InputError(f"{path}: not a cryoSPARC .cs file (a NumPy .npy structured array); "
                                 "if it was saved by cryosparc-tools in its compressed format, save it with "
                                 "format=NUMPY_FORMAT")
            fh.seek(0)
            version = np.lib.format.read_magic(fh)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(fh, max_header_size=_MAX_HEADER_BYTES)
    except InputError:
        raise
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read as a cryoSPARC .cs file ({type(err).__name__}: {err})") from None
    shape, _, dtype = header
    if dtype.names is None:
        raise InputError(f"{path}: holds a plain {dtype} array, not a cryoSPARC structured array with "
                         "fields such as 'blob/path'")
    for name in dtype.names:
        if dtype.fields[name][0].hasobject:
            raise InputError(f"{path}: field {name!r} holds Python objects (a pickle); refusing to load it "
                             "(cryoSPARC writes fixed-size fields)")
    if len(shape) != 1:
        raise InputError(f"{path}: array has shape {shape}; a .cs file holds one row per particle")
    if shape[0] == 0:
        raise InputError(f"{path}: holds no particles")
    try:
        return np.load(path, allow_pickle=False, max_header_size=_MAX_HEADER_BYTES)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"{path}: cannot read as a cryoSPARC .cs file ({type(err).__name__}: {err}); "
                         "truncated?") from None


def _field(path: str, data: np.ndarray, name: str, tail: tuple, kind: str) -> np.ndarray:
    """Field `name` as float64 (kind 'f'), int64 ('i') or str ('S'), checked for shape and finiteness."""
    values = data[name]
    if kind == "S":
        if values.dtype.kind == "S":
            try:
                return np.array([v.decode("utf-8") for v in values], dtype=str)
            except UnicodeDecodeError:
                raise InputError(f"{path}: field {name!r} is not UTF-8 text") from None
        if values.dtype.kind == "U":
            return values.astype(str)
        raise InputError(f"{path}: field {name!r} has dtype {values.dtype}, expected text (bytes)")
    want = (len(data), *tail)
    if tail and tail[-1] == -1:
        want = (len(data), *tail[:-1], values.shape[-1] if values.ndim == len(want) else -1)
    if values.shape != want or values.dtype.kind not in "biuf":
        raise InputError(f"{path}: field {name!r} has dtype {values.dtype} and shape {values.shape[1:]} per row; "
                         f"expected numbers of shape {want[1:]}")
    if kind == "i":
        if values.dtype.kind == "f" and np.any(values != np.round(values)):
            raise InputError(f"{path}: field {name!r} holds non-whole numbers")
        return values.astype(np.int64)
    out = values.astype(np.float64)
    bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: row {row + 1}, field {name!r} = {values[row]} is not finite")
    return out


def _resolve_stack(name: str, cs_dir: str, datadir) -> str:
    if os.path.isabs(name):
        candidates = [name]
        if datadir is not None:
            candidates.append(os.path.join(os.fspath(datadir), os.path.basename(name)))
    else:
        candidates = []
        if datadir is not None:
            candidates += [os.path.join(os.fspath(datadir), name),
                           os.path.join(os.fspath(datadir), os.path.basename(name))]
        candidates += [os.path.join(cs_dir, name), os.path.join(os.path.dirname(cs_dir), name), os.path.abspath(name)]
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.normpath(os.path.abspath(candidate))
    return os.path.normpath(os.path.abspath(candidates[0]))


# --------------------------------------------------------------------------- writing


def write_cs(path, table: ParticleTable, *, project_dir=None) -> None:
    """Write `table` as a cryoSPARC-style ``.cs`` file (the fields :func:`read_cs` reads).

    Poses become ``alignments3D/pose`` (axis-angle, radians) and ``alignments3D/shift``
    (pixels); stack paths are written relative to ``project_dir`` (default: the .cs file's
    folder) when they lie inside it. Reading the file back gives the same table up to float32
    rounding (the dtype cryoSPARC uses). The file is replaced atomically.
    """
    path = os.fspath(path)
    n = len(table)
    if n == 0:
        raise InputError(f"{path}: refusing to write a particle table with no particles")
    base = os.path.abspath(os.fspath(project_dir) if project_dir is not None else os.path.dirname(os.path.abspath(path)))
    shown = []
    for stack in table.stack_paths:
        stack = os.path.abspath(stack)
        inside = os.path.commonpath([base, stack]) == base
        shown.append(os.path.relpath(stack, base) if inside else stack)
    encoded = [s.encode("utf-8") for s in shown]
    width = max(len(s) for s in encoded)
    box_known = bool(np.all(table.box_size > 0))
    fields = [
        ("uid", "<u8"), ("blob/path", f"S{width}"), ("blob/idx", "<u4"), *([("blob/shape", "<u4", (2,))] * box_known),
        ("blob/psize_A", "<f4"), ("ctf/exp_group_id", "<u4"),
        ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4"),
    ]
    if table.has_ctf:
        fields += [(f, "<f4") for f in _CTF_FIELDS] + [("ctf/phase_shift_rad", "<f4")]
    out = np.zeros(n, dtype=fields)
    out["uid"] = np.arange(n)
    out["blob/path"] = encoded
    out["blob/idx"] = table.stack_indices
    if box_known:
        out["blob/shape"] = table.box_size[:, None]
    out["blob/psize_A"] = table.pixel_size_angstrom
    out["ctf/exp_group_id"] = np.maximum(table.optics_group - 1, 0)
    out["alignments3D/pose"] = euler_to_pose(table.euler_deg)
    out["alignments3D/shift"] = table.shifts_angstrom / table.pixel_size_angstrom[:, None]
    out["alignments3D/psize_A"] = table.pixel_size_angstrom
    if table.has_ctf:
        out["ctf/df1_A"] = table.defocus_u_angstrom
        out["ctf/df2_A"] = table.defocus_v_angstrom
        out["ctf/df_angle_rad"] = np.deg2rad(table.defocus_angle_deg)
        out["ctf/accel_kv"] = table.voltage_kv
        out["ctf/cs_mm"] = table.cs_mm
        out["ctf/amp_contrast"] = table.amplitude_contrast
        out["ctf/phase_shift_rad"] = np.deg2rad(table.phase_shift_deg)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, out, allow_pickle=False)
