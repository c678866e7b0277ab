"""The training loop: one process or many (DDP), EMA, AMP, accumulation, step-level checkpoints, resume.

``train(TrainConfig)`` runs a whole job; ``evaluate_checkpoint`` scores a model on an ImageFolder split.
Everything is assembled from timm (transforms, Mixup, optimizer and scheduler factories, EMA, losses) and
torch (DDP, autocast); this module only wires them together and makes the run survive interruptions:

* checkpoints hold the full state (model, EMA, optimizer, scheduler, AMP scaler, epoch, step, the RNG
  states of every rank, the config as JSON) and are written atomically (temporary file + ``os.replace``),
  every ``checkpoint_every`` optimizer steps and at each epoch end, so a SIGKILL loses at most one
  interval;
* the data order depends only on (seed, epoch) and a resumed run skips the samples already seen, so
  with ``num_workers=0`` a resumed run reproduces the uninterrupted one;
* a NaN/inf loss stops the run before it can touch the weights or the checkpoints.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.factory import create_model, is_cpubone, resolve_model_name
from .data import ResumableSampler, SafeImageFolder, build_transforms, make_loader
from .recipes import Recipe, get_recipe

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "train",
    "evaluate",
    "evaluate_checkpoint",
    "load_training_state",
    "save_training_state",
    "plot_curves",
]

CKPT_LAST = "last.pt"
CKPT_BEST = "best.pt"
BEST_MODEL_DIR = "best_model"
HISTORY_CSV = "history.csv"
CURVES_PNG = "curves.png"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


# fields that describe where and how this process runs, not what is trained: a resumed run takes them
# from its own command line, everything else from the checkpoint
_RUN_FIELDS = ("data", "output", "resume", "num_workers", "device", "progress", "tensorboard", "log_every")


@dataclass
class TrainConfig:
    """One training job.

    Args:
        data: ImageFolder root with ``train/`` and (optionally) ``val/``.
        model: CPUBone variant or timm model name.
        recipe: hyperparameters (``recipes.get_recipe``).
        recipe_name: the preset the recipe came from (for the record).
        output: run folder for checkpoints, logs, CSV, TensorBoard and plots.
        pretrained: checkpoint to fine-tune from (ours, the authors', timm's), ``"hub"`` for timm's
            weights of the variant, or None to train from scratch. The classifier is reset to the
            dataset's classes.
        model_kwargs: extra constructor arguments of the model (JSON-able), e.g. ``{"head_widths": [64, 64]}``.
        resume: a ``last.pt``/``best.pt`` to continue from.
        checkpoint_every: also save ``last.pt`` every this many optimizer steps (0: only at epoch ends).
        num_workers: data loader processes per rank.
        seed: base seed (rank r uses seed + r for augmentation and dropout).
        device: 'auto', 'cpu', 'cuda'.
        deterministic: deterministic kernels where torch has them.
        sync_bn: SyncBatchNorm across ranks (CUDA only: torch has no CPU implementation).
        progress: tqdm bars (else a log line every ``log_every`` steps).
        tensorboard: write a TensorBoard log.
        log_every: optimizer steps between log lines / TensorBoard points.
    """

    data: str
    model: str
    recipe: Recipe = field(default_factory=Recipe)
    recipe_name: str = "paper"
    output: str = "runs/train"
    pretrained: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    resume: Optional[str] = None
    checkpoint_every: int = 0
    num_workers: int = 4
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    sync_bn: bool = False
    progress: bool = True
    tensorboard: bool = True
    log_every: int = 50

    @classmethod
    def from_preset(cls, data: str, model: str, recipe: str = "paper", **kwargs: Any) -> "TrainConfig":
        return cls(data=data, model=model, recipe=get_recipe(recipe, model), recipe_name=recipe, **kwargs)

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["recipe"] = self.recipe.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["recipe"] = Recipe.from_dict(d.get("recipe", {}))
        return cls(**kwargs)


# --- distributed ----------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return _Dist(rank, world, local_rank, dev)


def _all_sum(values: List[float], d: _Dist) -> List[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


# --- RNG state (as tensors so that torch.load(weights_only=True) can read it back) -----------------
def _rng_state() -> Dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- checkpoints ---------------------------------------------------------------------------------
def save_training_state(state: Dict[str, Any], path: os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a kill at any
    moment leaves either the old or the new file, never a torn one."""
    from ..models.checkpoints import atomic_torch_save

    atomic_torch_save(state, path)


def load_training_state(path: os.PathLike) -> Dict[str, Any]:
    """Read a training checkpoint without executing pickled code (``weights_only=True``)."""
    from ..models.checkpoints import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the training checkpoint: {type(e).__name__}: {e}") from e
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "config")
               if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a cpubone training checkpoint (missing {', '.join(missing)})")
    return state


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --- model ---------------------------------------------------------------------------------------
def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    pretrained: Any = False
    if cfg.pretrained:
        pretrained = True if cfg.pretrained == "hub" else cfg.pretrained
        if pretrained is not True and Path(pretrained).is_dir() and not is_cpubone(cfg.model):
            pretrained = str(Path(pretrained) / "model.safetensors")
    r = cfg.recipe
    kwargs = dict(cfg.model_kwargs)
    if not is_cpubone(cfg.model) and isinstance(pretrained, str):
        import timm

        # timm's pretrained loader drops a classifier whose class count differs (head reset)
        return timm.create_model(resolve_model_name(cfg.model).name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(pretrained)),
                                 num_classes=num_classes, drop_rate=r.drop, drop_path_rate=r.drop_path, **kwargs)
    return create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, drop_rate=r.drop,
                        drop_path_rate=r.drop_path, **kwargs)


def _freeze_backbone(model: nn.Module) -> None:
    """Train only the classifier: everything else is frozen, its BatchNorms kept in eval mode."""
    keep = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _frozen_norms_eval(model: nn.Module) -> None:
    # a frozen BatchNorm in train mode would still drift its running statistics towards the new data
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters(False)):
            m.eval()


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    amp = amp.lower()
    if amp in ("none", "fp32", "off", "false"):
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp fp16 needs CUDA (on CPU use bf16 or none)")
        return torch.float16
    raise ValueError(f"unknown amp mode {amp!r}: use auto, bf16, fp16 or none")


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             d: Optional[_Dist] = None) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over ``loader`` (summed over ranks when distributed)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, top1, top5, count, skipped
    for batch in loader:
        sums[4] += batch.skipped
        if batch.targets.numel() == 0:
            continue
        x = batch.images.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch.targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        top = out.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums[0] += float(loss_fn(out, y))
        sums[1] += float(hit[:, :1].sum())
        sums[2] += float(hit.sum())
        sums[3] += len(y)
    if d is not None:
        sums = _all_sum(sums, d)
    n = max(sums[3], 1.0)
    return dict(loss=sums[0] / n, top1=100.0 * sums[1] / n, top5=100.0 * sums[2] / n, images=int(sums[3]),
                skipped=int(sums[4]))


# --- visibility ----------------------------------------------------------------------------------
class _Log:
    """Rank-0 log lines to stdout (through tqdm so bars are not broken) and appended to ``train.log``."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / "train.log"

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
        with open(self.path, "a") as f:
            f.write(msg + "\n")


def _write_csv(history: List[Dict[str, Any]], path: Path) -> None:
    if not history:
        return
    keys = list(history[0].keys())
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k, "") for k in keys})
    os.replace(tmp, path)


def plot_curves(history: List[Dict[str, Any]], path: os.PathLike, title: str = "") -> Path:
    """PNG of train/val loss and val top-1 (model and EMA) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") not in (None, "") for h in history):
        ax1.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    for key, label in (("val_top1", "val top-1"), ("ema_top1", "val top-1 (EMA)")):
        vals = [h.get(key) for h in history]
        if any(v not in (None, "") for v in vals):
            ax2.plot(ep, vals, "o-", label=label)
    ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy (%)"), ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --- training ------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) a training job; returns the final summary (also written to ``summary.json``).

    Raises ``TrainingDiverged`` on a NaN/inf loss (``last.pt`` is left as it was).
    """
    resume_state = None
    if cfg.resume:
        resume_state = load_training_state(cfg.resume)
        saved = TrainConfig.from_dict(json.loads(resume_state["config"]))
        for name in _RUN_FIELDS:
            if name == "data" and not cfg.data:
                continue  # resuming without --data: the checkpoint's data folder
            setattr(saved, name, getattr(cfg, name))
        cfg = saved
    d = _init_distributed(cfg.device)
    try:
        return _train(cfg, d, resume_state)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist, resume_state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, dispatch_clip_grad
    from tqdm import tqdm

    r = cfg.recipe
    out = Path(cfg.output)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp*"):  # half-written files of a killed run; the real ones are intact
            stale.unlink()
    log = _Log(out, d.main)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # data (transforms are set once the model, and with it the normalisation, is known)
    data = Path(cfg.data)
    train_ds = SafeImageFolder(data / "train")
    val_dir = data / "val"
    val_ds = SafeImageFolder(val_dir, classes=train_ds.classes) if val_dir.is_dir() else None
    num_classes = len(train_ds.classes)

    # the same init on every rank (the EMA copies it before DDP would broadcast rank 0's weights)
    _seed_all(cfg.seed)
    # a resumed run gets its weights from the checkpoint, not from the (maybe moved) pretrained file
    model = _build_model(cfg if resume_state is None else dataclasses.replace(cfg, pretrained=None), num_classes)
    if r.freeze_backbone:
        _freeze_backbone(model)
    if cfg.sync_bn and d.world > 1:
        if d.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm has no CPU implementation")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(d.device)
    if r.channels_last:
        model.to(memory_format=torch.channels_last)
    _seed_all(cfg.seed + d.rank)

    train_ds.transform = build_transforms(model, r.img_size, r, is_training=True)
    eval_tf = build_transforms(model, r.img_size, r, is_training=False, crop_pct=r.crop_pct)
    if val_ds is not None:
        val_ds.transform = eval_tf

    if r.batch_size % (d.world * r.accum_steps):
        raise ValueError(f"global batch {r.batch_size} is not divisible by processes x accumulation steps "
                         f"({d.world} x {r.accum_steps})")
    micro = r.batch_size // (d.world * r.accum_steps)
    sampler = ResumableSampler(train_ds, d.world, d.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = make_loader(train_ds, micro, sampler, cfg.num_workers, drop_last=True,
                         pin_memory=d.device.type == "cuda", seed=cfg.seed)
    updates_per_epoch = (sampler.num_samples // micro) // r.accum_steps
    if updates_per_epoch == 0:
        raise ValueError(f"{data / 'train'}: {len(train_ds)} images are fewer than one global batch of "
                         f"{r.batch_size}; lower --batch-size")
    val_loader = None
    if val_ds is not None:
        # shard without padding so that every image is counted exactly once
        shard = torch.utils.data.Subset(val_ds, range(d.rank, len(val_ds), d.world))
        val_loader = make_loader(shard, max(micro, 1) * 2, None, cfg.num_workers, drop_last=False,
                                 pin_memory=d.device.type == "cuda")

    lr = r.scaled_lr(r.batch_size)
    optimizer = create_optimizer_v2(model, opt=r.opt, lr=lr, weight_decay=r.weight_decay,
                                    filter_bias_and_bn=True, eps=r.opt_eps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=r.sched, num_epochs=r.epochs, warmup_epochs=r.warmup_epochs, warmup_lr=r.warmup_lr,
        min_lr=r.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    amp_dtype = _amp_dtype(r.amp, d.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=r.ema_decay, use_warmup=r.ema_warmup) if r.ema_decay > 0 else None

    mixup = None
    if r.mixup > 0 or r.cutmix > 0:
        mixup = Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, prob=r.mixup_prob, switch_prob=r.mixup_switch_prob,
                      label_smoothing=r.smoothing, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
        if micro % 2:
            raise ValueError(f"Mixup/CutMix need an even per-process batch; got {micro}")
    elif r.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(r.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    unwrapped = model
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    start_epoch, step_in_epoch, global_step = 0, 0, 0
    best_metric, best_epoch = -1.0, -1
    history: List[Dict[str, Any]] = []
    epoch_loss, epoch_seen, skipped_total = 0.0, 0, 0
    rng_to_restore = None
    if resume_state is not None:
        unwrapped.load_state_dict(resume_state["model"])
        if ema is not None and "ema" in resume_state:
            ema.module.load_state_dict(resume_state["ema"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and "scaler" in resume_state:
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch, step_in_epoch = resume_state["epoch"], resume_state["step_in_epoch"]
        global_step = resume_state["global_step"]
        best_metric, best_epoch = resume_state.get("best_metric", -1.0), resume_state.get("best_epoch", -1)
        history = json.loads(resume_state.get("history", "[]"))
        epoch_loss, epoch_seen = resume_state.get("epoch_loss", 0.0), resume_state.get("epoch_seen", 0)
        skipped_total = resume_state.get("skipped", 0)
        rngs = resume_state.get("rng", [])
        rng_to_restore = rngs[d.rank] if len(rngs) == d.world else None
        log(f"resumed from {cfg.resume}: epoch {start_epoch + 1}, step {step_in_epoch}/{updates_per_epoch} "
            f"of the epoch, global step {global_step}")
        if rng_to_restore is None:
            log(f"  (saved with {len(rngs)} process(es), now {d.world}: RNG streams restart from the seed)")
            _seed_all(cfg.seed + d.rank + 1000003 * global_step)

    writer = None
    if d.main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=global_step or None)

    n_params = sum(p.numel() for p in unwrapped.parameters())
    n_train = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    if resume_state is None:
        log(f"training {cfg.model} ({n_params:,} params, {n_train:,} trainable) on {data}: "
            f"{len(train_ds)} train / {len(val_ds) if val_ds else 0} val images, {num_classes} classes")
        log(f"recipe {cfg.recipe_name}: {r.epochs} epochs, global batch {r.batch_size} "
            f"({d.world} process(es) x {r.accum_steps} accumulation x {micro}), peak lr {lr:.3g}, "
            f"{updates_per_epoch} steps/epoch, {d.device}, amp {amp_dtype or 'off'}")

    def state_dict(epoch: int, step: int) -> Dict[str, Any]:
        rngs = [_rng_state()]
        if d.world > 1:
            gathered: List[Any] = [None] * d.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        s: Dict[str, Any] = dict(
            model=unwrapped.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            epoch=epoch, step_in_epoch=step, global_step=global_step, best_metric=best_metric,
            best_epoch=best_epoch, history=json.dumps(history), epoch_loss=epoch_loss, epoch_seen=epoch_seen,
            skipped=skipped_total, rng=rngs, config=json.dumps(cfg.to_dict()), model_name=cfg.model,
            num_classes=num_classes, classes=list(train_ds.classes))
        if ema is not None:
            s["ema"] = ema.module.state_dict()
        if scaler is not None:
            s["scaler"] = scaler.state_dict()
        return s

    def checkpoint(epoch: int, step: int) -> None:
        # every rank takes part (RNG gather); rank 0 writes
        if not _all_finite(unwrapped):
            raise TrainingDiverged(f"non-finite weights after global step {global_step}; not saving. "
                                   f"The last good checkpoint is {out / CKPT_LAST}.")
        s = state_dict(epoch, step)
        if d.main:
            save_training_state(s, out / CKPT_LAST)

    def diverged(value: float, epoch: int) -> TrainingDiverged:
        last = out / CKPT_LAST
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint had been written yet"
        return TrainingDiverged(
            f"loss is {value} at epoch {epoch + 1}, global step {global_step + 1} (lr "
            f"{optimizer.param_groups[0]['lr']:.3g}): training stopped; {kept}. Lower the learning rate "
            f"(--lr), enable gradient clipping (--clip-grad) or use --amp none, then --resume from it.")

    t_start = time.time()
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]
    try:
        for epoch in range(start_epoch, num_epochs):
            first = epoch == start_epoch
            sampler.set_epoch(epoch)
            sampler.set_start(step_in_epoch * r.accum_steps * micro if first else 0)
            loader.generator.manual_seed(cfg.seed * 100003 + epoch)  # worker seeds depend on (seed, epoch) only
            batches = iter(loader)
            if first and rng_to_restore is not None:
                _set_rng_state(rng_to_restore)  # after iter(): the iterator must not shift the streams
            if not first:
                step_in_epoch, epoch_loss, epoch_seen = 0, 0.0, 0
            model.train()
            _frozen_norms_eval(unwrapped)
            t_epoch = time.time()
            seen_now = 0
            bar = tqdm(total=updates_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{num_epochs}",
                       disable=not (d.main and cfg.progress), dynamic_ncols=True, leave=False, file=sys.stderr)
            for step in range(step_in_epoch, updates_per_epoch):
                step_loss, step_n = 0.0, 0
                for micro_i in range(r.accum_steps):
                    batch = next(batches)
                    x, y = batch.images, batch.targets
                    if mixup is not None and len(y) % 2:
                        x, y = x[:-1], y[:-1]  # an unreadable image made the batch odd; Mixup pairs samples
                    sync = model.no_sync() if d.world > 1 and micro_i < r.accum_steps - 1 else contextlib.nullcontext()
                    with sync:
                        if len(y) == 0:
                            # every image of this micro-batch was unreadable: a zero loss still joins the
                            # gradient all-reduce of the other ranks
                            loss, value = sum(p.sum() * 0.0 for p in trainable), 0.0
                        else:
                            x = x.to(d.device, non_blocking=True)
                            y = y.to(d.device, non_blocking=True)
                            if r.channels_last:
                                x = x.contiguous(memory_format=torch.channels_last)
                            if mixup is not None:
                                x, y = mixup(x, y)
                            with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32,
                                                enabled=amp_dtype is not None):
                                loss = criterion(model(x), y)
                            value = float(loss.detach())
                        # one collective per micro-batch: all ranks stop together, skipped images are summed
                        bad, skipped = _all_sum([0.0 if math.isfinite(value) else 1.0, float(batch.skipped)], d)
                        skipped_total += int(skipped)
                        if bad:
                            raise diverged(value, epoch)
                        step_loss += value * len(y)
                        step_n += len(y)
                        scaled = loss / r.accum_steps
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                if r.clip_grad:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    dispatch_clip_grad(trainable, r.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                scheduler.step_update(num_updates=global_step)
                if ema is not None:
                    ema.update(unwrapped, step=global_step)
                epoch_loss += step_loss
                epoch_seen += step_n
                seen_now += step_n
                mean = step_loss / max(step_n, 1)
                cur_lr = optimizer.param_groups[0]["lr"]
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{cur_lr:.2e}")
                if global_step % cfg.log_every == 0:
                    if writer is not None:
                        writer.add_scalar("train/loss", mean, global_step)
                        writer.add_scalar("train/lr", cur_lr, global_step)
                    if not cfg.progress:
                        log(f"epoch {epoch + 1} step {step + 1}/{updates_per_epoch} global_step {global_step} "
                            f"loss {mean:.4f} lr {cur_lr:.3g}")
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step + 1 < updates_per_epoch:
                    checkpoint(epoch, step + 1)
                    log(f"checkpoint: global step {global_step} -> {out / CKPT_LAST}")
            bar.close()
            epoch_time = time.time() - t_epoch

            # end of epoch: evaluate model and EMA, record, checkpoint
            train_loss = _all_sum([epoch_loss, float(epoch_seen)], d)
            row: Dict[str, Any] = dict(epoch=epoch + 1, global_step=global_step,
                                       train_loss=train_loss[0] / max(train_loss[1], 1.0),
                                       lr=optimizer.param_groups[0]["lr"])
            metric = None
            if val_loader is not None:
                m = evaluate(unwrapped, val_loader, d.device, amp_dtype, r.channels_last, d)
                row.update(val_loss=m["loss"], val_top1=m["top1"], val_top5=m["top5"])
                metric, which = m["top1"], "model"
                if ema is not None:
                    e = evaluate(ema.module, val_loader, d.device, amp_dtype, r.channels_last, d)
                    row.update(ema_loss=e["loss"], ema_top1=e["top1"], ema_top5=e["top5"])
                    if e["top1"] > metric:
                        metric, which = e["top1"], "ema"
            row.update(epoch_time_s=epoch_time, images_per_s=_all_sum([float(seen_now)], d)[0] / max(epoch_time, 1e-9),
                       skipped_images=skipped_total)
            history.append(row)
            is_best = metric is not None and metric > best_metric
            if is_best:
                best_metric, best_epoch = metric, epoch + 1
            checkpoint(epoch + 1, 0)
            if d.main:
                if is_best:
                    tmp = out / f".{CKPT_BEST}.tmp"
                    shutil.copyfile(out / CKPT_LAST, tmp)
                    os.replace(tmp, out / CKPT_BEST)
                    _export_best(ema.module if which == "ema" and ema is not None else unwrapped, out, r, cfg,
                                 dict(epoch=epoch + 1, top1=metric, weights=which))
                _write_csv(history, out / HISTORY_CSV)
                if writer is not None:
                    for k, v in row.items():
                        if k != "epoch":
                            writer.add_scalar(f"epoch/{k}", v, epoch + 1)
                    writer.flush()
                msg = f"epoch {epoch + 1}/{num_epochs}  train loss {row['train_loss']:.4f}"
                if "val_top1" in row:
                    msg += f"  val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f} top-5 {row['val_top5']:.2f}"
                if "ema_top1" in row:
                    msg += f"  (EMA top-1 {row['ema_top1']:.2f})"
                msg += f"  {epoch_time:.1f} s  {row['images_per_s']:.0f} img/s"
                if skipped_total:
                    msg += f"  skipped {skipped_total} unreadable image(s)"
                log(msg)
    finally:
        if d.main and history:
            plot_curves(history, out / CURVES_PNG, title=f"{cfg.model} ({cfg.recipe_name})")
            _write_csv(history, out / HISTORY_CSV)
        if writer is not None:
            writer.close()

    wall = time.time() - t_start
    last = history[-1] if history else {}
    summary = dict(
        model=cfg.model, recipe=cfg.recipe_name, epochs=num_epochs, global_steps=global_step,
        processes=d.world, device=str(d.device), wall_time_s=wall,
        best_top1=best_metric if best_metric >= 0 else None, best_epoch=best_epoch if best_epoch > 0 else None,
        final_top1=last.get("val_top1"), final_ema_top1=last.get("ema_top1"), final_top5=last.get("val_top5"),
        final_train_loss=last.get("train_loss"), skipped_images=skipped_total,
        output=str(out), last_checkpoint=str(out / CKPT_LAST),
        best_model=str(out / BEST_MODEL_DIR) if best_epoch > 0 else None,
    )
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log(_format_summary(summary))
    return summary


def _export_best(model: nn.Module, out: Path, r: Recipe, cfg: TrainConfig, info: Dict[str, Any]) -> None:
    """The best weights as ``best_model/`` (safetensors + config) for ``create_model(pretrained=...)``."""
    from ..models.checkpoints import save_pretrained

    pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    pcfg.update(input_size=(3, r.img_size, r.img_size), num_classes=getattr(model, "num_classes", None))
    if r.crop_pct is not None:
        pcfg["crop_pct"] = r.crop_pct
    model.pretrained_cfg = pcfg
    save_pretrained(model, out / BEST_MODEL_DIR, extra_config=dict(model_name=cfg.model, model_kwargs=cfg.model_kwargs,
                                                                   best=info))


def _format_summary(s: Dict[str, Any]) -> str:
    lines = [f"done: {s['model']} ({s['recipe']}), {s['epochs']} epochs, {s['global_steps']} steps on "
             f"{s['processes']} x {s['device']} in {s['wall_time_s']:.1f} s"]
    if s["best_top1"] is not None:
        lines.append(f"  best val top-1 {s['best_top1']:.2f}% (epoch {s['best_epoch']}); final top-1 "
                     f"{s['final_top1']:.2f}%" + (f", EMA {s['final_ema_top1']:.2f}%" if s["final_ema_top1"] is not None else ""))
    if s["skipped_images"]:
        lines.append(f"  skipped {s['skipped_images']} unreadable image(s) (see the log above)")
    lines.append(f"  outputs in {s['output']}: last.pt, best.pt, best_model/, history.csv, curves.png, tensorboard/")
    return "\n".join(lines)


def evaluate_checkpoint(data: str, model: str, checkpoint: Optional[str] = None, split: str = "val",
                        batch_size: int = 64, num_workers: int = 4, img_size: Optional[int] = None,
                        crop_pct: Optional[float] = None, device: str = "auto") -> Dict[str, Any]:
    """Top-1 / top-5 of ``model`` on ``data/split`` with the model's eval transform.

    ``checkpoint``: ours (``best_model/``, ``last.pt``, safetensors), the authors' ``evalmodel.pt``,
    timm's, or ``"hub"`` for timm's weights of the variant; None evaluates random weights. The
    checkpoint's classifier must have as many classes as the split has class folders (in sorted order).
    """
    root = Path(data) / split if (Path(data) / split).is_dir() else Path(data)
    ds = SafeImageFolder(root)
    classes = len(ds.classes)
    pretrained: Any = False
    if checkpoint:
        pretrained = True if checkpoint == "hub" else checkpoint
    saved_img, saved_crop = None, None
    if isinstance(pretrained, str):
        p = Path(pretrained)
        if p.is_dir() and not is_cpubone(model):
            pretrained = str(p / "model.safetensors")
        if p.is_file() and p.suffix == ".pt":
            try:  # our training checkpoints carry the input size they were trained at
                state = torch.load(str(p), map_location="cpu", weights_only=True)
                if isinstance(state, dict) and "config" in state:
                    rec = json.loads(state["config"])["recipe"]
                    saved_img, saved_crop = rec.get("img_size"), rec.get("crop_pct")
            except Exception:
                pass  # not ours: create_model reports unreadable files with a clear message
    if is_cpubone(model):
        net = create_model(model, pretrained=pretrained, num_classes=None if pretrained else classes)
    else:
        net = create_model(model, pretrained=pretrained, num_classes=classes)
    if net.num_classes != classes:
        raise ValueError(f"{checkpoint or model}: the classifier has {net.num_classes} classes but {root} has "
                         f"{classes} class folders")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    net.to(dev)
    size = img_size or saved_img or net.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    ds.transform = build_transforms(net, size, None, is_training=False, crop_pct=crop_pct or saved_crop)
    loader = make_loader(ds, batch_size, None, num_workers, drop_last=False, pin_memory=dev.type == "cuda")
    m = evaluate(net, loader, dev)
    return dict(model=model, checkpoint=checkpoint, split=str(root), classes=classes, input_size=size, **m)
