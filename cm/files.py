"""Output files that never destroy inputs: atomic writes, overwrite and input checks, umask modes.

Every file ``cm`` writes goes through ``atomic_path``: the data goes to a hidden temporary file
next to the target, which takes the target's name only when complete, with the permissions of
the user's umask (``mkstemp`` alone would leave 0600). Writers that append a suffix to the name
they are given (``np.savez``) are handed an open file instead (``atomic_open``), so the output is
always exactly at the path the user gave.
"""

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from cm.errors import UserError


def umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name the same file or directory (or ``a`` lies inside ``b``)."""
    a, b = Path(a).absolute(), Path(b).absolute()
    if a.exists() and b.exists() and os.path.samefile(a, b):
        return True
    a, b = a.resolve(), b.resolve()
    return a == b or (b.is_dir() and a.is_relative_to(b))


def check_output(
    path: str | Path,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """Fail early, before any work, if ``path`` cannot or must not be written as an output file.

    Args:
        path: the output file.
        inputs: the files and directories the command reads; writing onto one is refused.
        overwrite: allow replacing an existing file (never an input).
        option: the command-line option that named ``path``, for the message.
    """
    path = Path(path)
    for source in inputs:
        if source is not None and same_file(path, source):
            raise UserError(
                f"{option} '{path}' is one of this command's inputs ('{source}'): write the "
                "output to another path."
            )
    if path.is_dir():
        raise UserError(f"{option} '{path}' is a directory: pass a file name.")
    if path.exists() and not overwrite:
        raise UserError(
            f"{option} '{path}' already exists: pass another path, or --overwrite to replace it."
        )
    parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write '{path}': '{parent}' is not a writable directory.")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` that takes its name only if the block completes.

    A crash or an error leaves the old file (or none) and no partial one: write to the yielded
    path. The temporary name ends in ``path``'s own suffix (PIL goes by it); a writer that adds a
    suffix of its own must use ``atomic_open``. The file gets the umask's permissions.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"Output '{path}' is a directory: pass a file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if not tmp.is_file() or (tmp.stat().st_size == 0 and _stray(tmp)):
            raise RuntimeError(f"The writer of '{path}' wrote to another name than '{tmp}'.")
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stray(tmp: Path) -> bool:
    """Whether a writer left its data beside ``tmp`` under a longer name (and remove it)."""
    strays = list(tmp.parent.glob(f"{tmp.name}.*"))
    for stray in strays:
        stray.unlink(missing_ok=True)
    return bool(strays)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """An open file whose contents take the name ``path`` only if the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
