"""Atomic file output: write to a temporary file beside the target, then rename over it."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

# mkstemp creates 0600 files; outputs should get the usual permissions (0666 minus the umask)
_UMASK = os.umask(0)
os.umask(_UMASK)

__all__ = ["atomic_write", "inside", "prepare_out_dir", "remove_temporaries", "write_json", "write_npy"]

#: the names :func:`atomic_write` gives its temporary files: ``.NAME.XXXXXXXX.tmp[.SUFFIX]``
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")


def prepare_out_dir(path: str | Path) -> Path:
    """Create the output folder ``path`` (and parents); a clear error if it exists as a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output folder {path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one rename: readers never see half a file.

    ``durable=True`` also flushes the file and its folder to the disk (``fsync``) before returning, so the new
    file survives a power loss or an operating-system crash; without it, a crash of the machine (not of the
    process) within the operating system's write-back delay can leave the old file or an empty one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)
    return path


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the file itself was flushed
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls left in ``folder`` (a process
    killed between writing and renaming); returns what was removed. Call it only where no other process is
    writing into ``folder`` (a resumed run, before it writes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if _TEMPORARY.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def inside(folder: str | Path, relative: object, what: str = "path") -> Path:
    """``folder / relative`` with symlinks resolved, for a path read from a saved artefact (a JSON field):
    a ``ValueError`` unless it stays inside ``folder``. Absolute paths, ``..`` that climbs out and symlinks
    pointing out are refused; the message names ``what`` and the path as written, never anything read from
    the file it points at. The result need not exist."""
    if not isinstance(relative, str):
        raise TypeError(f"{what} must be a path relative to {folder} (a string), got {type(relative).__name__}")
    if not relative or "\x00" in relative:
        raise ValueError(f"{what} must be a non-empty path relative to {folder}, got {relative!r}")
    rel = Path(relative)
    if rel.anchor:  # "/etc/passwd", and on Windows "C:x" or "\\server\share"
        raise ValueError(f"{what} {relative!r} is an absolute path; it must be relative to {folder}")
    try:
        root = Path(folder).resolve()
        target = (root / rel).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ValueError(f"{what} {relative!r} in {folder} cannot be resolved: {type(err).__name__}") from None
    if not target.is_relative_to(root):
        raise ValueError(f"{what} {relative!r} leads outside {folder} (through '..' or a symlink); it must stay inside")
    return target


def write_json(path: str | Path, data: object) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return atomic_write(path, write)
