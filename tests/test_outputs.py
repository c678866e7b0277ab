"""Destinations checked before the work, files written atomically (cpubone.outputs)."""
import errno
import os
import shutil
import socket
from pathlib import Path

import pytest

from cpubone.outputs import (
    OutputPathError,
    atomic_write,
    atomic_write_text,
    check_new_dataset_dir,
    check_output_dir,
    check_output_file,
)


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


def _never_called(tmp):
    raise AssertionError("atomic_write ran the writer for a destination it must refuse")


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_fifo_is_refused_before_and_by_the_write(tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    for check in (check_output_file, lambda p: atomic_write(p, _never_called), lambda p: atomic_write_text(p, "x")):
        with pytest.raises(OutputPathError, match=r"model.onnx: is a named pipe \(FIFO\); expected a regular") as e:
            check(fifo)
        _one_line(e)
    with pytest.raises(OutputPathError, match=r"model.onnx is a named pipe \(FIFO\), not a folder"):
        check_output_dir(fifo)  # not a folder to write into either
    (tmp_path / "out").symlink_to(fifo)
    with pytest.raises(OutputPathError, match=r"out is a named pipe \(FIFO\), not a folder"):
        check_output_dir(tmp_path / "out")
    (tmp_path / "out").unlink()
    with pytest.raises(OutputPathError, match=r"model.onnx is a named pipe \(FIFO\), not a folder"):
        check_output_file(fifo / "x.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"] and fifo.is_fifo()


def test_a_symlink_is_refused_and_its_target_left_alone(tmp_path):
    target = tmp_path / "weights.pt"
    target.write_bytes(b"trained")
    link = tmp_path / "model.onnx"
    link.symlink_to(target)
    with pytest.raises(OutputPathError, match="model.onnx: is a symlink; expected a regular file"):
        check_output_file(link)
    with pytest.raises(OutputPathError, match="is a symlink"):
        atomic_write_text(link, "exported")
    assert link.is_symlink() and target.read_bytes() == b"trained"
    dangling = tmp_path / "out"
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(OutputPathError, match="out: is a symlink to a missing"):
        check_output_dir(dangling)
    folder = tmp_path / "results"
    folder.mkdir()
    (tmp_path / "elsewhere").symlink_to(folder)
    assert check_output_dir(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # results on another disk: fine


def test_dev_null_is_refused_never_written(tmp_path):
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null here")
    before = os.stat("/dev/null")
    with pytest.raises(OutputPathError, match="/dev/null: is a character device"):
        check_output_file("/dev/null")
    with pytest.raises(OutputPathError, match="/dev/null: is a character device"):
        atomic_write("/dev/null", _never_called)
    with pytest.raises(OutputPathError, match="/dev/null is a character device, not a folder"):
        check_output_dir("/dev/null")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s.sock"
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes on Linux, 104 on macOS
        pytest.skip("temporary folder path too long for a Unix socket")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        with pytest.raises(OutputPathError, match="s.sock: is a socket; expected a regular file"):
            check_output_file(path)
        with pytest.raises(OutputPathError, match="is a socket"):
            atomic_write_text(path, "x")
        assert path.is_socket()
    finally:
        server.close()


def test_an_output_that_is_an_input_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    ckpt = tmp_path / "a" / "best.pt"
    ckpt.write_bytes(b"trained")
    for spelling in (ckpt, "a/best.pt", "./a/../a/best.pt", str(tmp_path / "a" / "." / "best.pt")):
        with pytest.raises(OutputPathError, match=r"is also an input \(.*best.pt\)") as e:
            check_output_file(spelling, inputs=[None, "other.pt", ckpt])
        _one_line(e)
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_file("a/best.pt", inputs="./a/../a/best.pt")  # a lone path is one input, not its letters
    (tmp_path / "hard.pt").hardlink_to(ckpt)
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_file("hard.pt", 0, [ckpt])  # the same file under another name
    new = tmp_path / "b" / "new.pt"  # neither exists yet: the spelling decides
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_file(new, inputs=["b/../b/new.pt"])
    assert check_output_file("a/model.onnx", inputs=[ckpt, None]) == Path("a/model.onnx")
    assert check_output_file("a/model.onnx", 2 ** 10, None).name == "model.onnx"  # positional, as callers pass it
    with pytest.raises(OutputPathError, match="is also an input"):
        check_output_dir("./a/", inputs=[tmp_path / "a"])
    assert check_output_dir("a/deploy", inputs=[tmp_path / "a", ckpt]) == Path("a/deploy")  # beside, not onto
    assert ckpt.read_bytes() == b"trained"


def test_atomic_write_refuses_a_fifo_that_appears_while_writing(tmp_path):
    path = tmp_path / "model.onnx"

    def write(tmp):
        tmp.write_bytes(b"model")
        os.mkfifo(path)  # what another process could do during a minutes-long export

    with pytest.raises(OutputPathError, match="is a named pipe"):
        atomic_write(path, write)
    assert path.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left


def test_atomic_write_leaves_a_special_file_at_its_temporary_name_alone(tmp_path):
    path = tmp_path / "bench.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    tmp = tmp_path / f".bench.tmp{os.getpid()}.json"
    tmp.symlink_to(victim)
    with pytest.raises(OutputPathError, match="temporary name .* is taken by a symlink"):
        atomic_write(path, _never_called)
    assert victim.read_text() == "keep" and tmp.is_symlink() and not path.exists()


def test_atomic_write_still_replaces_a_regular_file(tmp_path):
    path = tmp_path / "bench.json"
    atomic_write_text(path, "old")
    assert check_output_file(path) == path
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_check_new_dataset_dir(tmp_path):
    assert check_new_dataset_dir(tmp_path / "digits") == tmp_path / "digits"  # new: fine
    assert not (tmp_path / "digits").exists()  # and not created by the check
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_new_dataset_dir(empty) == empty
    full = tmp_path / "full"
    (full / "train" / "0").mkdir(parents=True)
    with pytest.raises(OutputPathError, match=r"full: is a folder that is not empty \(it holds 'train'\)") as e:
        check_new_dataset_dir(full)
    _one_line(e)
    (tmp_path / "link").symlink_to(full)
    with pytest.raises(OutputPathError, match="not empty"):
        check_new_dataset_dir(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_new_dataset_dir(tmp_path / "file")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputPathError, match="is a named pipe"):
        check_new_dataset_dir(tmp_path / "fifo")
