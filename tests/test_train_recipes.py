"""Recipe presets (the paper's numbers), linear lr scaling, and the timm components they assemble."""
import argparse
import json

import pytest
import torch

from cpubone import create_model
from cpubone.cli.train import add_train_arguments, config_from_args
from cpubone.train.classification import TrainConfig, _freeze_backbone
from cpubone.train.loop import amp_dtype as _amp_dtype
from cpubone.train.recipes import Recipe, get_recipe


@pytest.mark.parametrize("variant,batch,lr,aug", [
    ("cpubone_b0", 512, 1e-3, "original"),
    ("cpubone_b1", 512, 1e-3, "original"),
    ("cpubone_b2", 1024, 1e-3, "rand-m9-mstd0.5-inc1"),
    ("cpubone_b3", 2400, 3e-3, "rand-m9-mstd0.5-inc1"),
])
def test_paper_recipe_per_variant(variant, batch, lr, aug):
    r = get_recipe("paper", variant)
    assert (r.batch_size, r.lr, r.auto_augment) == (batch, lr, aug)
    assert (r.opt, r.weight_decay, r.sched, r.warmup_epochs, r.epochs, r.img_size) == ("adamw", 0.05, "cosine", 5, 600, 224)
    assert r.mixup > 0 and r.cutmix > 0 and r.smoothing > 0 and r.ema_decay > 0 and r.channels_last


def test_linear_lr_scaling():
    r = get_recipe("paper", "cpubone_b3")
    assert r.scaled_lr(2400) == pytest.approx(3e-3)
    assert r.scaled_lr(600) == pytest.approx(7.5e-4)
    assert get_recipe("paper", "cpubone_b0").scaled_lr(4096) == pytest.approx(8e-3)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown recipe 'imagenet21k'"):
        get_recipe("imagenet21k", "cpubone_b0")
    with pytest.raises(ValueError, match="unknown recipe field.*colour"):
        Recipe().replace(colour=1)


def test_config_round_trips_through_json():
    cfg = TrainConfig.from_preset("d", "cpubone_b2", "paper", model_kwargs={"head_widths": [64, 64]})
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.recipe.scale == (0.08, 1.0)


def _args(*argv):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p.parse_args(list(argv))


def test_cli_overrides():
    assert config_from_args(_args("--data", "d", "--model", "cpubone_b0")).recipe_name == "release"  # the default
    cfg = config_from_args(_args("--data", "d", "--model", "cpubone_b0", "--recipe", "paper", "--batch-size", "256",
                                 "--epochs", "3", "--auto-augment", "none", "--model-kwargs", "head_widths=[8,8]",
                                 "proj_drop_rate=0"))
    r = cfg.recipe
    assert (r.batch_size, r.epochs, r.auto_augment) == (256, 3, None)
    assert r.scaled_lr() == pytest.approx(5e-4)  # 1e-3 at 512, scaled to 256
    assert cfg.model_kwargs == {"head_widths": [8, 8], "proj_drop_rate": 0}
    explicit = config_from_args(_args("--data", "d", "--model", "cpubone_b0", "--batch-size", "256", "--lr", "0.01"))
    assert explicit.recipe.resolve(4)["peak_lr"] == pytest.approx(0.01)  # an explicit lr is not rescaled
    release = config_from_args(_args("--data", "d", "--model", "cpubone_b0", "--batch-size", "64"))
    assert release.recipe.resolve(2)["peak_lr"] == pytest.approx(5e-4 * 64 / 256)  # the release's lr per image
    with pytest.raises(ValueError, match="--data and --model are required"):
        config_from_args(_args("--model", "cpubone_b0"))


def test_optimizer_skips_decay_on_norms_and_biases():
    from timm.optim import create_optimizer_v2

    model = create_model("cpubone_nano", num_classes=10)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, filter_bias_and_bn=True)
    assert isinstance(opt, torch.optim.AdamW)
    by_wd = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert set(by_wd) == {0.0, 0.05}
    assert all(p.ndim <= 1 for p in by_wd[0.0]) and all(p.ndim > 1 for p in by_wd[0.05])
    norm = model.stem.conv.norm.weight
    assert any(p is norm for p in by_wd[0.0])


def test_amp_modes():
    cpu = torch.device("cpu")
    assert _amp_dtype("auto", cpu) == torch.bfloat16
    assert _amp_dtype("none", cpu) is None
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        _amp_dtype("fp16", cpu)


def test_freeze_backbone_leaves_only_the_classifier():
    model = create_model("cpubone_nano", num_classes=3)
    _freeze_backbone(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.fc.weight", "head.fc.bias"]
