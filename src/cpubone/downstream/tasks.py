"""RetinaNet detection and Semantic FPN segmentation as tasks of the training loop (``cpubone.train.loop``).

The loop gives both what classification has: torchrun DDP, AMP, gradient accumulation, atomic full-state
checkpoints with exact resume after SIGKILL, NaN stop, logs and curves. The tasks supply the model, the
optimizer and schedule of their preset, the data and the evaluation:

* data: every epoch (for segmentation: every block of ``eval_every`` iterations) is a sequence of indices
  drawn from (seed, epoch) only and split over the processes (``StreamSampler``), and each sample's
  augmentation is seeded by (seed, epoch, index) (``SeededSamples``): N processes see the global batches
  of one process, and a resumed run the samples and augmentations of an uninterrupted one;
* evaluation runs on the first process (the COCO / mIoU evaluators are not sharded);
* ``model.pt`` (weights + config) is written when the last epoch ends, before ``last.pt`` marks it done.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler, PolyLRScheduler

from ..train.data import SeededSamples, StreamSampler
from ..train.loop import Dist, Task, save_training_state, seed_all
from .datasets import (
    IGNORE_INDEX,
    AnnotationError,
    CocoDetection,
    SegmentationFolder,
    collate_skip,
    detection_transforms,
    segmentation_transforms,
)
from .detection import create_retinanet
from .evaluate import coco_split, evaluate_detection, evaluate_segmentation
from .presets import DETECTION_PRESETS
from .segmentation import create_semantic_fpn

__all__ = ["DetectionTask", "SegmentationTask", "MODEL_FILE"]

MODEL_FILE = "model.pt"


def _optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float, momentum: float = 0.9):
    kwargs = {"momentum": momentum} if opt.lower() in ("sgd", "momentum", "nesterov") else {}
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)


def _check_positive(c: Dict[str, Any], names: Tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(c.get(name), int) or c[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {c.get(name)!r}")


class _DownstreamTask(Task):
    """What detection and segmentation share: config, batches, the loader, the final weights file."""

    task_key = ""

    def __init__(self, c: Dict[str, Any], log_fn=None) -> None:
        self.c = c
        self.accum_steps = c["accum_steps"]
        self.clip_grad = c.get("grad_clip")
        self.amp = c["amp"]
        self.checkpoint_every, self.progress = c["checkpoint_every"], c["progress"]
        self.tensorboard, self.log_every = c["tensorboard"], c["log_every"]
        self.last_metrics: Dict[str, Any] = {}

    def _batching(self, d: Dist, train_ds) -> None:
        c = self.c
        world = d.world * c["accum_steps"]
        if c["batch_size"] % world:
            raise ValueError(f"batch size {c['batch_size']} is not divisible by processes x accumulation steps "
                             f"({d.world} x {c['accum_steps']})")
        self.micro = c["batch_size"] // world
        self.data = SeededSamples(train_ds, c["seed"])
        self.sampler = StreamSampler(len(train_ds), c["batch_size"], d.world, d.rank, c["seed"])
        self.loader = torch.utils.data.DataLoader(
            self.data, batch_size=self.micro, sampler=self.sampler, num_workers=c["workers"], collate_fn=collate_skip,
            generator=torch.Generator().manual_seed(c["seed"]), persistent_workers=False)

    def batches(self, epoch: int, start_step: int) -> Iterator[Tuple[Any, int]]:
        self.sampler.set_epoch(epoch, self.steps_in_epoch(epoch) * self.c["batch_size"])
        self.sampler.set_start(start_step * self.accum_steps * self.micro)
        self.data.set_epoch(epoch)
        self.model.train()
        it = iter(self.loader)
        return (((images, targets) if images else None, skipped) for images, targets, skipped in it)

    def config(self) -> Dict[str, Any]:
        return dict(self.c, task=self.task_key)

    def save_derived(self, out: Path, best: Optional[nn.Module], state: Dict[str, Any], final: bool) -> None:
        if final:
            save_training_state({"model": state["model"], "config": json.dumps(self.config()),
                                 "task": self.task_key, "metrics": json.dumps(self.last_metrics)}, out / MODEL_FILE)

    def rebuild_derived(self, out: Path, last: Dict[str, Any]) -> None:
        if last["epoch"] >= self.epochs and not (out / MODEL_FILE).is_file():
            save_training_state({"model": last["model"], "config": json.dumps(self.config()), "task": self.task_key,
                                 "metrics": json.dumps({})}, out / MODEL_FILE)

    def diverged_hint(self) -> str:
        return "lower the learning rate, clip the gradients (or check for batches without any labelled pixel), then resume"


class DetectionTask(_DownstreamTask):
    """RetinaNet on COCO-format data with a ``DetectionPreset`` schedule (multi-step lr, per iteration)."""

    name = "detect"
    task_key = "detect"
    curve_keys = ("AP", "AP50")

    def setup(self, d: Dist, log) -> None:
        c = self.c
        _check_positive(c, ("epochs", "batch_size", "accum_steps", "eval_every"))
        self.d = d
        img_dir, ann = coco_split(c["data"], c["train_split"])
        train_ds = CocoDetection(img_dir, ann, transforms=detection_transforms(train=True))
        self.val_ds = None
        if c["val_split"]:
            v_img, v_ann = coco_split(c["data"], c["val_split"])
            self.val_ds = CocoDetection(v_img, v_ann, transforms=detection_transforms(train=False))
            if self.val_ds.cat_ids != train_ds.cat_ids:
                raise AnnotationError(f"{v_ann}: categories {self.val_ds.cat_ids} differ from the training set's "
                                      f"{train_ds.cat_ids}")
        c["num_classes"], c["classes"], c["cat_ids"] = len(train_ds.cat_ids), train_ds.classes, train_ds.cat_ids
        self.train_size = len(train_ds)
        seed_all(c["seed"])  # the same init on every process
        self.model = create_retinanet(c["backbone"], c["num_classes"], pretrained_backbone=c["pretrained_backbone"],
                                      fpn_channels=c["fpn_channels"], head_norm=c["head_norm"], min_size=c["min_size"],
                                      max_size=c["max_size"]).to(d.device)
        seed_all(c["seed"] + d.rank)
        self._batching(d, train_ds)
        self.iters_per_epoch = max(1, len(train_ds) // c["batch_size"])
        self.epochs = c["epochs"]
        self.optimizer = _optimizer(self.model, c["opt"], c["lr"], c["weight_decay"], c["momentum"])
        # the decay points keep their place in the schedule when the epochs shorten or stretch it (8/12, 11/12)
        scale = c["epochs"] / DETECTION_PRESETS[c["preset"]].epochs
        self.scheduler = MultiStepLRScheduler(
            self.optimizer, decay_t=[round(e * scale * self.iters_per_epoch) for e in c["decay_epochs"]],
            decay_rate=c["decay_rate"], warmup_t=c["warmup_iters"], warmup_lr_init=c["lr"] * c["warmup_ratio"],
            t_in_epochs=False)
        self.title = f"RetinaNet on {c['backbone']}"

    def describe(self, d: Dist) -> List[str]:
        c = self.c
        return [f"RetinaNet on {c['backbone']}: {self.train_size} training images, {c['num_classes']} classes, "
                f"{c['epochs']} epochs x {self.iters_per_epoch} iterations of batch {c['batch_size']} "
                f"({d.world} process(es) x {c['accum_steps']} accumulation x {self.micro}), {c['opt']} lr {c['lr']}"]

    def steps_in_epoch(self, epoch: int) -> int:
        return self.iters_per_epoch

    def loss(self, model: nn.Module, batch: Any, ema: Optional[nn.Module], progress: float) -> Tuple[torch.Tensor, int]:
        images, targets = batch
        dev = self.d.device
        images = [im.to(dev) for im in images]
        targets = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), len(images)

    def evaluate(self, model: nn.Module, ema: Optional[nn.Module], epoch: int) -> Tuple[Dict[str, Any], Optional[float], str]:
        c = self.c
        due = (epoch + 1) % c["eval_every"] == 0 or epoch + 1 == c["epochs"]
        if self.val_ds is None or not due or not self.d.main:
            return {}, None, "model"
        m = evaluate_detection(model, self.val_ds, batch_size=max(1, c["batch_size"] // 2), workers=c["workers"])
        model.train()
        m["val_skipped_images"] = m.pop("skipped_images", 0)
        self.last_metrics = m
        return {k: v for k, v in m.items() if not isinstance(v, (list, dict))}, m.get("AP"), "model"


class SegmentationTask(_DownstreamTask):
    """Semantic FPN on ADE20K-format data: ``iters`` iterations in blocks of ``eval_every`` (poly lr)."""

    name = "segment"
    task_key = "segment"
    x_key = "global_step"
    curve_keys = ("mIoU", "aAcc")

    def setup(self, d: Dist, log) -> None:
        c = self.c
        _check_positive(c, ("iters", "batch_size", "accum_steps", "eval_every", "crop_size", "base_size"))
        self.d = d
        train_ds = SegmentationFolder(c["data"], c["train_split"], c["num_classes"], c["reduce_zero_label"],
                                      transforms=segmentation_transforms(True, c["crop_size"], c["base_size"],
                                                                         tuple(c["ratio_range"])))
        self.val_ds = (SegmentationFolder(c["data"], c["val_split"], c["num_classes"], c["reduce_zero_label"])
                       if c["val_split"] else None)
        classes_file = Path(c["data"]) / "classes.json"
        c["classes"] = (json.loads(classes_file.read_text())[1 if c["reduce_zero_label"] else 0:]
                        if classes_file.is_file() else [str(i) for i in range(c["num_classes"])])
        self.train_size = len(train_ds)
        seed_all(c["seed"])
        self.model = create_semantic_fpn(c["backbone"], c["num_classes"], pretrained_backbone=c["pretrained_backbone"],
                                         fpn_channels=c["fpn_channels"], channels=c["head_channels"],
                                         dropout=c["dropout"]).to(d.device)
        seed_all(c["seed"] + d.rank)
        self._batching(d, train_ds)
        self.epochs = math.ceil(c["iters"] / c["eval_every"])
        self.optimizer = _optimizer(self.model, c["opt"], c["lr"], c["weight_decay"])
        self.scheduler = PolyLRScheduler(self.optimizer, t_initial=c["iters"], power=c["poly_power"], lr_min=0.0,
                                         warmup_t=c["warmup_iters"], warmup_lr_init=c["lr"] * 1e-3, t_in_epochs=False)
        self.title = f"Semantic FPN on {c['backbone']}"

    def describe(self, d: Dist) -> List[str]:
        c = self.c
        return [f"Semantic FPN on {c['backbone']}: {self.train_size} training images, {c['num_classes']} classes, "
                f"{c['iters']} iterations of batch {c['batch_size']} ({d.world} process(es) x {c['accum_steps']} "
                f"accumulation x {self.micro}) at {c['crop_size']}px, {c['opt']} lr {c['lr']}"]

    def steps_in_epoch(self, epoch: int) -> int:
        return min(self.c["eval_every"], self.c["iters"] - epoch * self.c["eval_every"])

    def loss(self, model: nn.Module, batch: Any, ema: Optional[nn.Module], progress: float) -> Tuple[torch.Tensor, int]:
        images, masks = batch
        dev = self.d.device
        logits = model(torch.stack(images).to(dev))
        return F.cross_entropy(logits.float(), torch.stack(masks).to(dev), ignore_index=IGNORE_INDEX), len(images)

    def evaluate(self, model: nn.Module, ema: Optional[nn.Module], epoch: int) -> Tuple[Dict[str, Any], Optional[float], str]:
        if self.val_ds is None or not self.d.main:
            return {}, None, "model"
        m = evaluate_segmentation(model, self.val_ds, base_size=self.c["base_size"])
        model.train()
        m["val_skipped_images"] = m.pop("skipped_images", 0)
        self.last_metrics = m
        return {k: v for k, v in m.items() if not isinstance(v, (list, dict))}, m.get("mIoU"), "model"
