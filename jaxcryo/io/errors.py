"""The one error type of jaxcryo.io, and crash-safe file output.

Every problem with a user's input files raises `InputError` carrying a single
message that names the file (and the column, row or argument) and the problem,
so a command-line front end can print it and exit without a traceback.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["InputError", "atomic_output", "check_output_path", "make_output_folder"]


class InputError(ValueError):
    """A bad input file or argument; the message says which and why."""


def check_output_path(path: str | os.PathLike, *, folder: bool = False) -> str:
    """Check, before any work, that ``path`` can be written; return it absolute.

    Missing parent folders are fine (:func:`make_output_folder` creates them when the
    output is written); nothing is created here. Refused, with an InputError naming
    ``path`` as the user gave it: an output file that is an existing folder (or, with
    ``folder=True``, an output folder that is an existing file), a parent that is a file,
    and a folder (or file) that is not writable.

    Example:
        >>> out = check_output_path("rec/map.mrc")  # doctest: +SKIP
    """
    given = os.fspath(path)
    if not given:
        raise InputError("output path is empty")
    full = os.path.abspath(given)
    if folder:
        if os.path.exists(full) and not os.path.isdir(full):
            raise InputError(f"{given}: exists and is not a folder; give a folder for the outputs")
    elif os.path.isdir(full):
        raise InputError(f"{given}: is a folder; give a file name (e.g. {os.path.join(given, 'out')})")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise InputError(f"{given}: exists and is not writable")
    parent = full if folder and os.path.isdir(full) else os.path.dirname(full)
    while not os.path.exists(parent):  # the nearest existing ancestor is where folders get created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{given}: cannot write, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{given}: cannot write, folder {parent} is not writable")
    return full


def make_output_folder(path: str | os.PathLike, *, folder: bool = False) -> str:
    """Create the missing folders above output file ``path`` (or ``path`` itself when
    ``folder``), as RELION does; return ``path`` absolute. Call after the inputs are checked,
    so a refused run leaves nothing behind."""
    full = os.path.abspath(os.fspath(path))
    target = full if folder else os.path.dirname(full)
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as err:
        raise InputError(f"{os.fspath(path)}: cannot create folder {target}: {err.strerror or err}") from None
    return full


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success move it onto `path`.

    The temporary file lives in the destination folder so that the final
    `os.replace` is atomic: readers see either the old file or the complete new
    one, never a half-written file. On any error the temporary file is removed.

    Example:
        >>> with atomic_output("out.star") as tmp:  # doctest: +SKIP
        ...     open(tmp, "w").write("data_\\n")
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        raise InputError(f"{path}: cannot write, folder {folder} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, cannot write a file there")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise InputError(f"{path}: cannot write in {folder}: {err.strerror}") from err
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file private (0600); a result file should have the
        # permissions of any other file the user creates.
        os.chmod(tmp, 0o644)
        try:
            os.replace(tmp, path)
        except OSError as err:  # name the user's file, not the temporary one
            raise InputError(f"{path}: cannot write: {err.strerror or err}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
