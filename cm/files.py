"""Output files that never destroy inputs: atomic writes, overwrite and input checks, umask modes.

Every file ``cm`` writes goes through ``atomic_path``: the data goes to a hidden temporary file
next to the target, which takes the target's name only when complete, with the permissions of
the user's umask (``mkstemp`` alone would leave 0600). Writers that append a suffix to the name
they are given (``np.savez``) are handed an open file instead (``atomic_open``), so the output is
always exactly at the path the user gave.

Every command that writes checks all its outputs first (``check_output``, ``check_output_dir``),
before any work: an output that is one of the command's inputs is refused always, an existing
file unless ``--overwrite`` (``add_overwrite_argument``, the one definition of that option).
"""

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cm.errors import UserError


def umask() -> int:
    """The process umask: from ``/proc`` on Linux, else by setting it back at once."""
    try:  # read-only: os.umask would change it for a moment, under other threads' feet
        status = Path("/proc/self/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Umask:")), 8)
    except (OSError, StopIteration, IndexError, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _same(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name the same file or directory (links and hard links too)."""
    a, b = Path(a).absolute(), Path(b).absolute()
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name the same file or directory (or ``a`` lies inside ``b``)."""
    if _same(a, b):
        return True
    b = Path(b)  # a file inside an input directory (an export) would change that input
    return b.is_dir() and Path(a).resolve().is_relative_to(b.resolve())


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


def add_overwrite_argument(parser: Any) -> None:
    """Add ``--overwrite``, the one flag of every command that writes files, to ``parser``."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace output files that already exist (an input of the command never is).",
    )


def check_output_dir(
    path: str | Path,
    names: Iterable[str],
    inputs: Iterable[str | Path | None] = (),
    input_dirs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """Fail early if the files ``names`` must not be written into the folder ``path``.

    Args:
        path: the output folder (created later by the writers).
        names: the file names the command will write there.
        inputs: the files and directories the command reads; none may be written onto.
        input_dirs: folders the command reads from, which must not be the output folder.
        overwrite: allow replacing existing files (never an input).
        option: the command-line option that named ``path``, for the message.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} '{path}' is a file: pass a folder for the outputs.")
    for source in (*inputs, *input_dirs):
        if source is not None and _same(path, source):
            raise UserError(
                f"{option} '{path}' is a folder this command reads from ('{source}'): write the "
                "outputs to another folder."
            )
    names = list(names)
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(
            f"Two outputs would both be written to '{path / twice[0]}' (inputs with the same "
            "name and another extension?): rename one of them."
        )
    for name in names:
        check_output(path / name, inputs, overwrite, option)
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
