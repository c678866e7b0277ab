"""Where results go: check a destination before the work starts, then write files atomically.

A benchmark, profile or export can run for minutes; finding out only at the end that the folder is
read-only, is a file, or that the disk is full loses that work. ``check_output_dir`` /
``check_output_file`` probe the destination up front without creating anything, and ``atomic_write``
writes through a temporary file in the same folder, so a failure (or Ctrl-C) never leaves a torn or
partial file under the final name. Importable without torch (the predictor uses it).

Only a new path or a regular file is ever replaced. ``os.replace`` renames over whatever sits at the final
name, so ``-o /dev/null`` run as root replaced the device node with the model, and a FIFO or a socket
would be swapped out the same way; a symlink is refused too, since the user named the link and meant the
file behind it, which a rename would leave untouched while silently unlinking the link. A destination that
is one of the work's own inputs (``export -o`` equal to ``--checkpoint``) is refused before the work,
not found out after the weights are gone: callers pass ``inputs=``.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

__all__ = ["OutputPathError", "ResultsNotWritten", "check_output_dir", "check_output_file", "check_new_dataset_dir",
           "atomic_write", "atomic_write_text"]

PathLike = Union[str, os.PathLike]
Inputs = Union[PathLike, Iterable[Optional[PathLike]], None]


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


def _kind(mode: int) -> str:
    """What a file is, in words, from its ``st_mode`` (``lstat``'s: a symlink is itself, not its target)."""
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symlink"),
                        (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"  # doors, whiteouts, event ports: never ours to replace either


def _lstat(path: Path) -> Optional[os.stat_result]:
    """``os.lstat(path)``, or None where nothing is there yet (a new path, or one the probe will explain)."""
    try:
        return os.lstat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None


def _refuse_special(path: Path) -> None:
    """Refuse an existing ``path`` that is not a regular file: what ``os.replace`` must never rename over."""
    st = _lstat(path)
    if st is None or stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{path}: is a folder, not a file name")
    raise OutputPathError(f"{path}: is {_kind(st.st_mode)}; expected a regular file or a new path")


def _input_paths(inputs: Inputs) -> list:
    # a lone path is one input, not an iterable of one-letter paths
    if inputs is None or isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]
    return [Path(os.fsdecode(p)) for p in inputs if p is not None]


def _same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: by inode where both exist (hard links, case-insensitive file
    systems, links in the folders above), else by the resolved spelling (``./a/../a/x`` is ``a/x``)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: it cannot be the same as anything readable
        return False


def _refuse_inputs(target: Path, inputs: Inputs, what: str) -> None:
    for source in _input_paths(inputs):
        if _same_path(target, source):
            raise OutputPathError(f"{target}: is also an input ({source}); write the {what} to another path")


def check_output_dir(directory: PathLike, need_bytes: int = 0, inputs: Inputs = ()) -> Path:
    """Raise ``OutputPathError`` unless files can be created in ``directory`` (created later if missing).

    Probes by creating (and deleting) a temporary file in the nearest existing folder on the path, which
    catches read-only mounts and permissions as they apply to this process (also for root), and checks
    that the file system has ``need_bytes`` free. Creates nothing that stays. A symlink to a folder is
    fine (results on a bigger disk); a dangling one, a FIFO, a device or a symlink to one is refused, and so
    is a folder that is one of ``inputs`` (None entries are skipped).
    """
    directory = Path(directory)
    st = _lstat(directory)
    if st is not None and stat.S_ISLNK(st.st_mode) and not directory.exists():
        # the probe would look past it to the folder above, and mkdir(exist_ok=True) fail on it after the work
        raise OutputPathError(f"{directory}: is a symlink to a missing target; expected a folder or a new path")
    _refuse_inputs(directory, inputs, "output folder")
    _probe(directory, directory, need_bytes)  # names a file, FIFO or device in the way, through symlinks too
    return directory


def check_output_file(path: PathLike, need_bytes: int = 0, inputs: Inputs = ()) -> Path:
    """``check_output_dir`` for the folder of ``path``; also refuses a path that is an existing folder.

    Only a new path or an existing regular file passes: a symlink, FIFO, device or socket is refused, and so
    is a path that names the same file as one of ``inputs`` (None entries are skipped), so that
    ``export -o`` onto ``--checkpoint`` fails before the export instead of destroying the weights.
    """
    path = Path(path)
    _refuse_special(path)
    _refuse_inputs(path, inputs, "output")
    _probe(path, path.parent, need_bytes)
    return path


def check_new_dataset_dir(directory: PathLike, need_bytes: int = 0) -> Path:
    """``check_output_dir`` for a folder that a dataset writer fills (``cpubone make-digits``): it must be new
    or empty, since a folder with files in it would mix the old files into the new dataset's classes."""
    directory = check_output_dir(directory, need_bytes)
    if directory.is_dir():
        try:
            with os.scandir(directory) as entries:
                first = next(entries, None)
        except OSError as e:
            raise OutputPathError(f"cannot write {directory}: {e.strerror or e}") from None
        if first is not None:
            raise OutputPathError(f"{directory}: is a folder that is not empty (it holds {first.name!r}); "
                                  "expected a new or empty folder")
    return directory


def _probe(target: Path, directory: Path, need_bytes: int) -> None:
    base = _existing_ancestor(directory)
    if not base.is_dir():
        try:  # stat, not lstat: exists() followed the symlinks already, so name what they lead to
            mode = os.stat(base).st_mode
        except OSError:
            mode = stat.S_IFREG
        what = "a file" if stat.S_ISREG(mode) else _kind(mode)
        raise OutputPathError(f"cannot write {target}: {base} is {what}, not a folder")
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
    permissions) becomes an ``OutputPathError`` naming ``path``. Only a new path or a regular file is
    replaced: anything else at ``path`` (a FIFO, a device such as /dev/null, a socket, a symlink, a folder)
    raises ``OutputPathError`` before ``write`` runs, and again if one appeared while it ran.
    """
    path = Path(path)
    _refuse_special(path)  # before the write, which can take minutes
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}") from None
    # keep the suffix: writers such as matplotlib pick the format from it
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    # a FIFO there would block the writer, a symlink would send the bytes to its target, and the cleanup below
    # would delete something that is not ours: leave it alone and stop
    tmp_st = _lstat(tmp)
    if tmp_st is not None and not stat.S_ISREG(tmp_st.st_mode):
        raise OutputPathError(f"cannot write {path}: its temporary name {tmp.name} is taken by "
                              f"{_kind(tmp_st.st_mode)}")
    try:
        write(tmp)
        _refuse_special(path)  # again: the window left to a rename over a special file is this one line
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
