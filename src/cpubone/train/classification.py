"""Image classification on an ImageFolder: the task the training loop trains, ``train``, and ``evaluate_checkpoint``.

``train(TrainConfig)`` runs a whole job on ``loop.run``. The task is assembled from timm (transforms,
RandAugment/AutoAugment, random erasing, Mixup/CutMix, AdamW without decay on norms and biases, cosine
schedule with warm-up, EMA, BCE / soft-target losses) and ``release.py`` (scheduled DropPath, random
resolution, BatchNorm re-estimation, Mesa) for what timm lacks.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import (
    BinaryCrossEntropy,
    LabelSmoothingCrossEntropy,
    SoftTargetCrossEntropy,
)
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..models.checkpoints import save_pretrained
from ..models.factory import create_model, is_cpubone, resolve_model_name
from .data import (
    ResumableSampler,
    SafeImageFolder,
    build_transforms,
    collate_skip_bad,
    make_loader,
)
from .loop import (
    CKPT_BEST,
    Dist,
    Task,
    all_sum,
    amp_dtype,
    isolated_rng,
    load_training_state,
    resolve_checkpoint,
    run,
    seed_all,
)
from .recipes import Recipe, get_recipe
from .release import (
    RandomResolutionBatchSampler,
    apply_scheduled_drop_path,
    mesa_loss,
    reestimate_batchnorm,
    set_drop_path_progress,
)

__all__ = ["TrainConfig", "ClassificationTask", "train", "evaluate", "evaluate_checkpoint", "resolved_config",
           "BEST_MODEL_DIR"]

BEST_MODEL_DIR = "best_model"

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
        resume: a ``last.pt``/``best.pt`` or a run folder (its ``last.pt``) to continue from.
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
    def from_preset(cls, data: str, model: str, recipe: str = "release", **kwargs: Any) -> "TrainConfig":
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


def resolved_config(cfg: TrainConfig, world: int = 1) -> Dict[str, Any]:
    """The whole configuration of a run on ``world`` processes (batches and peak lr resolved), touching no data."""
    cfg.recipe.check()
    return dict(model=cfg.model, recipe_name=cfg.recipe_name, **cfg.recipe.resolve(world),
                recipe=cfg.recipe.to_dict(), total_epochs=cfg.recipe.epochs + (
                    int(cfg.recipe.warmup_epochs) if cfg.recipe.warmup_prefix else 0),
                config={k: v for k, v in cfg.to_dict().items() if k != "recipe"})


# --- model ---------------------------------------------------------------------------------------
def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    pretrained: Any = False
    if cfg.pretrained:
        pretrained = True if cfg.pretrained == "hub" else cfg.pretrained
        if pretrained is not True and Path(pretrained).is_dir() and not is_cpubone(cfg.model):
            pretrained = str(Path(pretrained) / "model.safetensors")
    r = cfg.recipe
    kwargs = dict(cfg.model_kwargs)
    drop_path = 0.0 if r.drop_path_scheduled else r.drop_path  # the scheduled rule puts its own DropPaths in
    try:
        if not is_cpubone(cfg.model) and isinstance(pretrained, str):
            # timm's pretrained loader drops a classifier whose class count differs (head reset)
            return timm.create_model(resolve_model_name(cfg.model).name, pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained)),
                                     num_classes=num_classes, drop_rate=r.drop, drop_path_rate=drop_path, **kwargs)
        return create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, drop_rate=r.drop,
                            drop_path_rate=drop_path, **kwargs)
    except TypeError as e:
        if kwargs and "unexpected keyword argument" in str(e):
            raise ValueError(f"{cfg.model}: unknown model argument in {sorted(kwargs)} ({e})") from e
        raise


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


# --- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             amp: Optional[torch.dtype] = None, channels_last: bool = False,
             d: Optional[Dist] = None) -> Dict[str, float]:
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
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[1])
        hit = out.topk(k, dim=1).indices.eq(y[:, None])
        sums[0] += float(loss_fn(out, y))
        sums[1] += float(hit[:, :1].sum())
        sums[2] += float(hit.sum())
        sums[3] += len(y)
    if d is not None:
        sums = all_sum(sums, d)
    n = max(sums[3], 1.0)
    return dict(loss=sums[0] / n, top1=100.0 * sums[1] / n, top5=100.0 * sums[2] / n, images=int(sums[3]),
                skipped=int(sums[4]))


# --- the task ------------------------------------------------------------------------------------
class ClassificationTask(Task):
    """An ImageFolder classifier trained with a ``Recipe``."""

    name = "classify"
    curve_keys = ("val_top1", "ema_top1")

    def __init__(self, cfg: TrainConfig, resumed_classes: Optional[List[str]] = None) -> None:
        self.cfg = cfg
        self.resumed_classes = resumed_classes
        r = cfg.recipe
        self.accum_steps, self.clip_grad, self.amp = r.accum_steps, r.clip_grad, r.amp
        self.ema_decay, self.ema_warmup, self.restart_drop = r.ema_decay, r.ema_warmup, r.restart_drop
        self.checkpoint_every, self.progress = cfg.checkpoint_every, cfg.progress
        self.tensorboard, self.log_every = cfg.tensorboard, cfg.log_every
        self.title = f"{cfg.model} ({cfg.recipe_name})"
        self.drop_paths: List[nn.Module] = []

    def setup(self, d: Dist, log) -> None:
        cfg, r = self.cfg, self.cfg.recipe
        self.d = d
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif d.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        res = r.resolve(d.world)
        self.micro, self.peak_lr = res["batch_per_process"], res["peak_lr"]

        # data (transforms are set once the model, and with it the normalisation, is known)
        data = Path(cfg.data)
        self.train_ds = SafeImageFolder(data / "train")
        val_dir = data / "val"
        self.val_ds = SafeImageFolder(val_dir, classes=self.train_ds.classes) if val_dir.is_dir() else None
        self.classes = list(self.train_ds.classes)
        if self.resumed_classes is not None and self.resumed_classes != self.classes:
            raise ValueError(f"{data / 'train'} has {len(self.classes)} class folders but the checkpoint was "
                             f"trained on {len(self.resumed_classes)} classes "
                             f"({', '.join(self.resumed_classes[:5])}{' ...' if len(self.resumed_classes) > 5 else ''})")
        num_classes = len(self.classes)

        # the same init on every rank (the EMA copies it before DDP would broadcast rank 0's weights)
        seed_all(cfg.seed)
        # a resumed run gets its weights from the checkpoint, not from the (maybe moved) pretrained file
        model = _build_model(cfg if self.resumed_classes is None else dataclasses.replace(cfg, pretrained=None),
                             num_classes)
        if r.drop_path_scheduled and r.drop_path > 0:
            self.drop_paths = apply_scheduled_drop_path(model, r.drop_path, skip=r.drop_path_skip)
        if r.freeze_backbone:
            _freeze_backbone(model)
        if cfg.sync_bn and d.world > 1:
            if d.device.type != "cuda":
                raise ValueError("SyncBatchNorm needs CUDA: torch has no CPU implementation")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(d.device)
        if r.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        seed_all(cfg.seed + d.rank)

        sizes = tuple(r.img_sizes) if r.img_sizes else (r.img_size,)
        self.train_ds.size_transforms = {s: build_transforms(model, s, r, is_training=True) for s in sizes}
        self.train_ds.transform = build_transforms(model, r.img_size, r, is_training=True)
        if self.val_ds is not None:
            self.val_ds.transform = build_transforms(model, r.img_size, r, is_training=False, crop_pct=r.crop_pct)

        self.sampler = ResumableSampler(self.train_ds, d.world, d.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        pin = d.device.type == "cuda"
        if r.img_sizes:
            self.loader = torch.utils.data.DataLoader(
                self.train_ds, batch_sampler=RandomResolutionBatchSampler(self.sampler, self.micro, sizes),
                num_workers=cfg.num_workers, collate_fn=collate_skip_bad, pin_memory=pin,
                generator=torch.Generator().manual_seed(cfg.seed))
        else:
            self.loader = make_loader(self.train_ds, self.micro, self.sampler, cfg.num_workers, drop_last=True,
                                      pin_memory=pin, seed=cfg.seed)
        self.updates_per_epoch = (self.sampler.num_samples // self.micro) // r.accum_steps
        if self.updates_per_epoch == 0:
            raise ValueError(f"{data / 'train'}: {len(self.train_ds)} images are fewer than one global batch of "
                             f"{res['global_batch']}; use a smaller batch")
        self.val_loader = None
        if self.val_ds is not None:
            # shard without padding so that every image is counted exactly once
            shard = torch.utils.data.Subset(self.val_ds, range(d.rank, len(self.val_ds), d.world))
            self.val_loader = make_loader(shard, max(self.micro, 1) * 2, None, cfg.num_workers, drop_last=False,
                                          pin_memory=pin)

        self.optimizer = create_optimizer_v2(model, opt=r.opt, lr=self.peak_lr, weight_decay=r.weight_decay,
                                             filter_bias_and_bn=True, eps=r.opt_eps)
        self.scheduler, epochs = create_scheduler_v2(
            self.optimizer, sched=r.sched, num_epochs=r.epochs, warmup_epochs=r.warmup_epochs,
            warmup_lr=r.warmup_lr, warmup_prefix=r.warmup_prefix, min_lr=r.min_lr, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch)
        self.epochs = int(round(epochs))  # warm-up epochs are a float field
        self.mixup = None
        if r.mixup > 0 or r.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, prob=r.mixup_prob,
                               switch_prob=r.mixup_switch_prob, label_smoothing=r.smoothing, num_classes=num_classes)
            if self.micro % 2:
                raise ValueError(f"Mixup/CutMix need an even per-process batch; got {self.micro}")
        if r.loss == "bce":
            # timm's BCE smooths hard targets itself and takes Mixup's (already smoothed) soft targets as they are
            self.criterion: nn.Module = BinaryCrossEntropy(smoothing=r.smoothing)
        elif self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()
        elif r.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(r.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.amp_dtype = amp_dtype(r.amp, d.device)

    def describe(self, d: Dist) -> List[str]:
        cfg, r = self.cfg, self.cfg.recipe
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        sizes = f"sizes {list(r.img_sizes)} (eval {r.img_size})" if r.img_sizes else f"{r.img_size} px"
        return [f"training {cfg.model} ({n_params:,} params, {n_train:,} trainable) on {cfg.data}: "
                f"{len(self.train_ds)} train / {len(self.val_ds) if self.val_ds else 0} val images, "
                f"{len(self.classes)} classes",
                f"recipe {cfg.recipe_name}: {self.epochs} epochs, global batch "
                f"{d.world * r.accum_steps * self.micro} ({d.world} process(es) x {r.accum_steps} accumulation x "
                f"{self.micro}), peak lr {self.peak_lr:.3g}, {sizes}, {self.updates_per_epoch} steps/epoch, "
                f"{d.device}, amp {self.amp_dtype or 'off'}"]

    def steps_in_epoch(self, epoch: int) -> int:
        return self.updates_per_epoch

    def batches(self, epoch: int, start_step: int) -> Iterator[Tuple[Any, int]]:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_step * self.accum_steps * self.micro)
        self.loader.generator.manual_seed(self.cfg.seed * 100003 + epoch)  # worker seeds depend on (seed, epoch) only
        self.model.train()
        _frozen_norms_eval(self.model)
        it = iter(self.loader)
        return ((b if b.targets.numel() else None, b.skipped) for b in it)

    def loss(self, model: nn.Module, batch: Any, ema: Optional[nn.Module], progress: float) -> Tuple[torch.Tensor, int]:
        r, dev = self.cfg.recipe, self.d.device
        x, y = batch.images, batch.targets
        if self.mixup is not None and len(y) % 2:
            x, y = x[:-1], y[:-1]  # an unreadable image made the batch odd; Mixup pairs samples
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if r.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        out = model(x)
        loss = self.criterion(out, y)
        if r.mesa_thresh is not None and ema is not None and progress >= r.mesa_thresh:
            with torch.no_grad():
                ema_out = ema(x)
            loss = loss + mesa_loss(out, ema_out, progress, r.mesa_thresh, r.mesa_ratio)
        return loss, len(y)

    def after_update(self, progress: float) -> None:
        if self.drop_paths:
            set_drop_path_progress(self.drop_paths, progress)

    def _bn_images(self, epoch: int) -> Iterator[torch.Tensor]:
        """A fixed subset of training images (training transform at the eval size) for BN re-estimation."""
        r, d = self.cfg.recipe, self.d
        n = min(r.bn_reestimate, len(self.train_ds))  # small data: all of it
        g = torch.Generator().manual_seed(self.cfg.seed)
        idx = torch.randperm(len(self.train_ds), generator=g)[:n].tolist()[d.rank::d.world]
        sub = torch.utils.data.Subset(self.train_ds, [(i, r.img_size) for i in idx])
        if r.img_size not in self.train_ds.size_transforms:
            self.train_ds.size_transforms[r.img_size] = build_transforms(self.model, r.img_size, r, is_training=True)
        loader = torch.utils.data.DataLoader(sub, batch_size=min(r.bn_reestimate_batch, max(len(sub), 1)),
                                             num_workers=self.cfg.num_workers, collate_fn=collate_skip_bad,
                                             generator=torch.Generator().manual_seed(self.cfg.seed))
        for b in loader:
            if b.targets.numel():
                x = b.images.to(d.device)
                yield x.contiguous(memory_format=torch.channels_last) if r.channels_last else x

    def evaluate(self, model: nn.Module, ema: Optional[nn.Module], epoch: int) -> Tuple[Dict[str, Any], Optional[float], str]:
        r, d = self.cfg.recipe, self.d
        if r.bn_reestimate > 0:
            # the same images and augmentation draws every time, without touching the training RNG streams
            for m in (model, ema):
                if m is not None:
                    with isolated_rng(self.cfg.seed + 7919):
                        reestimate_batchnorm(m, self._bn_images(epoch), d.world)
        if self.val_loader is None:
            return {}, None, "model"
        m = evaluate(model, self.val_loader, d.device, self.amp_dtype, r.channels_last, d)
        row = dict(val_loss=m["loss"], val_top1=m["top1"], val_top5=m["top5"])
        metric, which = m["top1"], "model"
        if ema is not None:
            e = evaluate(ema, self.val_loader, d.device, self.amp_dtype, r.channels_last, d)
            row.update(ema_loss=e["loss"], ema_top1=e["top1"], ema_top5=e["top5"])
            if e["top1"] > metric:
                metric, which = e["top1"], "ema"
        model.train()
        _frozen_norms_eval(model)
        return row, metric, which

    def save_derived(self, out: Path, best: Optional[nn.Module], state: Dict[str, Any], final: bool) -> None:
        if best is not None:
            self.export_best(best, out, dict(epoch=state["best_epoch"], top1=state["best_metric"],
                                             weights=state["best_weights"]))

    def rebuild_derived(self, out: Path, last: Dict[str, Any]) -> None:
        """``best_model/`` from ``best.pt`` when a kill left it missing or half-written."""
        folder = out / BEST_MODEL_DIR
        for stale in folder.glob("*.tmp"):
            stale.unlink()
        if not (out / CKPT_BEST).is_file() or ((folder / "model.safetensors").is_file() and (folder / "config.json").is_file()):
            return
        best = load_training_state(out / CKPT_BEST)
        weights = best.get("best_weights", "model")
        module = _build_model(dataclasses.replace(self.cfg, pretrained=None), len(self.classes))
        module.load_state_dict(best["ema"] if weights == "ema" and "ema" in best else best["model"])
        self.export_best(module, out, dict(epoch=best["best_epoch"], top1=best["best_metric"], weights=weights))

    def export_best(self, model: nn.Module, out: Path, info: Dict[str, Any]) -> None:
        """The best weights as ``best_model/`` (safetensors + config) for ``create_model(pretrained=...)``."""
        r = self.cfg.recipe
        pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        pcfg.update(input_size=(3, r.img_size, r.img_size), num_classes=getattr(model, "num_classes", None),
                    label_names=list(self.classes))
        if r.crop_pct is not None:
            pcfg["crop_pct"] = r.crop_pct
        model.pretrained_cfg = pcfg
        save_pretrained(model, out / BEST_MODEL_DIR, extra_config=dict(model_name=self.cfg.model,
                                                                      model_kwargs=self.cfg.model_kwargs, best=info))

    def config(self) -> Dict[str, Any]:
        return self.cfg.to_dict()

    def extra_state(self) -> Dict[str, Any]:
        return dict(model_name=self.cfg.model, num_classes=len(self.classes), classes=list(self.classes))


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) a training job; returns the final summary (also written to ``summary.json``).

    Raises ``TrainingDiverged`` on a NaN/inf loss (``last.pt`` is left as it was).
    """
    resume_state, classes, resume_path = None, None, ""
    if cfg.resume:
        resume_path = str(resolve_checkpoint(cfg.resume))
        resume_state = load_training_state(resume_path)
        if resume_state.get("task", "classify") != "classify":
            raise ValueError(f"{resume_path}: a {resume_state['task']} checkpoint, not a classification one")
        saved = TrainConfig.from_dict(json.loads(resume_state["config"]))
        for name in _RUN_FIELDS:
            if name == "data" and not cfg.data:
                continue  # resuming without data: the checkpoint's data folder
            setattr(saved, name, getattr(cfg, name))
        cfg = saved
        classes = list(resume_state.get("classes") or [])
    cfg.recipe.check()
    task = ClassificationTask(cfg, classes)
    res = run(task, cfg.output, resume_state, resume_path, cfg.device, cfg.seed)
    last = res["last"]
    summary = dict(
        model=cfg.model, recipe=cfg.recipe_name, epochs=res["epochs"], global_steps=res["global_steps"],
        processes=res["processes"], device=res["device"], wall_time_s=res["wall_time_s"],
        best_top1=res["best_metric"], best_epoch=res["best_epoch"],
        final_top1=last.get("val_top1"), final_ema_top1=last.get("ema_top1"), final_top5=last.get("val_top5"),
        final_train_loss=last.get("train_loss"), skipped_images=res["skipped_images"],
        output=res["output"], last_checkpoint=res["last_checkpoint"],
        best_model=str(Path(cfg.output) / BEST_MODEL_DIR) if res["best_epoch"] else None,
    )
    if res["main"]:
        (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2))
        print(_format_summary(summary), flush=True)
    return summary


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
            # our training checkpoints carry the input size they were trained at
            try:
                state = torch.load(str(p), map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
                state = None  # not ours: create_model below reports an unreadable file with a clear message
            if isinstance(state, dict) and isinstance(state.get("config"), str):
                rec = json.loads(state["config"]).get("recipe", {})
                saved_img, saved_crop = rec.get("img_size"), rec.get("crop_pct")
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
