"""MRC maps and image stacks <-> numpy arrays.

Volumes are returned indexed (z, y, x), the order RELION and ChimeraX use for
the file's sections, rows and columns when the header's axis map is the
standard (1, 2, 3); other axis maps are permuted into that order on reading.
Written files have origin 0 and n[xyz]start 0, like RELION's output, so
viewers place maps written here on top of RELION's.
"""

from __future__ import annotations

import os
import warnings

import mrcfile
import numpy as np

from jaxcryo.io.errors import InputError, atomic_output

__all__ = ["read_map", "write_map", "write_stack", "open_stack", "MrcStack"]


def read_map(path) -> tuple[np.ndarray, float]:
    """Read a cubic density map.

    Returns:
        (volume, voxel_size_angstrom): volume is float32 (z, y, x); the voxel
        size is the header's (0.0 when the header does not say; the caller
        decides what to do then).

    Raises:
        InputError: missing/unreadable file, non-cubic map, NaN or Inf values.
    """
    path = os.fspath(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive mode warns about header quirks
            with mrcfile.open(path, mode="r", permissive=True) as mrc:
                if mrc.data is None:
                    raise InputError(f"{path}: unreadable MRC file (bad header or truncated data)")
                volume = _standard_axes(mrc.data, mrc.header)
                voxel_size = _header_float(mrc.voxel_size.x)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{path}: unreadable MRC file ({type(err).__name__}: {err})") from err
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"{path}: expected a cubic 3-D map, found shape {volume.shape} (z, y, x)")
    volume = np.array(volume, dtype=np.float32)  # also copies off the file
    if not np.isfinite(volume).all():
        raise InputError(f"{path}: map contains NaN or Inf values")
    return volume, voxel_size


def write_map(path, volume, *, voxel_size_angstrom: float) -> None:
    """Write a float32 (z, y, x) volume as an MRC map, atomically.

    The header gets the voxel size, origin (0, 0, 0) and n[xyz]start 0.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise InputError(f"{os.fspath(path)}: write_map needs a 3-D volume, got shape {volume.shape}")
    _write(path, volume, voxel_size_angstrom, image_stack=False)


def write_stack(path, images, *, pixel_size_angstrom: float) -> None:
    """Write (n, N, N) images as a float32 .mrcs image stack (ispg 0), atomically."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise InputError(f"{os.fspath(path)}: write_stack needs (n, N, N) images, got shape {images.shape}")
    _write(path, images, pixel_size_angstrom, image_stack=True)


def _write(path, data: np.ndarray, voxel_size: float, *, image_stack: bool) -> None:
    with atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if image_stack:
                mrc.set_image_stack()
            mrc.voxel_size = float(voxel_size)
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
            mrc.update_header_stats()


class MrcStack:
    """A memory-mapped (n, N, N) image stack; keep it open while using `data`.

    Attributes:
        path: the stack file.
        data: (n, N, N) read-only memory map, in the file's dtype.
        pixel_size_angstrom: the header's pixel size (0.0 if unset).
    """

    def __init__(self, path: str, mrc, data: np.ndarray, pixel_size_angstrom: float):
        self.path = path
        self._mrc = mrc
        self.data = data
        self.pixel_size_angstrom = pixel_size_angstrom

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def box_size(self) -> int:
        return self.data.shape[-1]

    def close(self) -> None:
        if self._mrc is not None:
            self.data = None
            self._mrc.close()
            self._mrc = None

    def __enter__(self) -> MrcStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stack(path) -> MrcStack:
    """Memory-map an image stack (.mrcs, or a single-image .mrc read as n=1).

    Raises:
        InputError: missing file, unreadable header or data, non-square images.
    """
    path = os.fspath(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as err:
        raise InputError(f"{path}: unreadable MRC stack ({type(err).__name__}: {err})") from err
    data = mrc.data
    if data is None:
        mrc.close()
        raise InputError(f"{path}: unreadable MRC stack (bad header or truncated data)")
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        mrc.close()
        raise InputError(f"{path}: expected square images, found stack shape {data.shape} (n, y, x)")
    return MrcStack(path, mrc, data, _header_float(mrc.voxel_size.x))


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected an MRC file")


def _header_float(value) -> float:
    """A float32 header value as the decimal it was meant to be (1.7, not 1.6999999).

    The voxel size is cella / mx computed in float32, which can be a unit in the
    last place off the float32 nearest the intended value; 6 significant digits
    is what float32 reliably carries.
    """
    return float(f"{float(value):.6g}")


def _standard_axes(data: np.ndarray, header) -> np.ndarray:
    """Permute data from the file's (section, row, column) axes into (z, y, x)."""
    axis_map = (int(header.maps), int(header.mapr), int(header.mapc))  # per data axis: 1=x 2=y 3=z
    if data.ndim != 3 or axis_map == (3, 2, 1) or sorted(axis_map) != [1, 2, 3]:
        return data
    return np.transpose(data, [axis_map.index(k) for k in (3, 2, 1)])
