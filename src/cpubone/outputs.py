"""Where results go: check a destination before the work starts, then write files atomically.

A benchmark, profile or export can run for minutes; finding out only at the end that the folder is
read-only, is a file, or that the disk is full loses that work. ``check_output_dir`` /
``check_output_file`` probe the destination up front without creating anything, and ``atomic_write``
writes through a temporary file in the same folder, so a failure (or Ctrl-C) never leaves a torn or
partial file under the final name. Importable without torch (the predictor uses it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["OutputPathError", "ResultsNotWritten", "check_output_dir", "check_output_file", "atomic_write",
           "atomic_write_text"]

PathLike = Union[str, os.PathLike]


class OutputPathError(ValueError):
    """A destination that cannot be written: not a folder, read-only, or too little free space."""


class ResultsNotWritten(OutputPathError):
    """The work finished but its files could not be written; ``result`` holds what was computed."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


def _existing_ancestor(path: Path) -> Path:
    # no abspath: it fails where the working directory has been removed, a case the probe must report
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def check_output_dir(directory: PathLike, need_bytes: int = 0) -> Path:
    """Raise ``OutputPathError`` unless files can be created in ``directory`` (created later if missing).

    Probes by creating (and deleting) a temporary file in the nearest existing folder on the path, which
    catches read-only mounts and permissions as they apply to this process (also for root), and checks
    that the file system has ``need_bytes`` free. Creates nothing that stays.
    """
    directory = Path(directory)
    _probe(directory, directory, need_bytes)
    return directory


def check_output_file(path: PathLike, need_bytes: int = 0) -> Path:
    """``check_output_dir`` for the folder of ``path``; also refuses a path that is an existing folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path}: is a folder, not a file name")
    _probe(path, path.parent, need_bytes)
    return path


def _probe(target: Path, directory: Path, need_bytes: int) -> None:
    base = _existing_ancestor(directory)
    if not base.is_dir():
        raise OutputPathError(f"cannot write {target}: {base} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".cpubone-probe-"):
            pass
    except OSError as e:
        raise OutputPathError(f"cannot write {target}: {base} is not writable ({e.strerror or e})") from None
    if need_bytes > 0:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise OutputPathError(f"cannot write {target}: {_mib(free)} free on its file system, about "
                                  f"{_mib(need_bytes)} needed")


def atomic_write(path: PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path`` (same suffix), then move it into place.

    The temporary file is removed on any failure, Ctrl-C included; an ``OSError`` (disk full,
    permissions) becomes an ``OutputPathError`` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None
    # keep the suffix: writers such as matplotlib pick the format from it
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
