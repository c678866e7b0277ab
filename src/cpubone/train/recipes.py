"""Training recipes: the paper's ImageNet presets per variant, fine-tuning, and a small-data preset.

A ``Recipe`` holds every hyperparameter of a run; ``get_recipe(name, model)`` returns the preset and
``Recipe.scaled_lr(global_batch)`` applies the linear scaling rule when the global batch differs from the
one the learning rate was tuned for.

Paper (CPUBone, Sec. training): AdamW, weight decay 0.05, cosine schedule with 5 warm-up epochs, 600
epochs at 224x224; batch / lr B0 and B1 512 / 1e-3, B2 1024 / 1e-3, B3 2400 / 3e-3; AutoAugment, with
RandAugment for B2/B3; Mixup, CutMix, DropPath, EMA; channels_last. Values the paper does not state
(Mixup/CutMix alphas, label smoothing, DropPath rates, EMA decay, the small variants' batch) follow the
DeiT/timm ImageNet conventions and are marked ``# not in the paper``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ["Recipe", "get_recipe", "RECIPES", "paper_recipe"]


@dataclass
class Recipe:
    """Hyperparameters of one training run (all JSON-able, stored in every checkpoint)."""

    epochs: int = 600
    batch_size: int = 512  # global batch: over all processes and accumulation steps
    lr: float = 1e-3  # peak learning rate at ``lr_base_batch``; scaled linearly to the actual global batch
    lr_base_batch: int = 512
    opt: str = "adamw"
    weight_decay: float = 0.05  # not applied to norms and biases (timm's filter_bias_and_bn)
    opt_eps: float = 1e-8
    sched: str = "cosine"
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    img_size: int = 224
    crop_pct: Optional[float] = None  # eval resize = img_size / crop_pct; None: the model's (0.95 for CPUBone)
    # augmentation (timm.data.create_transform)
    no_aug: bool = False  # resize + centre crop only (deterministic)
    scale: Tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    color_jitter: float = 0.4  # ignored by timm when auto_augment is set
    auto_augment: Optional[str] = "original"  # timm policy string: AutoAugment 'original', RandAugment 'rand-...'
    train_interpolation: Optional[str] = "random"
    re_prob: float = 0.0  # random erasing
    # regularisation
    mixup: float = 0.8  # Mixup alpha (0 = off)
    cutmix: float = 1.0  # CutMix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1  # label smoothing
    drop_path: float = 0.0  # stochastic depth rate of the last block (linear rule)
    drop: float = 0.0  # dropout before the classifier
    ema_decay: float = 0.9998  # 0 = no EMA
    ema_warmup: bool = False  # ramp the EMA decay up from 0 (useful for short runs)
    # numerics and throughput
    amp: str = "auto"  # auto: bf16 (CPU, CUDA), fp16 only when asked; 'none' for fp32
    channels_last: bool = True
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    clip_grad: Optional[float] = None  # max global gradient norm (None = no clipping)
    # fine-tuning
    freeze_backbone: bool = False  # train only the classifier

    def scaled_lr(self, global_batch: Optional[int] = None) -> float:
        """Peak lr for ``global_batch`` by the linear scaling rule (lr x batch / lr_base_batch)."""
        batch = self.batch_size if global_batch is None else global_batch
        return self.lr * batch / self.lr_base_batch

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with the given fields changed; unknown names raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kwargs)


# (global batch, peak lr, augmentation policy, drop_path) per variant.
# B0-B3 batch / lr and the AutoAugment / RandAugment split are the paper's; the smaller variants were not
# described and get B0's batch and lr; DropPath rates are ours (not in the paper), growing with depth.
_AUTO = "original"  # timm's AutoAugment ImageNet policy
_RAND = "rand-m9-mstd0.5-inc1"  # timm's RandAugment as used for DeiT-style ImageNet training
_PAPER: Dict[str, Tuple[int, float, str, float]] = {
    "cpubone_nano": (512, 1e-3, _AUTO, 0.0),
    "cpubone_t0": (512, 1e-3, _AUTO, 0.0),
    "cpubone_s0": (512, 1e-3, _AUTO, 0.0),
    "cpubone_b0": (512, 1e-3, _AUTO, 0.05),
    "cpubone_b1": (512, 1e-3, _AUTO, 0.1),
    "cpubone_b2": (1024, 1e-3, _RAND, 0.1),
    "cpubone_b2_5": (1024, 1e-3, _RAND, 0.15),
    "cpubone_b3": (2400, 3e-3, _RAND, 0.2),
}


def paper_recipe(model: str) -> Recipe:
    """The paper's ImageNet recipe for a CPUBone variant (B0's settings for any other model)."""
    batch, lr, aug, dpr = _PAPER.get(model.split(".")[0], _PAPER["cpubone_b0"])
    return Recipe(batch_size=batch, lr=lr, lr_base_batch=batch, auto_augment=aug, drop_path=dpr)


def finetune_recipe(model: str) -> Recipe:
    """Transfer from ImageNet weights to a new, smaller dataset (ours; the paper has no such recipe).

    Shorter schedule, 10x lower lr than pre-training, light RandAugment, no Mixup/CutMix (they slow the
    convergence of a freshly reset head), EMA ramped up from 0 because runs are short.
    """
    return Recipe(epochs=30, batch_size=128, lr=1e-4, lr_base_batch=128, warmup_epochs=1, min_lr=1e-6,
                  auto_augment="rand-m7-mstd0.5", mixup=0.0, cutmix=0.0, drop_path=0.05,
                  ema_decay=0.999, ema_warmup=True, scale=(0.25, 1.0))


def digits_recipe(model: str) -> Recipe:
    """From scratch on tiny low-resolution data (scikit-learn's 8x8 digits upsampled to 32 px), on a CPU.

    Small inputs, a short cosine schedule with one warm-up epoch, mild crops and no flips (a mirrored
    digit is another symbol), no Mixup/CutMix/AutoAugment (a 1.4k-image, 10-class problem does not need
    them and they need many epochs to pay off).
    """
    return Recipe(epochs=10, batch_size=64, lr=2e-3, lr_base_batch=64, warmup_epochs=1, min_lr=1e-5,
                  img_size=32, crop_pct=1.0, scale=(0.6, 1.0), hflip=0.0, color_jitter=0.0,
                  auto_augment=None, train_interpolation="bicubic", mixup=0.0, cutmix=0.0, smoothing=0.1,
                  drop_path=0.0, ema_decay=0.99, ema_warmup=True, amp="none", channels_last=False)


RECIPES = {"paper": paper_recipe, "finetune": finetune_recipe, "digits": digits_recipe}


def get_recipe(name: str, model: str) -> Recipe:
    """Preset ``name`` ('paper', 'finetune', 'digits') for ``model``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name](model)
