"""RELION particle STAR files (3.0 and 3.1+ styles) <-> `ParticleTable`.

A `ParticleTable` is a frozen bundle of numpy arrays, one entry per particle,
with every optics value already expanded per particle, so the maths never needs
to know about optics groups or STAR dialects.

Conventions (RELION's): Euler angles rot/tilt/psi in degrees (ZYZ), origin
shifts in Ångström (3.1 `rlnOriginXAngst`; 3.0 `rlnOriginX` is in pixels and is
converted here), defocus in Ångström, stack indices 0-based here although the
file's `N@stack.mrcs` is 1-based.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any

import numpy as np
import pandas as pd
import starfile

from jaxcryo.io.errors import InputError, atomic_output

__all__ = ["ParticleTable", "read_particles", "write_particles", "make_table"]

_POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)
# What RELION 3.1 does when a CTF column is missing, so that jaxcryo reads a file as RELION does.
# RELION's CTF::readByGroup (src/ctf.cpp) reads each value with a default: rlnDefocusV = rlnDefocusU,
# rlnDefocusAngle 0, rlnAmplitudeContrast (Q0) 0, rlnPhaseShift 0, rlnCtfBfactor 0 (and rlnVoltage
# 200, rlnSphericalAberration 0); but ObservationModel's constructor (src/jaz/obs_model.cpp) stops
# with "not all necessary variables defined in _optics.star file" when rlnVoltage or
# rlnSphericalAberration is missing, so those two have no usable default in 3.1 and are required here.
_CTF_DEFAULTS = {"rlnDefocusAngle": 0.0, "rlnAmplitudeContrast": 0.0}  # rlnDefocusV: rlnDefocusU
_CTF_REQUIRED = ("rlnVoltage", "rlnSphericalAberration")
# Optics RELION can apply and jaxcryo does not model: said in one note when they are not neutral.
_IGNORED_OPTICS = {
    "rlnBeamTiltX": 0.0, "rlnBeamTiltY": 0.0,  # beam tilt (mrad)
    "rlnOddZernike": None, "rlnEvenZernike": None,  # trefoil, tetrafoil, higher-order aberrations
    "rlnMagMat00": 1.0, "rlnMagMat01": 0.0, "rlnMagMat10": 0.0, "rlnMagMat11": 1.0,  # anisotropic magnification
    "rlnCtfScalefactor": 1.0,
}
_PREMULTIPLIED = "rlnCtfDataAreCtfPremultiplied"
# Tried in this order when a file has several blocks.
_PARTICLE_BLOCKS = ("particles", "images", "")
_IMAGE_NAME = re.compile(r"^\s*(\d+)@(\S.*?)\s*$")
# RELION splits STAR rows on whitespace and does not honour quotes everywhere.
_WHITESPACE = re.compile(r"\s")


@dataclasses.dataclass(frozen=True, eq=False)
class ParticleTable:
    """Per-particle metadata, as read from (or written to) a particle STAR file.

    All arrays have length n = len(table) and are read-only. Values that RELION
    keeps per optics group (voltage, Cs, amplitude contrast, pixel size, box)
    are expanded to one entry per particle.

    Attributes:
        star_path: the STAR file this came from ("" if built in memory).
        image_names: (n,) str, rlnImageName as written, e.g. '3@Particles/stack.mrcs'.
        stack_paths: (n,) str, absolute path of each particle's image stack.
        stack_indices: (n,) int64, 0-based image index within its stack.
        euler_deg: (n, 3) float64, RELION rot, tilt, psi in degrees.
        shifts_angstrom: (n, 2) float64, RELION origin x, y in Ångström.
        defocus_u_angstrom, defocus_v_angstrom: (n,) float64.
        defocus_angle_deg, phase_shift_deg, ctf_bfactor: (n,) float64.
        voltage_kv, cs_mm, amplitude_contrast: (n,) float64 (zeros when has_ctf is False).
        pixel_size_angstrom: (n,) float64.
        box_size: (n,) int64, image side in pixels, -1 when not yet known.
        optics_group: (n,) int64, RELION optics group number.
        has_ctf: whether the CTF values are real (False: they are placeholders).
            True whenever the file gives a defocus; missing optional CTF columns
            then hold RELION's defaults (said in `notes`).
        source_rows: (n,) int64, 0-based row in `star_path` (for error messages
            that stay right after `subset`); defaults to arange(n).
        notes: one-line remarks for the user about how the file was read (RELION
            defaults used for missing CTF columns, optics columns ignored); a
            command line prints them.

    A pose-only table (read with ``require_images=False`` from a STAR without
    rlnImageName) has empty image_names and stack_paths and stack_indices -1.
    """

    star_path: str
    image_names: np.ndarray
    stack_paths: np.ndarray
    stack_indices: np.ndarray
    euler_deg: np.ndarray
    shifts_angstrom: np.ndarray
    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    phase_shift_deg: np.ndarray
    ctf_bfactor: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    pixel_size_angstrom: np.ndarray
    box_size: np.ndarray
    optics_group: np.ndarray
    has_ctf: bool
    source_rows: np.ndarray | None = None
    notes: tuple = ()

    def __post_init__(self):
        n = len(np.asarray(self.image_names))
        if self.source_rows is None:
            object.__setattr__(self, "source_rows", np.arange(n))
        for field, dtype, tail in _FIELD_SPECS:
            value = np.array(getattr(self, field), dtype=dtype)
            if value.shape != (n, *tail):
                raise InputError(
                    f"ParticleTable: {field} has shape {value.shape}, expected {(n, *tail)}"
                )
            value.flags.writeable = False
            object.__setattr__(self, field, value)
        object.__setattr__(self, "star_path", os.fspath(self.star_path))
        object.__setattr__(self, "has_ctf", bool(self.has_ctf))
        object.__setattr__(self, "notes", tuple(str(t) for t in self.notes))

    def __len__(self) -> int:
        return len(self.image_names)

    def __repr__(self) -> str:
        return f"ParticleTable({len(self)} particles from {self.star_path or '<memory>'!r})"

    def subset(self, indices) -> ParticleTable:
        """A new table holding the rows `indices` (int array or boolean mask), in that order."""
        indices = np.asarray(indices)
        if indices.dtype != bool:
            indices = indices.astype(np.int64)
        fields = {name: getattr(self, name)[indices] for name, _, _ in _FIELD_SPECS}
        return ParticleTable(star_path=self.star_path, has_ctf=self.has_ctf, notes=self.notes, **fields)


# (name, dtype, trailing shape) of every per-particle array.
_FIELD_SPECS = (
    ("image_names", str, ()),
    ("stack_paths", str, ()),
    ("stack_indices", np.int64, ()),
    ("euler_deg", np.float64, (3,)),
    ("shifts_angstrom", np.float64, (2,)),
    ("defocus_u_angstrom", np.float64, ()),
    ("defocus_v_angstrom", np.float64, ()),
    ("defocus_angle_deg", np.float64, ()),
    ("phase_shift_deg", np.float64, ()),
    ("ctf_bfactor", np.float64, ()),
    ("voltage_kv", np.float64, ()),
    ("cs_mm", np.float64, ()),
    ("amplitude_contrast", np.float64, ()),
    ("pixel_size_angstrom", np.float64, ()),
    ("box_size", np.int64, ()),
    ("optics_group", np.int64, ()),
    ("source_rows", np.int64, ()),
)


# --------------------------------------------------------------------------- reading


def read_particles(path, *, require_poses: bool = True, require_ctf: bool = False,
                   require_images: bool = True) -> ParticleTable:
    """Read a RELION 3.0 or 3.1+ particle STAR file.

    The CTF is read as RELION 3.1 reads it: with a defocus (rlnDefocusU) given, a missing
    rlnDefocusV is rlnDefocusU, a missing rlnDefocusAngle, rlnAmplitudeContrast, rlnPhaseShift
    or rlnCtfBfactor is 0 (RELION's defaults; the first three are said in ``notes``), and a
    missing rlnVoltage or rlnSphericalAberration is an error (RELION 3.1 has no default for
    them). No defocus at all: no CTF (has_ctf False). Images multiplied by their CTF
    (rlnCtfDataAreCtfPremultiplied = 1) are refused when the images are to be read; beam tilt,
    Zernike aberrations, anisotropic magnification and a CTF scale factor are ignored, with a note.

    Args:
        path: the STAR file.
        require_poses: raise InputError unless rlnAngleRot/Tilt/Psi are present;
            if False, missing angles read as zeros.
        require_ctf: raise InputError unless rlnDefocusU/V, rlnVoltage,
            rlnSphericalAberration and rlnAmplitudeContrast are present.
        require_images: the caller reads the images (rlnImageName is required). False
            for steps that use only poses and CTF (project, condition), as relion_project
            --ang does: rlnImageName may then be absent.

    Returns:
        a ParticleTable; relative stack paths are resolved against the STAR
        file's folder first, then the current directory (RELION's project dir).

    Raises:
        InputError: naming the file (and row/column) for any problem.
    """
    path = os.fspath(path)
    blocks = _read_blocks(path)
    particle_block, df = _find_particle_block(path, blocks, require_images)
    label = f"data_{particle_block}"
    n = len(df)
    if n == 0:
        raise InputError(f"{path}: {label} holds no particles")
    _check_ragged(path, blocks, particle_block)

    optics_block = blocks.get("optics") if particle_block != "optics" else None
    columns = _Columns(path, df, label, optics_block)

    # Image names and stacks.
    if "rlnImageName" in df.columns:
        names = df["rlnImageName"]
        names = names.where(names.notna(), "").astype(str)
        parts = names.str.extract(_IMAGE_NAME)
        bad = parts[0].isna() | (pd.to_numeric(parts[0], errors="coerce").fillna(0) < 1)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(
                f"{path}: row {row + 1} (rlnImageName {str(names.iloc[row])!r}) is not of the form "
                "'N@stack.mrcs' with N >= 1"
            )
        stack_indices = parts[0].astype(np.int64).to_numpy() - 1
        stack_names = parts[1].to_numpy(dtype=str)
        unique_names, inverse = np.unique(stack_names, return_inverse=True)
        star_dir = os.path.dirname(os.path.abspath(path))
        resolved = np.array([_resolve_stack(name, star_dir) for name in unique_names], dtype=str)
        stack_paths = resolved[inverse.reshape(-1)]
        names = names.to_numpy(dtype=str)
    else:  # pose-only (require_images False)
        names = stack_paths = np.full(n, "", dtype=str)
        stack_indices = np.full(n, -1, dtype=np.int64)

    # Poses.
    present = [c for c in _POSE_COLUMNS if columns.has_particle(c)]
    if require_poses and len(present) < 3:
        missing = ", ".join(c for c in _POSE_COLUMNS if c not in present)
        raise InputError(
            f"{path}: {label} has no pose column(s) {missing}; "
            "this step needs particles with known orientations (e.g. from relion_refine)"
        )
    euler = np.stack([columns.particle(c, default=0.0) for c in _POSE_COLUMNS], axis=1)

    # Pixel size, needed for the shifts below.
    pixel_size = columns.optics("rlnImagePixelSize")
    if pixel_size is None:
        detector = columns.optics("rlnDetectorPixelSize")
        magnification = columns.optics("rlnMagnification")
        if detector is not None and magnification is not None:
            if np.any(magnification <= 0):
                raise InputError(f"{path}: rlnMagnification must be positive")
            pixel_size = detector * 1e4 / magnification
    if pixel_size is None:
        raise InputError(
            f"{path}: no pixel size; expected rlnImagePixelSize (in data_optics or {label}) "
            "or rlnDetectorPixelSize with rlnMagnification"
        )
    if np.any(pixel_size <= 0):
        row = int(np.flatnonzero(pixel_size <= 0)[0])
        raise InputError(f"{path}: row {row + 1} has pixel size {pixel_size[row]:g} Å; must be > 0")

    shifts = np.zeros((n, 2))
    for pair, scale in (
        (("rlnOriginXAngst", "rlnOriginYAngst"), 1.0),
        (("rlnOriginX", "rlnOriginY"), pixel_size),
    ):
        have = [columns.has_particle(c) for c in pair]
        if all(have):
            shifts = np.stack([columns.particle(c) for c in pair], axis=1) * np.reshape(scale, (-1, 1))
            break
        if any(have):
            raise InputError(f"{path}: {label} has {pair[have.index(True)]} but no {pair[have.index(False)]}")

    # CTF, as RELION 3.1 reads it (see _CTF_DEFAULTS).
    missing_ctf = [
        c
        for c in _CTF_COLUMNS
        if not (columns.has_particle(c) if c.startswith("rlnDefocus") else columns.has_optics(c))
    ]
    if require_ctf and missing_ctf:
        raise InputError(f"{path}: missing CTF column(s) {', '.join(missing_ctf)}")
    notes = []
    has_ctf = columns.has_particle("rlnDefocusU") or columns.has_particle("rlnDefocusV")
    defocus_u = columns.particle("rlnDefocusU", default=0.0)
    defocus_v = defocus_u
    if has_ctf:
        where = f"{label} or data_optics" if columns.optics_df is not None else label
        if not columns.has_particle("rlnDefocusU"):
            raise InputError(f"{path}: {label} has rlnDefocusV but no rlnDefocusU; cannot build the CTF")
        for column in _CTF_REQUIRED:
            if not columns.has_optics(column):
                raise InputError(
                    f"{path}: {where} has no {column} column, needed for the CTF (RELION 3.1 has no default "
                    "for it either); add it, or remove the defocus columns to use no CTF"
                )
        if columns.has_particle("rlnDefocusV"):
            defocus_v = columns.particle("rlnDefocusV")
        defaulted = [] if columns.has_particle("rlnDefocusV") else ["rlnDefocusV = rlnDefocusU"]
        defaulted += [f"{c} = {v:g}" for c, v in _CTF_DEFAULTS.items()
                      if not (columns.has_particle(c) if c == "rlnDefocusAngle" else columns.has_optics(c))]
        if defaulted:
            notes.append(f"{path}: no {', '.join(d.split(' = ')[0] for d in defaulted)} column; using RELION's "
                         f"default {', '.join(defaulted)}")
    premultiplied = columns.optics(_PREMULTIPLIED)
    if premultiplied is not None and np.any(premultiplied != 0):
        if require_images:
            raise InputError(
                f"{path}: {_PREMULTIPLIED} = 1: the images were multiplied by their CTF, which jaxcryo's "
                "forward model does not handle; use images that are not CTF-premultiplied"
            )
    ignored = []
    for column, neutral in _IGNORED_OPTICS.items():
        if columns.has_optics(column):
            source = columns.optics_df if columns.optics_df is not None and column in columns.optics_df.columns \
                else df
            values = pd.to_numeric(source[column], errors="coerce") if neutral is not None else None
            if neutral is None or not np.allclose(values.to_numpy(dtype=np.float64, na_value=np.nan), neutral):
                ignored.append(column)
    if ignored:
        notes.append(f"{path}: {', '.join(ignored)} ignored (jaxcryo models no beam tilt, higher-order "
                     "aberrations, anisotropic magnification or CTF scale factor)")

    def optics_or_default(column):
        value = columns.optics(column)
        return np.full(n, _CTF_DEFAULTS.get(column, 0.0)) if value is None else value

    if has_ctf:  # values that would make the CTF NaN or meaningless (RELION refuses them too)
        for column, ok, rule in (("rlnVoltage", lambda v: v > 0, "must be > 0 (kV)"),
                                 ("rlnAmplitudeContrast", lambda v: (v >= 0) & (v <= 1), "must be between 0 and 1")):
            values = optics_or_default(column)
            bad = ~ok(values)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise InputError(f"{path}: {column} = {values[row]:g} (optics group {columns.groups[row]}, particle "
                                 f"row {row + 1}) {rule}")

    box = columns.optics("rlnImageSize")
    if box is not None:
        if np.any(box != np.round(box)) or np.any(box < 1):
            raise InputError(f"{path}: rlnImageSize must be a positive whole number of pixels")
    return ParticleTable(
        star_path=path,
        image_names=names,
        stack_paths=stack_paths,
        stack_indices=stack_indices,
        euler_deg=euler,
        shifts_angstrom=shifts,
        defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=defocus_v,
        defocus_angle_deg=columns.particle("rlnDefocusAngle", default=0.0),
        phase_shift_deg=columns.particle("rlnPhaseShift", default=0.0),
        ctf_bfactor=columns.particle("rlnCtfBfactor", default=0.0),
        voltage_kv=optics_or_default("rlnVoltage"),
        cs_mm=optics_or_default("rlnSphericalAberration"),
        amplitude_contrast=optics_or_default("rlnAmplitudeContrast"),
        pixel_size_angstrom=pixel_size,
        box_size=np.full(n, -1) if box is None else box.astype(np.int64),
        optics_group=columns.groups,
        has_ctf=has_ctf,
        notes=tuple(notes),
    )


def _read_blocks(path: str) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file as DataFrames (key-value blocks become one row)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a STAR file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile/pandas raise many types for malformed text
        ragged = _first_ragged_row(path)
        if ragged:
            raise InputError(ragged) from None
        detail = " ".join(str(err).split())
        raise InputError(f"{path}: cannot parse as a STAR file ({type(err).__name__}: {detail})") from None
    if not raw:
        raise InputError(f"{path}: no data blocks found; is this a STAR file?")
    blocks = {}
    for name, block in raw.items():
        if isinstance(block, dict):  # a non-loop block: one value per tag
            block = pd.DataFrame([block])
        blocks[str(name)] = block.reset_index(drop=True)
    return blocks


def _check_ragged(path: str, blocks: dict[str, pd.DataFrame], particle_block: str) -> None:
    """A row with too few fields reads as NaN: look for it in the file, to name its line."""
    if any(name in blocks and blocks[name].isna().to_numpy().any() for name in (particle_block, "optics")):
        ragged = _first_ragged_row(path)
        if ragged:
            raise InputError(ragged)


def _first_ragged_row(path: str) -> str | None:
    """'FILE: line L (data_B): K fields, the loop has C columns' for the first loop row whose
    field count differs from its loop's columns; None if every row fits."""
    import shlex

    block, columns, in_header, in_loop = "", [], False, False
    try:
        fh = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return None
    with fh:
        for number, line in enumerate(fh, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if text.startswith("data_"):
                block, columns, in_header, in_loop = text, [], False, False
                continue
            if text == "loop_":
                columns, in_header, in_loop = [], True, True
                continue
            if text.startswith("_"):
                if in_header:
                    columns.append(text.split()[0][1:])
                continue
            in_header = False
            if not in_loop or not columns:
                continue
            try:
                fields = shlex.split(text, comments=False) if ("'" in text or '"' in text) else text.split()
            except ValueError:
                fields = text.split()
            if len(fields) != len(columns):
                return (f"{path}: line {number} ({block or 'data_'}): {len(fields)} field(s), but the loop has "
                        f"{len(columns)} columns ({columns[0]} .. {columns[-1]})")
    return None


def _find_particle_block(path: str, blocks: dict[str, pd.DataFrame],
                         require_images: bool = True) -> tuple[str, pd.DataFrame]:
    order = [b for b in _PARTICLE_BLOCKS if b in blocks]
    order += [b for b in blocks if b not in order and b != "optics"]
    for name in order:
        if "rlnImageName" in blocks[name].columns:
            return name, blocks[name]
    if not require_images:  # pose-only: the first block with angles
        for name in order:
            if any(c in blocks[name].columns for c in _POSE_COLUMNS):
                return name, blocks[name]
    for name in order:
        if name in _PARTICLE_BLOCKS:
            raise InputError(f"{path}: data_{name} has no rlnImageName column")
    found = ", ".join(f"data_{b}" for b in blocks)
    wanted = "rlnImageName" if require_images else "rlnImageName or rlnAngleRot/Tilt/Psi"
    raise InputError(f"{path}: no particle table (a block with {wanted}); found {found}")


class _Columns:
    """Numeric columns of the particle block, and optics values expanded per particle."""

    def __init__(self, path: str, particles: pd.DataFrame, label: str, optics: pd.DataFrame | None):
        self.path, self.df, self.label = path, particles, label
        n = len(particles)
        self.optics_df = optics if optics is not None and len(optics) else None
        if self.optics_df is None:
            self.groups = self._ints(particles, label, "rlnOpticsGroup", default=1)
            self.group_rows = None
            return
        if "rlnOpticsGroup" not in self.optics_df.columns:
            raise InputError(f"{path}: data_optics has no rlnOpticsGroup column")
        ids = self._ints(self.optics_df, "data_optics", "rlnOpticsGroup")
        if len(np.unique(ids)) != len(ids):
            raise InputError(f"{path}: data_optics lists an rlnOpticsGroup more than once")
        if "rlnOpticsGroup" in particles.columns:
            groups = self._ints(particles, label, "rlnOpticsGroup")
        elif len(ids) == 1:
            groups = np.full(n, ids[0])
        else:
            raise InputError(
                f"{path}: {label} has no rlnOpticsGroup column but data_optics has {len(ids)} groups"
            )
        order = np.argsort(ids)
        where = np.searchsorted(ids[order], groups)
        where = np.minimum(where, len(ids) - 1)
        known = ids[order][where] == groups
        if not known.all():
            row = int(np.flatnonzero(~known)[0])
            listed = ", ".join(str(i) for i in ids)
            raise InputError(
                f"{path}: row {row + 1} ({str(particles.get('rlnImageName', particles.index).iloc[row])!r}) "
                f"has rlnOpticsGroup "
                f"{groups[row]}, which is not in data_optics (groups {listed})"
            )
        self.groups = groups
        self.group_rows = order[where]

    def has_particle(self, column: str) -> bool:
        return column in self.df.columns

    def has_optics(self, column: str) -> bool:
        return self.has_particle(column) or (
            self.optics_df is not None and column in self.optics_df.columns
        )

    def particle(self, column: str, default: float | None = None) -> np.ndarray:
        if column not in self.df.columns:
            return np.full(len(self.df), default, dtype=np.float64)
        return _floats(self.path, self.df, self.label, column)

    def optics(self, column: str) -> np.ndarray | None:
        """Per-particle value of an optics column: data_optics wins over the particle block."""
        if self.optics_df is not None and column in self.optics_df.columns:
            return _floats(self.path, self.optics_df, "data_optics", column)[self.group_rows]
        if column in self.df.columns:
            return _floats(self.path, self.df, self.label, column)
        return None

    def _ints(self, df, label, column, default=None):
        if column not in df.columns:
            return np.full(len(df), default, dtype=np.int64)
        values = _floats(self.path, df, label, column)
        if np.any(values != np.round(values)):
            row = int(np.flatnonzero(values != np.round(values))[0])
            raise InputError(
                f"{self.path}: {label} row {row + 1}, {column} = {df[column].iloc[row]!r} "
                "is not a whole number"
            )
        return values.astype(np.int64)


def _floats(path: str, df: pd.DataFrame, label: str, column: str) -> np.ndarray:
    raw = df[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = raw.iloc[row]
        if isinstance(value, str):
            value = repr(value)
        elif pd.isna(value):
            # pandas reads a literal 'nan' and the missing fields of a short row alike.
            raise InputError(f"{path}: {label} row {row + 1}, {column} is NaN or missing (too few fields?)")
        raise InputError(f"{path}: {label} row {row + 1}, {column} = {value} is not a finite number")
    return values


def _resolve_stack(name: str, star_dir: str) -> str:
    if os.path.isabs(name):
        return os.path.normpath(name)
    beside_star = os.path.normpath(os.path.join(star_dir, name))
    if os.path.exists(beside_star):
        return beside_star
    in_cwd = os.path.abspath(name)
    return in_cwd if os.path.exists(in_cwd) else beside_star


# --------------------------------------------------------------------------- writing


def make_table(
    *,
    stack_paths,
    stack_indices,
    pixel_size_angstrom,
    euler_deg=None,
    shifts_angstrom=None,
    defocus_u_angstrom=None,
    defocus_v_angstrom=None,
    defocus_angle_deg=0.0,
    phase_shift_deg=0.0,
    ctf_bfactor=0.0,
    voltage_kv=300.0,
    cs_mm=2.7,
    amplitude_contrast=0.1,
    box_size=-1,
    optics_group=1,
    has_ctf: bool | None = None,
    star_path: str = "",
) -> ParticleTable:
    """Build a ParticleTable from arrays, e.g. for simulated particles.

    Any argument may be a scalar, broadcast to all n = len(stack_indices)
    particles. Missing poses/shifts are zeros; missing defocus means has_ctf
    False (unless has_ctf is given); defocus_v defaults to defocus_u.

    Example:
        >>> t = make_table(stack_paths="/data/sim.mrcs", stack_indices=np.arange(3),
        ...                pixel_size_angstrom=1.5, defocus_u_angstrom=15000.0)
        >>> t.image_names[2], t.voltage_kv[0]
        ('3@/data/sim.mrcs', 300.0)
    """
    stack_indices = np.asarray(stack_indices, dtype=np.int64).reshape(-1)
    n = len(stack_indices)
    if np.any(stack_indices < 0):
        raise InputError("make_table: stack_indices must be >= 0 (they are 0-based)")

    def per_particle(name, value, tail=(), dtype=np.float64):
        try:
            return np.broadcast_to(np.asarray(value, dtype=dtype), (n, *tail)).copy()
        except ValueError as err:
            raise InputError(
                f"make_table: {name} has shape {np.shape(value)}, expected {(n, *tail)} or a scalar"
            ) from err

    paths = per_particle("stack_paths", stack_paths, dtype=str)
    paths = np.array([os.path.abspath(p) for p in paths], dtype=str) if n else paths
    if has_ctf is None:
        has_ctf = defocus_u_angstrom is not None
    defocus_u = per_particle("defocus_u_angstrom", 0.0 if defocus_u_angstrom is None else defocus_u_angstrom)
    defocus_v = defocus_u if defocus_v_angstrom is None else per_particle("defocus_v_angstrom", defocus_v_angstrom)
    return ParticleTable(
        star_path=star_path,
        image_names=np.array([f"{i + 1}@{p}" for i, p in zip(stack_indices, paths)], dtype=str),
        stack_paths=paths,
        stack_indices=stack_indices,
        euler_deg=per_particle("euler_deg", 0.0 if euler_deg is None else euler_deg, (3,)),
        shifts_angstrom=per_particle("shifts_angstrom", 0.0 if shifts_angstrom is None else shifts_angstrom, (2,)),
        defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=defocus_v,
        defocus_angle_deg=per_particle("defocus_angle_deg", defocus_angle_deg),
        phase_shift_deg=per_particle("phase_shift_deg", phase_shift_deg),
        ctf_bfactor=per_particle("ctf_bfactor", ctf_bfactor),
        voltage_kv=per_particle("voltage_kv", voltage_kv),
        cs_mm=per_particle("cs_mm", cs_mm),
        amplitude_contrast=per_particle("amplitude_contrast", amplitude_contrast),
        pixel_size_angstrom=per_particle("pixel_size_angstrom", pixel_size_angstrom),
        box_size=per_particle("box_size", box_size, dtype=np.int64),
        optics_group=per_particle("optics_group", optics_group, dtype=np.int64),
        has_ctf=has_ctf,
    )


_OPTICS_FIELDS = (
    ("rlnImagePixelSize", "pixel_size_angstrom"),
    ("rlnVoltage", "voltage_kv"),
    ("rlnSphericalAberration", "cs_mm"),
    ("rlnAmplitudeContrast", "amplitude_contrast"),
    ("rlnImageSize", "box_size"),
)
_PARTICLE_FIELDS = (
    ("rlnAngleRot", lambda t: t.euler_deg[:, 0]),
    ("rlnAngleTilt", lambda t: t.euler_deg[:, 1]),
    ("rlnAnglePsi", lambda t: t.euler_deg[:, 2]),
    ("rlnOriginXAngst", lambda t: t.shifts_angstrom[:, 0]),
    ("rlnOriginYAngst", lambda t: t.shifts_angstrom[:, 1]),
    ("rlnDefocusU", lambda t: t.defocus_u_angstrom),
    ("rlnDefocusV", lambda t: t.defocus_v_angstrom),
    ("rlnDefocusAngle", lambda t: t.defocus_angle_deg),
    ("rlnPhaseShift", lambda t: t.phase_shift_deg),
    ("rlnCtfBfactor", lambda t: t.ctf_bfactor),
)
_CTF_ONLY = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor")


def write_particles(path, table: ParticleTable) -> None:
    """Write `table` as a RELION 3.1 particle STAR file (data_optics + data_particles).

    Image names are relative to the STAR file's folder when the stack lies
    inside it, absolute otherwise. Numbers are written with the shortest text
    that reads back to the same float64, so write-then-read is exact. The file
    is replaced atomically. When has_ctf is False the per-particle CTF
    columns (defocus, phase shift, B-factor) are left out, so reading the file
    back gives has_ctf False again.

    Raises:
        InputError: the folder does not exist, a path contains whitespace, or
            one optics group has conflicting optics values.
    """
    path = os.fspath(path)
    if len(table) == 0:
        raise InputError(f"{path}: refusing to write a particle table with no particles")
    star_dir = os.path.dirname(os.path.abspath(path))

    unique_stacks, inverse = np.unique(table.stack_paths, return_inverse=True)
    shown = []
    for stack in unique_stacks:
        stack = os.path.abspath(stack)
        inside = os.path.commonpath([star_dir, stack]) == star_dir
        shown.append(os.path.relpath(stack, star_dir) if inside else stack)
        if _WHITESPACE.search(shown[-1]):
            raise InputError(f"{path}: stack path {shown[-1]!r} contains whitespace, which RELION cannot read")
    shown = np.array(shown, dtype=str)[inverse.reshape(-1)]
    image_names = [f"{i + 1}@{s}" for i, s in zip(table.stack_indices, shown)]

    group_ids = np.unique(table.optics_group)
    optics_rows = []
    box_known = bool(np.all(table.box_size > 0))
    for group in group_ids:
        members = table.optics_group == group
        row = [str(int(group)), f"opticsGroup{int(group)}"]
        for column, field in _OPTICS_FIELDS:
            if column == "rlnImageSize" and not box_known:
                continue
            values = np.unique(getattr(table, field)[members])
            if len(values) > 1:
                raise InputError(
                    f"{path}: optics group {group} has several {field} values "
                    f"({', '.join(f'{v:g}' for v in values[:4])}); give each its own optics_group"
                )
            row.append(_number(values[0]))
            if column == "rlnImageSize":
                row.append("2")  # rlnImageDimensionality
        optics_rows.append(row)
    optics_columns = ["rlnOpticsGroup", "rlnOpticsGroupName"]
    for column, _ in _OPTICS_FIELDS:
        if column == "rlnImageSize":
            if box_known:
                optics_columns += ["rlnImageSize", "rlnImageDimensionality"]
        else:
            optics_columns.append(column)

    fields = [(c, get) for c, get in _PARTICLE_FIELDS if table.has_ctf or c not in _CTF_ONLY]
    particle_columns = ["rlnImageName"] + [c for c, _ in fields] + ["rlnOpticsGroup"]
    values = [[_number(v) for v in get(table)] for _, get in fields]
    groups = [str(int(g)) for g in table.optics_group]
    particle_rows = zip(image_names, *values, groups)

    with atomic_output(path) as tmp, open(tmp, "w") as out:
        out.write("\n# version 30001\n")
        _write_loop(out, "optics", optics_columns, optics_rows)
        _write_loop(out, "particles", particle_columns, particle_rows)


def _number(value: Any) -> str:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, int):
        return str(value)
    return repr(float(value))  # shortest text that reads back exactly


def _write_loop(out, name: str, columns: list[str], rows) -> None:
    out.write(f"\ndata_{name}\n\nloop_\n")
    for i, column in enumerate(columns, start=1):
        out.write(f"_{column} #{i}\n")
    out.writelines(" ".join(row) + "\n" for row in rows)
    out.write("\n")
