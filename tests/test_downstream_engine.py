"""Detection and segmentation on the training engine: 2 gloo processes (torchrun) equal one process at the
same global batch; a run SIGKILLed mid-way and resumed ends with the uninterrupted run's weights; the
training's skipped-image count survives the evaluation; a NaN loss raises the engine's TrainingDiverged.

The backbone is timm's ``test_convnext`` (LayerNorm only): BatchNorm's batch statistics are per process and
torch's SyncBatchNorm has no CPU implementation. Augmentation stays on (each sample's draws depend on
(seed, epoch, index) only); the Semantic FPN runs without dropout, whose masks are per process.
Tolerances: resume is exact (1e-6); DDP 1e-4 (AdamW turns summation-order noise of the all-reduce into ~1e-5).
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpubone.downstream.datasets import write_synthetic_ade, write_synthetic_coco
from cpubone.downstream.api import (DetectionTrainConfig, SegmentationTrainConfig, train_detection,
                                       train_segmentation)
from cpubone.downstream import tasks as tasks_mod
from cpubone.train import TrainingDiverged, load_training_state

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env():
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_synthetic_coco(root, 8, size=64, num_classes=2, seed=0, split="train")
    return root


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    write_synthetic_ade(root, 8, size=64, num_classes=2, seed=0, split="training")
    return root


def _detect(data, out, *extra):
    return ["detect", "train", "--data", str(data), "--output", str(out), "--backbone", "test_convnext",
            "--val-split", "none", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup-iters", "1",
            "--fpn-channels", "16", "--min-size", "64", "--max-size", "64", "--workers", "0", "--log-every", "1",
            "--checkpoint-every", "1", "--seed", "5", *extra]


def _segment(data, out, *extra):
    # crops of 32 from images rescaled to at least 32 px: no padded (ignored) pixels, so that the mean loss of
    # each process's half-batch averages to the loss of the whole batch
    return ["segment", "train", "--data", str(data), "--output", str(out), "--backbone", "test_convnext",
            "--val-split", "none", "--num-classes", "3", "--no-reduce-zero-label", "--iters", "4", "--eval-every", "2",
            "--batch-size", "4", "--crop-size", "32", "--base-size", "64", "--lr", "1e-3", "--fpn-channels", "16",
            "--head-channels", "16", "--dropout", "0", "--workers", "0", "--log-every", "1", "--checkpoint-every", "1",
            "--seed", "5", *extra]


def _run(args, processes=1, kill_at=None):
    if processes == 1:
        cmd = [sys.executable, "-m", "cpubone", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "cpubone", *args]
    if kill_at is None:
        # no stdin, own session: see ISOLATED in tests/test_train_distributed.py
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"checkpoint: global step {kill_at} "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.read()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)


def _same(a, b, atol):
    for k, v in a["model"].items():
        if v.is_floating_point():
            assert (v - b["model"][k]).abs().max().item() <= atol, k
        else:
            assert torch.equal(v, b["model"][k]), k


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_ddp_and_resume_match_one_uninterrupted_process(task, coco, ade, tmp_path):
    build, data, steps = (_detect, coco, 4) if task == "detect" else (_segment, ade, 4)
    out = _run(build(data, tmp_path / "one"))
    assert out.count(f"{'RetinaNet' if task == 'detect' else 'Semantic FPN'} on test_convnext") == 1
    two_out = _run(build(data, tmp_path / "two"), processes=2)
    assert "2 process(es) x 1 accumulation x 2" in two_out
    _run(build(data, tmp_path / "cut"), kill_at=1)  # mid-epoch (2 steps per epoch / block)
    assert load_training_state(tmp_path / "cut" / "last.pt")["global_step"] == 1
    _run(build(data, tmp_path / "cut", "--resume", str(tmp_path / "cut")))
    one, two, cut = (load_training_state(tmp_path / n / "last.pt") for n in ("one", "two", "cut"))
    assert one["global_step"] == two["global_step"] == cut["global_step"] == steps
    _same(one, cut, 1e-6)
    _same(one, two, 1e-4)
    init = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["model"]
    assert (tmp_path / "cut" / "model.pt").is_file() and all(torch.equal(v, one["model"][k]) for k, v in init.items())
    hist = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [h["global_step"] for h in hist] == [2, 4]  # the redone epoch is recorded once


def test_skipped_images_count_the_training(coco, tmp_path):
    import shutil

    data = tmp_path / "coco"
    shutil.copytree(coco, data)
    (data / "images" / "train" / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_synthetic_coco(data, 2, size=64, num_classes=2, seed=1, split="val")
    logs = []
    cfg = DetectionTrainConfig(data=str(data), output=str(tmp_path / "run"), backbone="test_convnext", epochs=2,
                               batch_size=4, fpn_channels=16, min_size=64, max_size=64, workers=0, log_every=0)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        result = train_detection(cfg, log=logs.append)
    assert result["skipped_images"] == 2 and result["val_skipped_images"] == 0  # once per epoch, none in val
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["skipped_images"] for h in hist] == [1, 2] and [h["val_skipped_images"] for h in hist] == [0, 0]
    assert "skipped_images 2" in logs[-1]


def test_segmentation_nan_raises_training_diverged(ade, tmp_path, monkeypatch):
    def nan_loss(self, model, batch, ema, progress):
        return torch.tensor(float("nan"), requires_grad=True), 1

    monkeypatch.setattr(tasks_mod.SegmentationTask, "loss", nan_loss)
    cfg = SegmentationTrainConfig(data=str(ade), output=str(tmp_path / "run"), num_classes=3, reduce_zero_label=False,
                                  backbone="test_convnext", val_split=None, fpn_channels=16, head_channels=16, iters=2,
                                  batch_size=2, crop_size=32, base_size=32, workers=0, log_every=0)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, global step 1 .*no checkpoint had been written"):
        train_segmentation(cfg, log=lambda s: None)
