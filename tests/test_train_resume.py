"""Checkpoint/resume: a run SIGKILLed mid-epoch and resumed ends with the uninterrupted run's weights.

Tolerance: max |difference| <= 1e-6 per weight (float32, one thread, num_workers=0); in practice the
two runs are bitwise identical because the data order, augmentation, Mixup, DropPath/dropout RNG
streams and the schedule are all restored.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpubone.train.data import write_digits_imagefolder
from cpubone.train.loop import load_training_state

from conftest import ISOLATED, subset_imagefolder

SRC = str(Path(__file__).resolve().parents[1] / "src")
INTERVAL = 3  # --checkpoint-every


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    full = write_digits_imagefolder(tmp_path_factory.mktemp("digits_full"), size=24)
    return subset_imagefolder(full, tmp_path_factory.mktemp("digits") / "d", {"train": 16, "val": 4})


def _cmd(data: Path, out: Path, *extra: str):
    # real randomness everywhere: crops (python random), Mixup (numpy), DropPath/dropout (torch), EMA
    return [sys.executable, "-m", "cpubone", "train", "--data", str(data), "--model", "cpubone_nano",
            "--recipe", "digits", "--model-kwargs", "head_widths=[32,32]", "--img-size", "24",
            "--epochs", "2", "--batch-size", "8", "--mixup", "0.2", "--cutmix", "0.5", "--drop-path", "0.1",
            "--workers", "0", "--seed", "7", "--no-progress", "--no-tensorboard", "--log-every", "1",
            "--checkpoint-every", str(INTERVAL), "--output", str(out), *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    return env


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(digits, tmp_path):
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(digits, ref_out), env=_env(), check=True, capture_output=True, text=True, timeout=300, **ISOLATED)

    proc = subprocess.Popen(_cmd(digits, run_out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **ISOLATED,
                            text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("checkpoint: global step 6 "):  # epoch 1 has 20 steps: this is mid-epoch
            proc.send_signal(signal.SIGKILL)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines) + rest
    done = [int(l.split("global_step ")[1].split()[0]) for l in (lines + rest.splitlines()) if " global_step " in l]
    killed_at = max(done)

    state = load_training_state(run_out / "last.pt")  # weights_only=True: a plain-tensor checkpoint
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 20  # resumes mid-epoch
    assert state["global_step"] % INTERVAL == 0
    assert killed_at - state["global_step"] < INTERVAL  # no more than one interval of work lost

    res = subprocess.run(_cmd(digits, run_out, "--resume", str(run_out / "last.pt")), env=_env(),
                         capture_output=True, text=True, timeout=300, **ISOLATED)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed from {run_out / 'last.pt'}: epoch 1, step {state['step_in_epoch']}/20" in res.stdout
    assert not list(run_out.glob(".*tmp*"))  # a temporary file of a write cut short by the kill is cleaned up

    a = load_training_state(ref_out / "last.pt")
    b = load_training_state(run_out / "last.pt")
    assert a["global_step"] == b["global_step"] == 40
    for key in ("model", "ema"):
        for name, wa in a[key].items():
            if wa.is_floating_point():
                diff = (wa - b[key][name]).abs().max().item()
                assert diff <= 1e-6, f"{key}.{name} differs by {diff}"
            else:
                assert torch.equal(wa, b[key][name]), f"{key}.{name}"
    # per-epoch losses and accuracies agree too (wall-clock fields aside)
    import json

    timing = ("epoch_time_s", "images_per_s")
    ha, hb = ([{k: v for k, v in row.items() if k not in timing} for row in json.loads(s["history"])] for s in (a, b))
    assert len(ha) == 2 and ha == hb


def test_kill_at_the_end_of_an_epoch_keeps_best_model(digits, tmp_path):
    """SIGKILL between the epoch's derived files and last.pt: best_model/ is complete (with the class names),
    the resumed run redoes the epoch; a best_model/ lost or half-written later is rebuilt on resume."""
    import json

    from cpubone import create_model

    out = tmp_path / "run"
    env = dict(_env(), CPUBONE_TEST_KILL_AT="before-last@1")
    res = subprocess.run(_cmd(digits, out), env=env, capture_output=True, text=True, timeout=300, **ISOLATED)
    assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
    config = json.loads((out / "best_model" / "config.json").read_text())
    assert config["pretrained_cfg"]["label_names"] == [str(i) for i in range(10)]
    assert load_training_state(out / "last.pt")["epoch"] == 0  # the epoch does not count as done yet
    model = create_model("cpubone_nano", pretrained=out / "best_model", head_widths=[32, 32])
    best = load_training_state(out / "best.pt")
    weights = best["ema"] if best["best_weights"] == "ema" else best["model"]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    res = subprocess.run(_cmd(digits, out, "--resume", str(out)), env=_env(), capture_output=True, text=True,
                         timeout=300, **ISOLATED)  # a run folder is accepted: its last.pt
    assert res.returncode == 0, res.stdout + res.stderr
    assert load_training_state(out / "last.pt")["epoch"] == 2
    # a later kill inside save_pretrained: no config, a stale temporary file
    (out / "best_model" / "config.json").unlink()
    (out / "best_model" / "model.safetensors.tmp").write_bytes(b"partial")
    res = subprocess.run(_cmd(digits, out, "--resume", str(out)), env=_env(), capture_output=True, text=True,
                         timeout=300, **ISOLATED)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in (out / "best_model").iterdir()) == ["config.json", "model.safetensors"]
    best = load_training_state(out / "best.pt")
    weights = best["ema"] if best["best_weights"] == "ema" else best["model"]
    model = create_model("cpubone_nano", pretrained=out / "best_model", head_widths=[32, 32])
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
