"""DDP: 2 processes (gloo, CPU, torchrun) end with the weights of 1 process at the same global batch.

Random-resolution batches are on (sizes 32 / 48): the runs only agree if both ranks draw the single
process's size for every batch. Model: timm's ``test_convnext`` (LayerNorm only). CPUBone uses BatchNorm, whose batch statistics are per
process unless SyncBatchNorm is used, and torch's SyncBatchNorm has no CPU implementation; a BN-free
model makes the comparison exact up to float summation order. Augmentation, Mixup/CutMix and DropPath
are off so that both runs see identical inputs (their randomness is per process by design).
Tolerance: 1e-4 absolute on every weight after 6 AdamW steps at lr 0.01 (weights move by up to ~0.06);
Adam divides by the gradient RMS, so the ~1e-7 summation-order differences of the all-reduced
gradients show up as ~1e-5 in the weights.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpubone.train.data import write_digits_imagefolder
from cpubone.train.loop import load_training_state

from conftest import ISOLATED, subset_imagefolder

pytestmark = pytest.mark.own_process  # not inside a pytest-xdist worker (Makefile)

SRC = str(Path(__file__).resolve().parents[1] / "src")




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data: Path, out: Path):
    # random resolution on: the 2 ranks must draw the same size for every batch to match one process
    return ["--data", str(data), "--model", "test_convnext", "--recipe", "digits", "--img-size", "32",
            "--img-sizes", "32", "48",
            "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--warmup-epochs", "0", "--no-aug", "--mixup", "0", "--cutmix", "0", "--drop-path", "0",
            "--workers", "0", "--seed", "3", "--no-progress", "--no-tensorboard", "--output", str(out)]


def test_two_gloo_processes_match_one(tmp_path):
    full = write_digits_imagefolder(tmp_path / "full", size=32)
    data = subset_imagefolder(full, tmp_path / "d", {"train": 5, "val": 3})  # 50 images: 6 steps of 8
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "cpubone.train", *_args(data, tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300, **ISOLATED)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "sizes [32, 48] (eval 32)" in one.stdout
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "cpubone.train", *_args(data, tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300, **ISOLATED)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 process(es) x 1 accumulation x 4" in two.stdout  # rank 0 logs, once
    assert two.stdout.count("training test_convnext") == 1

    a, b = load_training_state(tmp_path / "one" / "last.pt"), load_training_state(tmp_path / "two" / "last.pt")
    assert a["global_step"] == b["global_step"] == 6
    for key in ("model", "ema"):
        for name, wa in a[key].items():
            torch.testing.assert_close(b[key][name], wa, atol=1e-4, rtol=0, msg=f"{key}.{name}")
    # the runs trained (same init as the engine's: seed 3 before building the model), not just agreed
    from cpubone import create_model

    torch.manual_seed(3)
    init = create_model("test_convnext", num_classes=10).state_dict()
    assert max((a["model"][k] - v).abs().max().item() for k, v in init.items() if v.is_floating_point()) > 1e-2
    # evaluation is sharded without padding: every val image counted once, same accuracy
    ha, hb = json.loads(a["history"])[0], json.loads(b["history"])[0]
    assert ha["val_top1"] == hb["val_top1"] and ha["val_loss"] == pytest.approx(hb["val_loss"], abs=1e-5)
    assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-5)
