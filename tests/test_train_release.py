"""The authors' release recipe: random resolution, per-process lr, scheduled DropPath, Mesa, BatchNorm
re-estimation, auto-restart, and ``cpubone train --print-config`` for every variant."""
import json

import pytest
import torch
import torch.nn as nn

from cpubone import create_model
from cpubone.cli import main
from cpubone.models import list_models
from cpubone.train import TrainConfig, get_recipe, load_training_state, train
from cpubone.train import classification
from cpubone.train.data import ResumableSampler, SafeImageFolder, build_transforms, collate_skip_bad, write_digits_imagefolder
from cpubone.train.recipes import RELEASE_IMG_SIZES
from cpubone.train.release import (RandomResolutionBatchSampler, apply_scheduled_drop_path, mesa_loss,
                                   reestimate_batchnorm, residual_slots, set_drop_path_progress, size_sequence)

from conftest import subset_imagefolder


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    full = write_digits_imagefolder(tmp_path_factory.mktemp("digits_full"), size=24)
    return subset_imagefolder(full, tmp_path_factory.mktemp("digits") / "d", {"train": 6, "val": 2})


# --- random resolution ------------------------------------------------------------------------------
def test_size_sequence_is_seeded_by_the_epoch():
    a = size_sequence(3, RELEASE_IMG_SIZES, 200)
    assert a == size_sequence(3, RELEASE_IMG_SIZES, 200)  # the same epoch repeats
    assert set(a) == set(RELEASE_IMG_SIZES)  # every size is drawn, nothing else
    assert a != size_sequence(4, RELEASE_IMG_SIZES, 200)
    assert len({tuple(a[i:i + 2]) for i in range(0, 200, 2)}) > 1  # sizes change between steps


def test_random_resolution_batches(digits):
    ds = SafeImageFolder(digits / "train")
    model = create_model("cpubone_nano", num_classes=10)
    r = get_recipe("digits", "cpubone_nano")
    sizes = (16, 24, 32)
    ds.size_transforms = {s: build_transforms(model, s, r, is_training=True) for s in sizes}
    shapes = {}
    for rank in (0, 1):  # two processes of one run: their batch i has the same size
        sampler = ResumableSampler(ds, num_replicas=2, rank=rank, seed=0, drop_last=True)
        sampler.set_epoch(5)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=RandomResolutionBatchSampler(sampler, 3, sizes),
                                             collate_fn=collate_skip_bad)
        shapes[rank] = [b.images.shape[-1] for b in loader]
    assert shapes[0] == shapes[1] == size_sequence(5, sizes, 10)
    assert len(set(shapes[0])) > 1 and set(shapes[0]) <= set(sizes)
    # resumed after 4 batches: the rest of the same sequence
    sampler = ResumableSampler(ds, num_replicas=2, rank=0, seed=0, drop_last=True)
    sampler.set_epoch(5)
    sampler.set_start(4 * 3)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=RandomResolutionBatchSampler(sampler, 3, sizes),
                                         collate_fn=collate_skip_bad)
    assert [b.images.shape[-1] for b in loader] == shapes[0][4:]


# --- learning rate ----------------------------------------------------------------------------------
def test_per_process_learning_rate():
    b0 = get_recipe("release", "cpubone_b0")
    one, two = b0.resolve(1), b0.resolve(2)
    assert one["peak_lr"] == pytest.approx(5e-4) and two["peak_lr"] == pytest.approx(1e-3)  # base_lr x world
    assert (one["batch_per_process"], one["global_batch"], two["global_batch"]) == (256, 256, 512)
    b2 = get_recipe("release", "cpubone_b2")  # total_lr 2e-3: the same peak on any number of processes
    assert [b2.resolve(w)["peak_lr"] for w in (1, 2, 8)] == pytest.approx([2e-3] * 3)
    b3 = get_recipe("release", "cpubone_b3")  # bsizemult 8 = accumulation steps: x8 batch and lr
    assert b3.resolve(4)["global_batch"] == 4 * 50 * 8 and b3.resolve(4)["peak_lr"] == pytest.approx(3.125e-5 * 4 * 8)
    # a fixed global batch keeps the release's lr per image
    fixed = b0.with_global_batch(64)
    assert fixed.resolve(2)["batch_per_process"] == 32 and fixed.resolve(2)["peak_lr"] == pytest.approx(5e-4 * 64 / 256)


# --- scheduled DropPath -----------------------------------------------------------------------------
def test_scheduled_drop_path_rates():
    from cpubone.models.factory import VARIANTS

    for name in ("cpubone_nano", "cpubone_b0"):
        depths = VARIANTS[name].model_args()["depths"]
        # stem blocks, stage 1-2 blocks after the downsample, and 3 residual branches per attention block
        expect = depths[0] + max(depths[1] - 1, 0) + max(depths[2] - 1, 0) + 3 * (depths[3] + depths[4])
        assert len(residual_slots(create_model(name))) == expect
    model = create_model("cpubone_nano", num_classes=10)
    slots = residual_slots(model)
    mods = apply_scheduled_drop_path(model, 0.1, skip=2)
    n = len(slots) - 2
    assert len(mods) == n
    assert getattr(*slots[0]).__class__.__name__ == "Identity"  # skipped
    assert [m.base_rate for m in mods] == pytest.approx([0.1 * (i + 1) / n for i in range(n)])
    for progress in (0.0, 0.3, 1.0, 1.7):
        set_drop_path_progress(mods, progress)
        assert [m.drop_prob for m in mods] == pytest.approx([0.1 * (i + 1) / n * min(progress, 1.0) for i in range(n)])
    model.train()
    x = torch.randn(2, 3, 32, 32)
    set_drop_path_progress(mods, 0.0)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    assert torch.equal(a, model(x))  # no dropping at progress 0
    set_drop_path_progress(mods, 1.0)
    torch.manual_seed(0)
    assert not torch.allclose(a, model(x))


# --- Mesa, BatchNorm re-estimation ------------------------------------------------------------------
def test_mesa_term_only_after_thresh():
    out, ema_out = torch.randn(4, 10), torch.randn(4, 10)
    assert mesa_loss(out, ema_out, 0.2, 0.25, 2.0) is None
    term = mesa_loss(out, ema_out, 0.25, 0.25, 2.0)
    ref = 2.0 * nn.functional.binary_cross_entropy_with_logits(out, torch.sigmoid(ema_out))
    assert term == pytest.approx(ref.item())
    assert mesa_loss(out, ema_out, 0.9, None, 2.0) is None  # off


def test_bn_reestimation_moves_statistics_to_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3))
    data = [torch.randn(8, 3, 4, 4) * 2.0 + torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1) for _ in range(5)]
    model.train()
    assert reestimate_batchnorm(model, data) == 40
    x = torch.cat(data)
    bn = model[1]
    # exact statistics of the data: the dropout stayed off, every batch weighs the same
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, x.var((0, 2, 3)), rtol=0.05)
    assert model.training and bn.momentum == 0.1


# --- auto restart -----------------------------------------------------------------------------------
def test_auto_restart_reloads_the_best_weights(digits, tmp_path, monkeypatch):
    def scored(self, model, ema, epoch):  # a simulated drop in epoch 2
        top1 = [50.0, 10.0][epoch]
        return {"val_top1": top1}, top1, "model"

    monkeypatch.setattr(classification.ClassificationTask, "evaluate", scored)
    r = get_recipe("digits", "cpubone_nano").replace(epochs=2, batch_size=20, img_size=24, restart_drop=2.5,
                                                     ema_decay=0.0)
    cfg = TrainConfig(data=str(digits), model="cpubone_nano", recipe=r, recipe_name="digits", output=str(tmp_path / "r"),
                      model_kwargs={"head_widths": [16, 16]}, num_workers=0, progress=False, tensorboard=False)
    summary = train(cfg)
    last, best = load_training_state(tmp_path / "r" / "last.pt"), load_training_state(tmp_path / "r" / "best.pt")
    hist = json.loads(last["history"])
    assert hist[1]["restarted_from_epoch"] == 1 and summary["best_epoch"] == 1
    assert last["global_step"] == 6 and best["global_step"] == 3  # the schedule goes on ...
    for k, v in best["model"].items():  # ... from the best epoch's weights
        assert torch.equal(last["model"][k], v), k


# --- the resolved configuration ---------------------------------------------------------------------
def _print_config(capsys, *argv):
    assert main(["train", "--model", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("variant", list_models())
def test_print_config_every_variant(variant, capsys):
    c = _print_config(capsys, variant)
    r = c["recipe"]
    assert c["recipe_name"] == "release" and c["total_epochs"] == 320 and c["world_size"] == 1
    assert (r["epochs"], r["warmup_epochs"], r["weight_decay"], r["opt"], r["loss"]) == (300, 20, 0.1, "adamw", "bce")
    assert (r["img_sizes"], r["img_size"], r["crop_pct"], r["clip_grad"], r["ema_decay"]) == (
        [128, 160, 192, 224], 224, 0.95, 2.0, 0.9998)
    assert r["bn_reestimate"] == 16000 and r["restart_drop"] == 2.5 and r["drop_path_scheduled"]


def test_print_config_b0_and_b3_against_the_release(capsys, tmp_path):
    b0 = _print_config(capsys, "cpubone_b0", "--data", str(tmp_path / "nowhere"))  # reads no data
    r = b0["recipe"]
    assert (b0["batch_per_process"], b0["global_batch"], b0["peak_lr"]) == (256, 256, 5e-4)
    assert (r["auto_augment"], r["re_prob"], r["mixup"], r["cutmix"], r["drop_path"], r["drop_path_skip"]) == (
        "rand-m3-n1-mstd0", 0.0, 0.1, 0.1, 0.05, 0)
    assert r["mesa_thresh"] is None
    b3 = _print_config(capsys, "cpubone_b3", "--world-size", "8")
    r = b3["recipe"]
    assert (b3["batch_per_process"], b3["accum_steps"], b3["global_batch"]) == (50, 8, 3200)
    assert b3["peak_lr"] == pytest.approx(3.125e-5 * 8 * 8) and r["lr"] == 3.125e-5
    assert (r["auto_augment"], r["re_prob"], r["mixup"], r["drop_path"], r["drop_path_skip"]) == (
        "rand-m5-n2-mstd0", 0.2, 0.2, 0.1, 2)
    assert (r["mesa_thresh"], r["mesa_ratio"]) == (0.25, 2.0)
    b2 = _print_config(capsys, "cpubone_b2", "--world-size", "8")
    assert b2["peak_lr"] == pytest.approx(2e-3) and b2["global_batch"] == 1024


def test_release_recipe_runs_end_to_end(digits, tmp_path):
    """Every component at once, in miniature: warm-up prefix, random resolution, RandAugment, Mixup/CutMix,
    BCE, clipping, scheduled DropPath, EMA, BN re-estimation, bf16 autocast, channels_last."""
    r = get_recipe("release", "cpubone_nano").replace(epochs=1, warmup_epochs=1, batch_per_process=10,
                                                      img_sizes=(24, 32), img_size=32, amp="bf16")
    cfg = TrainConfig(data=str(digits), model="cpubone_nano", recipe=r, recipe_name="release",
                      output=str(tmp_path / "rel"), model_kwargs={"head_widths": [16, 16]}, num_workers=0,
                      progress=False, tensorboard=False)
    summary = train(cfg)
    assert summary["epochs"] == 2 and summary["global_steps"] == 12  # 1 warm-up + 1 epoch of 60 / 10 images
    state = load_training_state(tmp_path / "rel" / "last.pt")
    hist = json.loads(state["history"])
    assert hist[0]["lr"] == pytest.approx(r.lr, rel=0.2)  # end of the warm-up: close to the peak
    assert all(0 <= h["val_top1"] <= 100 and h["ema_top1"] >= 0 for h in hist)
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.0, 0.1}
