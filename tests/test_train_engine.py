"""End to end on real data (scikit-learn digits): `cpubone train` learns, writes its logs, `cpubone eval`
agrees; fine-tuning resets the head and can freeze the backbone; a NaN loss stops the run cleanly."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpubone import create_model
from cpubone.train import TrainConfig, TrainingDiverged, evaluate_checkpoint, get_recipe, load_training_state, train
from cpubone.train import classification as engine_mod
from cpubone.train.data import write_digits_imagefolder

from conftest import ISOLATED
from official import OFFICIAL_DIR

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _subset(src: Path, dst: Path, per_class: dict, classes=None) -> Path:
    for split, n in per_class.items():
        for cls in sorted((src / split).iterdir()):
            if classes is not None and cls.name not in classes:
                continue
            out = dst / split / cls.name
            out.mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, out / f.name)
    return dst


def _env():
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32)


@pytest.fixture(scope="module")
def short_run(digits, tmp_path_factory):
    """The README's digits run in short: CPUBone-Nano from scratch, 3 epochs on 400 of the 1,437 images."""
    data = _subset(digits, tmp_path_factory.mktemp("sub") / "d", {"train": 40, "val": 10})
    out = tmp_path_factory.mktemp("run")
    res = subprocess.run([sys.executable, "-m", "cpubone", "train", "--data", str(data), "--model", "cpubone_nano",
                          "--recipe", "digits", "--epochs", "3", "--batch-size", "32", "--workers", "0",
                          "--output", str(out)], env=_env(), capture_output=True, text=True, timeout=600, **ISOLATED)
    assert res.returncode == 0, res.stdout + res.stderr
    return data, out, res


def test_short_digits_run_learns_and_logs(short_run):
    data, out, res = short_run
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # the loss falls
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_top1"] > 30.0  # chance is 10%
    assert "epoch 1/3" in res.stderr  # tqdm progress bar
    assert "best val top-1" in res.stdout  # final summary
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("last.pt", "best.pt"):
        state = load_training_state(out / name)  # weights_only=True
        assert {"model", "ema", "optimizer", "scheduler", "rng", "config", "epoch", "global_step"} <= set(state)
    assert json.loads(load_training_state(out / "last.pt")["config"])["recipe"]["img_size"] == 32


def test_eval_reproduces_the_logged_accuracy(short_run):
    data, out, _ = short_run
    summary = json.loads((out / "summary.json").read_text())
    res = subprocess.run([sys.executable, "-m", "cpubone", "eval", "--data", str(data), "--model", "cpubone_nano",
                          "--checkpoint", str(out / "best_model"), "--workers", "0", "--json"],
                         env=_env(), capture_output=True, text=True, timeout=300, **ISOLATED)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["input_size"] == 32 and r["images"] == 100 and r["classes"] == 10
    assert r["top1"] == pytest.approx(summary["best_top1"], abs=1e-6)
    # the full training checkpoint evaluates its (non-EMA) model weights
    last = evaluate_checkpoint(str(data), "cpubone_nano", str(out / "last.pt"), num_workers=0)
    assert last["top1"] == pytest.approx(json.loads(load_training_state(out / "last.pt")["history"])[-1]["val_top1"])


def test_eval_rejects_a_classifier_of_another_size(short_run, tmp_path):
    data, out, _ = short_run
    three = _subset(data, tmp_path / "three", {"val": 2}, classes={"0", "1", "2"})
    res = subprocess.run([sys.executable, "-m", "cpubone", "eval", "--data", str(three), "--model", "cpubone_nano",
                          "--checkpoint", str(out / "best_model"), "--workers", "0"],
                         env=_env(), capture_output=True, text=True, timeout=300, **ISOLATED)
    assert res.returncode == 2 and "the classifier has 10 classes but" in res.stderr and "3 class folders" in res.stderr


def _finetune_cfg(data, out, pretrained, **recipe):
    r = get_recipe("finetune", "cpubone_nano").replace(epochs=1, batch_size=10, img_size=32, amp="none",
                                                         channels_last=False, **recipe)
    return TrainConfig(data=str(data), model="cpubone_nano", recipe=r, recipe_name="finetune", output=str(out),
                       pretrained=str(pretrained), num_workers=0, progress=False, tensorboard=False)


def test_finetune_resets_head_and_freezes_backbone(short_run, tmp_path):
    data, out, _ = short_run
    three = _subset(data, tmp_path / "three", {"train": 10, "val": 4}, classes={"3", "5", "8"})
    torch.set_num_threads(1)
    summary = train(_finetune_cfg(three, tmp_path / "ft", out / "best_model", freeze_backbone=True))
    assert summary["global_steps"] == 3
    src = create_model("cpubone_nano", pretrained=out / "best_model").state_dict()
    tuned = load_training_state(tmp_path / "ft" / "last.pt")["model"]
    assert tuned["head.fc.weight"].shape == (3, 1600)
    for k, v in src.items():
        if not k.startswith("head.fc."):
            assert torch.equal(tuned[k], v), k  # frozen weights and BatchNorm statistics unchanged


def test_finetune_from_timm_layout_checkpoint(short_run, tmp_path):
    import timm
    data, _, _ = short_run
    two = _subset(data, tmp_path / "two", {"train": 10, "val": 2}, classes={"0", "1"})
    torch.manual_seed(0)
    ref = timm.create_model("cpubone_nano", num_classes=1000)
    torch.save(ref.state_dict(), tmp_path / "timm_nano.pth")
    train(_finetune_cfg(two, tmp_path / "ft", tmp_path / "timm_nano.pth"))
    tuned = load_training_state(tmp_path / "ft" / "last.pt")["model"]
    assert tuned["head.fc.weight"].shape == (2, 1600)
    # the backbone started from the timm weights (converted to our layout) and moved a little
    assert (tuned["stem.conv.conv.weight"] - ref.state_dict()["stem.0.conv.weight"]).abs().max() < 0.05


def test_nan_loss_stops_and_keeps_last_good_checkpoint(short_run, tmp_path, monkeypatch):
    data, _, _ = short_run
    real_create = engine_mod.create_model
    calls = {"train": 0}

    def poisoned(*args, **kwargs):
        model = real_create(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                calls["train"] += 1
                if calls["train"] >= 6:  # the 6th training step diverges
                    return output * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(engine_mod, "create_model", poisoned)
    torch.set_num_threads(1)
    r = get_recipe("digits", "cpubone_nano").replace(epochs=2, batch_size=16)
    cfg = TrainConfig(data=str(data), model="cpubone_nano", recipe=r, recipe_name="digits", output=str(tmp_path / "nan"),
                      model_kwargs={"head_widths": [32, 32]}, checkpoint_every=2, num_workers=0, progress=False,
                      tensorboard=False)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, global step 6 .*last good checkpoint"):
        train(cfg)
    state = load_training_state(tmp_path / "nan" / "last.pt")
    assert state["global_step"] == 4 and state["step_in_epoch"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_paper_recipe_components_run(short_run, tmp_path):
    """The paper's recipe end to end in miniature: AutoAugment, Mixup+CutMix, label smoothing, DropPath,
    EMA, channels_last, bf16 autocast on CPU, gradient accumulation and clipping."""
    data, _, _ = short_run
    tiny = _subset(data, tmp_path / "tiny", {"train": 2, "val": 1})
    torch.set_num_threads(1)
    r = get_recipe("paper", "cpubone_nano").replace(epochs=1, batch_size=8, lr_base_batch=8, img_size=32,
                                                    accum_steps=2, clip_grad=1.0, amp="bf16", drop_path=0.1)
    assert r.auto_augment == "original" and r.mixup > 0 and r.cutmix > 0 and r.channels_last
    cfg = TrainConfig(data=str(tiny), model="cpubone_nano", recipe=r, output=str(tmp_path / "paper"),
                      model_kwargs={"head_widths": [32, 32]}, num_workers=0, progress=False, tensorboard=False)
    summary = train(cfg)
    assert summary["global_steps"] == 2  # 20 images, 16 used: 2 steps of 2 accumulated micro-batches of 4
    state = load_training_state(tmp_path / "paper" / "last.pt")
    decays = sorted(g["weight_decay"] for g in state["optimizer"]["param_groups"])
    assert decays == [0.0, 0.05]
    assert torch.isfinite(torch.tensor(json.loads(state["history"])[0]["train_loss"]))


def _convnext_run(data, out, accum_steps):
    # SGD, not AdamW: Adam's update ignores the gradient's scale and would hide a missing 1/accum_steps
    r = get_recipe("digits", "test_convnext").replace(opt="sgd", epochs=1, batch_size=8, lr=0.1, lr_base_batch=8,
                                                      warmup_epochs=0, no_aug=True, accum_steps=accum_steps,
                                                      ema_decay=0.0)
    cfg = TrainConfig(data=str(data), model="test_convnext", recipe=r, output=str(out), num_workers=0,
                      progress=False, tensorboard=False)
    train(cfg)
    return load_training_state(Path(out) / "last.pt")["model"]


def test_gradient_accumulation_matches_the_full_batch(short_run, tmp_path):
    """2 accumulated micro-batches of 4 == one batch of 8 (BN-free model, no augmentation)."""
    data, _, _ = short_run
    tiny = _subset(data, tmp_path / "tiny", {"train": 3, "val": 1})
    torch.set_num_threads(1)
    a = _convnext_run(tiny, tmp_path / "a", 1)
    b = _convnext_run(tiny, tmp_path / "b", 2)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, atol=1e-5, rtol=0, msg=k)
    init = _convnext_init()
    assert max((a[k] - v).abs().max().item() for k, v in init.items() if v.is_floating_point()) > 1e-3


def _convnext_init():
    torch.manual_seed(0)  # TrainConfig's default seed, set before the engine builds the model
    return create_model("test_convnext", num_classes=10).state_dict()


def _official_shapes() -> Path:
    # the authors' release layout (key names and shapes of evalmodel.pt), in the repository's test data
    return OFFICIAL_DIR / "official_nano_state_dict_shapes.json"


def test_finetune_from_the_authors_checkpoint_layout(short_run, tmp_path):
    data, _, _ = short_run
    two = _subset(data, tmp_path / "two", {"train": 10, "val": 2}, classes={"6", "9"})
    g = torch.Generator().manual_seed(0)
    shapes = json.loads(_official_shapes().read_text())
    sd = {k: (torch.rand(s, generator=g) + 0.5 if k.endswith("running_var") else torch.randn(s, generator=g) * 0.05)
          if k[-19:] != "num_batches_tracked" else torch.tensor(0) for k, s in shapes.items()}
    torch.save({"state_dict": sd}, tmp_path / "evalmodel.pt")  # wrapped like the released file
    torch.set_num_threads(1)
    train(_finetune_cfg(two, tmp_path / "ft", tmp_path / "evalmodel.pt", freeze_backbone=True))
    tuned = load_training_state(tmp_path / "ft" / "last.pt")["model"]
    assert tuned["head.fc.weight"].shape == (2, 1600)
    assert torch.equal(tuned["stem.conv.conv.weight"], sd["backbone.input_stem.op_list.0.conv.weight"])
    assert torch.equal(tuned["head.pre_fc.weight"], sd["head.op_list.2.linear.weight"])


def test_eval_timm_checkpoint_through_our_model_and_timms(short_run, tmp_path):
    """A timm-layout CPUBone checkpoint scores the same whether loaded into our model or timm's."""
    import timm

    data, _, _ = short_run
    torch.manual_seed(1)
    ref = timm.create_model("cpubone_nano", num_classes=10)
    torch.save(ref.state_dict(), tmp_path / "timm_nano.pth")
    torch.set_num_threads(1)
    ours = evaluate_checkpoint(str(data), "cpubone_nano", str(tmp_path / "timm_nano.pth"), num_workers=0, img_size=32)
    theirs = evaluate_checkpoint(str(data), "timm/cpubone_nano", str(tmp_path / "timm_nano.pth"), num_workers=0,
                                 img_size=32)
    assert ours["images"] == theirs["images"] == 100
    assert ours["top1"] == theirs["top1"] and ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
