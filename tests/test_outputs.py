"""Destinations checked before the work, files written atomically (cpubone.outputs)."""
import errno
import os
import shutil

import pytest

from cpubone.outputs import OutputPathError, atomic_write, atomic_write_text, check_output_dir, check_output_file


def test_check_output_dir_creates_nothing_and_names_the_problem(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_dir(target) == target
    assert list(tmp_path.iterdir()) == []  # probed, nothing created or left behind
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match=r"file.txt is a file, not a folder"):
        check_output_dir(blocker / "out")
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output_file(tmp_path)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OutputPathError, match="MiB free on its file system"):
        check_output_dir(target, need_bytes=free + 2 ** 30)


def test_check_output_dir_in_a_removed_working_directory(tmp_path, monkeypatch):
    # a working directory that no longer exists refuses new files to every user, root included
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(OutputPathError, match="cannot write out.*not writable"):
        check_output_dir("out")
    with pytest.raises(OutputPathError, match="cannot write model.onnx"):
        check_output_file("model.onnx")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through folder permissions")
def test_check_output_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_file(ro / "sub" / "bench.json")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_atomic_write_leaves_old_file_and_no_temporary(tmp_path, failure):
    path = tmp_path / "bench.json"
    atomic_write_text(path, "old")

    def write(tmp):
        tmp.write_text("partial")
        raise failure

    with pytest.raises(OutputPathError if isinstance(failure, OSError) else KeyboardInterrupt) as info:
        atomic_write(path, write)
    if isinstance(failure, OSError):
        assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_atomic_write_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    seen = []
    atomic_write(tmp_path / "plot.png", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"png")))
    assert seen == [".png"] and (tmp_path / "plot.png").read_bytes() == b"png"
