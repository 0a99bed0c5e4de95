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

__all__ = ["InputError", "atomic_output"]


class InputError(ValueError):
    """A bad input file or argument; the message says which and why."""


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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
