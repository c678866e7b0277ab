"""Command-line errors of the training commands: one line naming the problem, no traceback; the library's
messages name no flags; ``python -m cpubone.train`` is the command line's ``train``."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpubone.cli import main
from cpubone.downstream.datasets import write_synthetic_ade
from cpubone.train import TrainConfig, get_recipe, train
from cpubone.train.data import write_digits_imagefolder

from conftest import subset_imagefolder

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    full = write_digits_imagefolder(tmp_path_factory.mktemp("digits_full"), size=16)
    return subset_imagefolder(full, tmp_path_factory.mktemp("digits") / "d", {"train": 2, "val": 1})


def _train_args(data, out, *extra):
    return ["train", "--data", str(data), "--model", "cpubone_nano", "--recipe", "digits", "--img-size", "16",
            "--batch-size", "10", "--workers", "0", "--no-progress", "--no-tensorboard", "--output", str(out), *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["--accum-steps", "0"], "--accum-steps must be at least 1, got 0"),
    (["--checkpoint-every", "-2"], "--checkpoint-every must not be negative"),
    (["--lr", "0"], "--lr must be positive"),
])
def test_bad_numbers_are_one_line_errors(extra, message, tmp_path, capsys):
    assert main(_train_args(tmp_path / "none", tmp_path / "o", *extra)) == 2
    assert message in _error(capsys)


def test_unknown_model_argument(digits, tmp_path, capsys):
    assert main(_train_args(digits, tmp_path / "o", "--model-kwargs", "foo=1")) == 2
    err = _error(capsys)
    assert "cpubone_nano: unknown model argument" in err and "foo" in err


def test_resume_from_a_run_folder_and_onto_other_classes(digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(digits, out, "--epochs", "1", "--model-kwargs", "head_widths=[16,16]")) == 0
    capsys.readouterr()
    assert main(_train_args(digits, out, "--epochs", "1", "--resume", str(out))) == 0  # the folder's last.pt
    assert f"resumed from {out / 'last.pt'}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_train_args(digits, out, "--resume", str(empty))) == 2
    assert f"{empty} is a folder without last.pt" in _error(capsys)
    three = tmp_path / "three"
    for split in ("train", "val"):
        for c in ("0", "1", "2"):
            shutil.copytree(digits / split / c, three / split / c)
    assert main(_train_args(three, tmp_path / "o", "--resume", str(out))) == 2
    err = _error(capsys)
    assert "has 3 class folders but the checkpoint was trained on 10 classes" in err


def test_library_errors_name_no_flags(digits, tmp_path):
    r = get_recipe("digits", "cpubone_nano").replace(epochs=0)
    with pytest.raises(ValueError, match="recipe field epochs must be a positive integer") as e:
        train(TrainConfig(data=str(digits), model="cpubone_nano", recipe=r, output=str(tmp_path / "o"), num_workers=0))
    assert "--" not in str(e.value)


def test_segment_train_iters_zero(tmp_path, capsys):
    write_synthetic_ade(tmp_path / "ade", 2, size=32, num_classes=3, seed=0, split="training")
    assert main(["segment", "train", "--data", str(tmp_path / "ade"), "--output", str(tmp_path / "o"),
                 "--iters", "0"]) == 2
    assert "--iters must be at least 1, got 0" in _error(capsys)


def test_python_m_cpubone_train_is_the_cli(tmp_path):
    env = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "cpubone.train", "--model", "cpubone_b1", "--print-config"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert '"batch_per_process": 256' in res.stdout
    res = subprocess.run([sys.executable, "-m", "cpubone.train", "--epochs", "0"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == "cpubone train: error: --epochs must be at least 1, got 0"
