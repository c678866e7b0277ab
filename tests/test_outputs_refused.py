"""Outputs that would replace an input, a special file or an existing dataset are refused in one line, before
any work, and nothing is changed (the commands wire ``cpubone.outputs``' checks)."""
import os

import pytest

from cpubone.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_export_onto_its_checkpoint_is_refused(tmp_path, capsys):
    weights = tmp_path / "best.safetensors"
    weights.write_bytes(b"trained weights")
    assert main(["export", "cpubone_nano", "--checkpoint", str(weights), "--size", "32", "32",
                 "-o", str(tmp_path / "." / "best.safetensors")]) == 2
    assert "is also an input" in _one_line(capsys) and weights.read_bytes() == b"trained weights"


def test_export_onto_a_fifo_is_refused(tmp_path, capsys):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    assert main(["export", "cpubone_nano", "--size", "32", "32", "-o", str(fifo)]) == 2
    line = _one_line(capsys)
    assert "pipe.onnx" in line and "FIFO" in line and fifo.is_fifo()


def test_export_onto_dev_null_is_refused(capsys):
    before = os.stat("/dev/null")
    assert main(["export", "cpubone_nano", "--size", "32", "32", "-o", "/dev/null"]) == 2
    assert "/dev/null" in _one_line(capsys)
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_make_digits_into_a_non_empty_folder_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "train" / "cat").mkdir(parents=True)
    (data / "train" / "cat" / "1.png").write_bytes(b"mine")
    assert main(["make-digits", str(data)]) == 2
    assert "not empty" in _one_line(capsys)
    assert sorted(p.name for p in (data / "train").iterdir()) == ["cat"]


def test_design_search_onto_its_table_is_refused(tmp_path, capsys):
    lut = tmp_path / "t.json"
    lut.write_text("{}")
    assert main(["design", "search", "--budget-ms", "1", "--lut", str(lut), "-o", str(lut),
                 "--out-dir", str(tmp_path / "out")]) == 2
    assert "is also an input" in _one_line(capsys) and lut.read_text() == "{}"


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_design_lut_never_replaces_a_special_file(tmp_path, capsys, kind):
    target = tmp_path / "real.json"
    target.write_text("keep")
    out = tmp_path / "lut.json"
    os.mkfifo(out) if kind == "fifo" else out.symlink_to(target)
    assert main(["design", "lut", "--no-space", "-o", str(out), "--size", "64", "64"]) == 2
    assert "lut.json" in _one_line(capsys) and target.read_text() == "keep"
