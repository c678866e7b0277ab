"""Training recipes: the authors' released ImageNet recipe, the paper's summary, fine-tuning, small data.

A ``Recipe`` holds every hyperparameter of a run; ``get_recipe(name, model)`` returns the preset and
``Recipe.resolve(world)`` the batch sizes and peak learning rate of a run on ``world`` processes.

``release`` (the default for CPUBone variants) is what produced the released checkpoints, read off the
authors' public release: its ``configs/cls/imagenet/*.yaml``, the EfficientViT-derived trainer and
``train_cls_model.py``. Shared defaults: 300 epochs after 20 linear warm-up epochs from lr 0 (the loop runs
320), cosine to 0; AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0.1, none on norms and biases; the
learning rate is per process (peak = ``base_lr`` x world size x accumulation steps; B2's ``total_lr`` is
divided by the world size first, so its peak is the same on any number of processes); random-resolution
training over {128, 160, 192, 224} (one size per batch, the sequence seeded by the epoch), evaluation at
224 with crop ratio 0.95, bicubic; RandomResizedCrop with a random interpolation per image, horizontal
flip, RandAugment n1 m3; BCE-with-logits on targets smoothed by 0.1; Mixup or CutMix (equal odds) with
alpha 0.1; gradient clipping at norm 2.0; DropPath 0.05 on the identity-shortcut residual blocks, growing
linearly with depth and scheduled with training progress; EMA 0.9998, the evaluated and saved model;
BatchNorm statistics re-estimated on 16,000 training images (batches of 100) before every evaluation;
restart from the best checkpoint when validation top-1 falls 2.5 points below the best; channels_last.
Per variant see ``_RELEASE``.

``paper`` is the seed summary of the paper (CPUBone, Sec. training): AdamW, weight decay 0.05, cosine schedule with 5 warm-up epochs, 600
epochs at 224x224; batch / lr B0 and B1 512 / 1e-3, B2 1024 / 1e-3, B3 2400 / 3e-3; AutoAugment, with
RandAugment for B2/B3; Mixup, CutMix, DropPath, EMA; channels_last. Values the paper does not state
(Mixup/CutMix alphas, label smoothing, DropPath rates, EMA decay, the small variants' batch) follow the
DeiT/timm ImageNet conventions and are marked ``# not in the paper``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ["Recipe", "get_recipe", "RECIPES", "paper_recipe", "release_recipe", "RELEASE_IMG_SIZES"]


@dataclass
class Recipe:
    """Hyperparameters of one training run (all JSON-able, stored in every checkpoint)."""

    epochs: int = 600  # after the warm-up when ``warmup_prefix``, else including it
    batch_size: int = 512  # global batch over all processes and accumulation steps (unless batch_per_process)
    batch_per_process: Optional[int] = None  # release: per-process batch; global = world x this x accum_steps
    lr_rule: str = "linear"  # linear: lr x global / lr_base_batch; per_process: lr x world x accum; fixed: lr
    lr: float = 1e-3  # linear: peak lr at ``lr_base_batch``; per_process: the per-process base_lr
    lr_base_batch: int = 512
    total_lr: Optional[float] = None  # per_process: base_lr = total_lr / world (same peak at any world size)
    opt: str = "adamw"
    weight_decay: float = 0.05  # not applied to norms and biases (timm's filter_bias_and_bn)
    opt_eps: float = 1e-8
    sched: str = "cosine"
    warmup_epochs: float = 5
    warmup_prefix: bool = False  # warm-up epochs come before ``epochs`` (the release: 20 + 300)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    img_size: int = 224  # evaluation size (and the training size without ``img_sizes``)
    img_sizes: Optional[Tuple[int, ...]] = None  # random-resolution training: one size per batch from these
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
    loss: str = "ce"  # 'ce' (softmax cross-entropy) or 'bce' (BCE with logits on the smoothed/mixed targets)
    drop_path: float = 0.0  # stochastic depth rate of the last block (linear rule)
    drop_path_scheduled: bool = False  # release rule: identity-shortcut blocks, rate x (i+1)/n x progress
    drop_path_skip: int = 0  # release rule: the first ``skip`` residual blocks get no DropPath
    drop: float = 0.0  # dropout before the classifier
    ema_decay: float = 0.9998  # 0 = no EMA
    ema_warmup: bool = False  # ramp the EMA decay up from 0 (useful for short runs)
    bn_reestimate: int = 0  # re-estimate BatchNorm statistics on this many training images before evaluating
    bn_reestimate_batch: int = 100
    mesa_thresh: Optional[float] = None  # Mesa self-distillation from this training progress (0-1) on
    mesa_ratio: float = 0.0  # weight of BCE(output, sigmoid(EMA output))
    restart_drop: Optional[float] = None  # reload the best checkpoint when top-1 falls this many points below it
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

    def resolve(self, world: int = 1) -> Dict[str, Any]:
        """Global batch, per-process (micro-)batch and peak lr of a run on ``world`` processes."""
        if world < 1 or self.accum_steps < 1:
            raise ValueError(f"world size ({world}) and accumulation steps ({self.accum_steps}) must be >= 1")
        if self.batch_per_process:
            micro = self.batch_per_process
            global_batch = world * micro * self.accum_steps
        else:
            global_batch = self.batch_size
            if global_batch % (world * self.accum_steps):
                raise ValueError(f"global batch {global_batch} is not divisible by processes x accumulation steps "
                                 f"({world} x {self.accum_steps})")
            micro = global_batch // (world * self.accum_steps)
        if self.lr_rule == "per_process":
            base_lr = self.total_lr / world if self.total_lr else self.lr
            peak = base_lr * world * self.accum_steps
        elif self.lr_rule == "fixed":
            peak = self.lr
        elif self.lr_rule == "linear":
            peak = self.scaled_lr(global_batch)
        else:
            raise ValueError(f"unknown lr rule {self.lr_rule!r}: use linear, per_process or fixed")
        return dict(world_size=world, global_batch=global_batch, batch_per_process=micro,
                    accum_steps=self.accum_steps, peak_lr=peak)

    def with_global_batch(self, batch: int) -> "Recipe":
        """A fixed global batch instead of a per-process one, with the same peak lr per image (linear rule)."""
        if not self.batch_per_process:
            return self.replace(batch_size=batch)
        if self.lr_rule == "per_process" and self.total_lr:  # the same peak lr at any batch, as at any world
            return self.replace(batch_size=batch, batch_per_process=None, lr_rule="fixed",
                                lr=self.total_lr * self.accum_steps)
        return self.replace(batch_size=batch, batch_per_process=None, lr_rule="linear",
                            lr_base_batch=self.batch_per_process)

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with the given fields changed; unknown names raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot run."""
        for name in ("epochs", "accum_steps", "img_size", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"recipe field {name} must be a positive integer, got {v!r}")
        if self.batch_per_process is not None and self.batch_per_process < 1:
            raise ValueError(f"recipe field batch_per_process must be >= 1, got {self.batch_per_process}")
        if self.img_sizes is not None and (not self.img_sizes or min(self.img_sizes) < 1):
            raise ValueError(f"recipe field img_sizes must list positive sizes, got {self.img_sizes}")
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"recipe field loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.lr <= 0 or (self.total_lr is not None and self.total_lr <= 0):
            raise ValueError(f"recipe learning rate must be > 0, got {self.total_lr or self.lr}")

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


# The authors' released configs, keyed by our variant name (config file -> net name in brackets):
# (per-process batch, bsizemult = accumulation steps, base_lr, total_lr, RandAugment, random erasing p,
#  Mixup/CutMix alpha, DropPath rate, DropPath skip, Mesa (thresh, ratio) or None)
_RA_DEFAULT = "rand-m3-n1-mstd0"  # RandAugment n=1 m=3 in timm's policy-string syntax
_RELEASE: Dict[str, Tuple[int, int, float, Optional[float], str, float, float, float, int, Optional[Tuple[float, float]]]] = {
    "cpubone_nano": (512, 1, 1e-3, None, _RA_DEFAULT, 0.0, 0.1, 0.05, 0, None),  # cpubone_nano.yaml (nano)
    "cpubone_t0": (512, 1, 1e-3, None, _RA_DEFAULT, 0.0, 0.1, 0.05, 0, None),  # cpubone_t0.yaml (s0)
    "cpubone_s0": (512, 1, 1e-3, None, _RA_DEFAULT, 0.0, 0.1, 0.05, 0, None),  # cpubone_s0.yaml (s1)
    "cpubone_b0": (256, 1, 5e-4, None, _RA_DEFAULT, 0.0, 0.1, 0.05, 0, None),  # cpubone_b0.yaml (b0)
    "cpubone_b1": (256, 1, 5e-4, None, _RA_DEFAULT, 0.0, 0.1, 0.05, 0, None),  # cpubone_b1.yaml (b1)
    # cpubone_b15.yaml (b15, the published B2): total batch 1024 = 8 x 128, total_lr 2e-3
    "cpubone_b2": (128, 1, 1.25e-4, 2e-3, "rand-m6-n2-mstd0", 0.0, 0.3, 0.1, 0, None),
    # cpubone_b2.yaml (b2, B2.5): its Mesa settings sit under mixup_config, where the trainer never reads them
    "cpubone_b2_5": (85, 2, 1.667e-4, None, "rand-m6-n2-mstd0", 0.2, 0.2, 0.1, 1, None),
    "cpubone_b3": (50, 8, 3.125e-5, None, "rand-m5-n2-mstd0", 0.2, 0.2, 0.1, 2, (0.25, 2.0)),  # cpubone_b3.yaml
}
RELEASE_IMG_SIZES = (128, 160, 192, 224)


def release_recipe(model: str) -> Recipe:
    """The authors' released ImageNet recipe for a CPUBone variant (B0's for any other model)."""
    batch, accum, base_lr, total_lr, aug, re_prob, alpha, dpr, skip, mesa = _RELEASE.get(
        model.split(".")[0], _RELEASE["cpubone_b0"])
    return Recipe(
        epochs=300, warmup_epochs=20, warmup_prefix=True, warmup_lr=0.0, min_lr=0.0,
        batch_per_process=batch, accum_steps=accum, lr_rule="per_process", lr=base_lr, lr_base_batch=batch,
        total_lr=total_lr, batch_size=batch * accum,
        opt="adamw", weight_decay=0.1, opt_eps=1e-8,
        img_size=224, img_sizes=RELEASE_IMG_SIZES, crop_pct=0.95, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.0,
        auto_augment=aug, train_interpolation="random", re_prob=re_prob,
        mixup=alpha, cutmix=alpha, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.1, loss="bce",
        clip_grad=2.0, drop_path=dpr, drop_path_scheduled=True, drop_path_skip=skip,
        ema_decay=0.9998, ema_warmup=False, bn_reestimate=16000, bn_reestimate_batch=100,
        mesa_thresh=mesa[0] if mesa else None, mesa_ratio=mesa[1] if mesa else 0.0, restart_drop=2.5,
        amp="auto", channels_last=True,
    )


RECIPES = {"release": release_recipe, "paper": paper_recipe, "finetune": finetune_recipe, "digits": digits_recipe}


def get_recipe(name: str, model: str) -> Recipe:
    """Preset ``name`` ('release', 'paper', 'finetune', 'digits') for ``model``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name](model)
