"""Training, evaluation and prediction for RetinaNet detection and Semantic FPN segmentation.

Training runs on the one training engine (``cpubone.train.engine``, tasks in ``tasks.py``): torchrun DDP,
AMP, accumulation, the same atomic full-state checkpoints and exact resume as classification. The schedules
are timm's (``MultiStepLRScheduler`` for the 1x schedule, ``PolyLRScheduler`` for 40k iterations) updated
every iteration, the optimizer timm's ``create_optimizer_v2`` (no weight decay on norms and biases).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .datasets import AnnotationError, CocoDetection, SegmentationFolder, collate_skip
from .detection import DETECTION_PRESETS, create_retinanet
from .metrics import ConfusionMatrix, coco_detection_metrics, detections_to_coco
from .segmentation import SEGMENTATION_PRESETS, create_semantic_fpn

__all__ = [
    "DetectionTrainConfig", "SegmentationTrainConfig", "coco_split", "train_detection", "evaluate_detection",
    "train_segmentation", "evaluate_segmentation", "load_downstream_model", "predict_detection",
    "predict_segmentation", "save_checkpoint",
]

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]


# --- configs ------------------------------------------------------------------------------------
@dataclasses.dataclass
class DetectionTrainConfig:
    """RetinaNet training. Fields left None take the preset's value (``DETECTION_PRESETS``)."""

    data: str
    output: str
    backbone: str = "cpubone_b0"
    preset: str = "1x"
    train_split: str = "train"
    val_split: Optional[str] = "val"
    pretrained_backbone: Union[bool, str] = False
    fpn_channels: int = 256  # FPN and head width
    head_norm: bool = False  # GroupNorm in the head (torchvision RetinaNet v2)
    grad_clip: Optional[float] = None  # max gradient norm (preset's otherwise)
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    opt: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_iters: Optional[int] = None
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    workers: int = 2
    seed: int = 0
    eval_every: int = 1  # epochs
    log_every: int = 20  # iterations
    resume: Optional[str] = None  # a last.pt or a run folder
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    amp: str = "none"  # none (fp32), auto / bf16 (CPU and GPU), fp16 (GPU, with a GradScaler)
    checkpoint_every: int = 0  # also save last.pt every this many iterations
    device: str = "auto"
    progress: bool = False  # tqdm bars instead of a log line every log_every iterations
    tensorboard: bool = False


@dataclasses.dataclass
class SegmentationTrainConfig:
    """Semantic FPN training. Fields left None take the preset's value (``SEGMENTATION_PRESETS``)."""

    data: str
    output: str
    num_classes: int = 150
    reduce_zero_label: bool = True
    backbone: str = "cpubone_b0"
    preset: str = "ade20k-40k"
    train_split: str = "training"
    val_split: Optional[str] = "validation"
    pretrained_backbone: Union[bool, str] = False
    fpn_channels: int = 256  # FPN width
    head_channels: int = 128  # semantic-branch width
    dropout: float = 0.1  # before the classifier
    iters: Optional[int] = None
    batch_size: Optional[int] = None
    crop_size: Optional[int] = None
    base_size: Optional[int] = None
    opt: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_iters: Optional[int] = None
    workers: int = 2
    seed: int = 0
    eval_every: int = 4000  # iterations
    log_every: int = 50
    resume: Optional[str] = None  # a last.pt or a run folder
    accum_steps: int = 1
    amp: str = "none"
    checkpoint_every: int = 0
    device: str = "auto"
    progress: bool = False
    tensorboard: bool = False


def _resolve(cfg: Any, preset: Any) -> Dict[str, Any]:
    """The config as a plain dict, None fields filled from the preset (stored in checkpoints)."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(preset):
        if out.get(f.name) is None:
            out[f.name] = getattr(preset, f.name)
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    return out


# --- shared pieces ------------------------------------------------------------------------------
def save_checkpoint(state: Dict[str, Any], path: PathLike) -> Path:
    """Atomic ``torch.save`` (temp file, fsync, rename): a crash never leaves a half-written checkpoint."""
    from ..models.checkpoints import atomic_torch_save

    return atomic_torch_save(state, path)


def _read_checkpoint(path: PathLike) -> Dict[str, Any]:
    from ..models.checkpoints import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: tensors and plain containers only, no pickled code is run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint safely (corrupt, or holds pickled objects): {e}") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a cpubone detect/segment checkpoint (needs 'model' and 'config')")
    if isinstance(state["config"], str):  # the training engine stores the config as JSON
        state["config"] = json.loads(state["config"])
    return state


def _loader(ds, batch_size: int, shuffle: bool, workers: int, seed: int, drop_last: bool = False):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       collate_fn=collate_skip, generator=g, drop_last=drop_last,
                                       persistent_workers=False)


# --- detection ----------------------------------------------------------------------------------
def coco_split(root: PathLike, split: str) -> Tuple[Path, Path]:
    """(image folder, instances JSON) of a COCO-layout split: ``root/images/<split>`` (or ``root/<split>``, as
    COCO ships ``train2017/``) and ``root/annotations/instances_<split>.json``."""
    root = Path(root)
    ann = root / "annotations" / f"instances_{split}.json"
    images = root / "images" / split
    if not images.is_dir():
        images = root / split
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann} (COCO layout: annotations/instances_<split>.json)")
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {root / 'images' / split} or {root / split}")
    return images, ann


def train_detection(cfg: DetectionTrainConfig, log: Optional[Log] = None) -> Dict[str, Any]:
    """Train RetinaNet on the training engine; returns the final validation metrics (COCO AP...), the
    training's skipped-image count and where the final weights are.

    Writes ``<output>/last.pt`` (resumable training state) after every epoch (and every ``checkpoint_every``
    iterations), ``history.csv`` / ``metrics.jsonl`` (one row per epoch) and ``model.pt`` (weights + config)
    at the end. Runs under torchrun as classification does.
    """
    from .tasks import DetectionTask

    if cfg.preset not in DETECTION_PRESETS:
        raise ValueError(f"unknown detection preset {cfg.preset!r}; choose from {sorted(DETECTION_PRESETS)}")
    return _train(DetectionTask(_resolve(cfg, DETECTION_PRESETS[cfg.preset])), log)


def _train(task, log: Optional[Log]) -> Dict[str, Any]:
    from ..train.engine import load_training_state, resolve_checkpoint, run

    c = task.c
    resume, resume_path = None, ""
    if c["resume"]:
        resume_path = str(resolve_checkpoint(c["resume"]))
        resume = load_training_state(resume_path)
        if resume.get("task") != task.task_key:
            raise ValueError(f"{resume_path}: a {resume.get('task', 'classify')} checkpoint, not a {task.task_key} one")
    res = run(task, c["output"], resume, resume_path, c["device"], c["seed"], log=log)
    out = Path(c["output"])
    # the training's own count last: the evaluation reports its skipped images as val_skipped_images
    return {"checkpoint": str(out / "model.pt"), **task.last_metrics, "skipped_images": res["skipped_images"],
            "global_steps": res["global_steps"], "main": res["main"]}


@torch.no_grad()
def evaluate_detection(model: nn.Module, dataset: CocoDetection, batch_size: int = 4,
                       workers: int = 0) -> Dict[str, Any]:
    """COCO box metrics of ``model`` on ``dataset`` (AP, AP50, AP75, APs, APm, APl) plus the skipped-image count.

    Unreadable images are left out of the evaluation (and counted), not scored as misses.
    """
    was_training = model.training
    model.eval()
    results: List[Dict[str, Any]] = []
    seen: List[int] = []
    skipped = 0
    for images, targets, n_skip in _loader(dataset, batch_size, False, workers, 0):
        skipped += n_skip
        if not images:
            continue
        for det, t in zip(model(images), targets):
            img_id = int(t["image_id"])
            seen.append(img_id)
            results += detections_to_coco(img_id, det["boxes"], det["scores"], det["labels"], dataset.cat_ids)
    model.train(was_training)
    if not seen:
        raise AnnotationError(f"{dataset.ann_file}: no readable images to evaluate ({skipped} skipped)")
    return {**coco_detection_metrics(dataset.coco, results, image_ids=seen), "images": len(seen),
            "skipped_images": skipped}


# --- segmentation -------------------------------------------------------------------------------
def train_segmentation(cfg: SegmentationTrainConfig, log: Optional[Log] = None) -> Dict[str, Any]:
    """Train Semantic FPN on the training engine; returns the final validation metrics (mIoU, aAcc, mAcc,
    per-class IoU), the training's skipped-image count and where the final weights are.

    Writes ``<output>/last.pt`` (resumable) every ``eval_every`` iterations (and every ``checkpoint_every``),
    ``history.csv`` / ``metrics.jsonl`` and, at the end, ``model.pt`` (weights + config).
    """
    from .tasks import SegmentationTask

    if cfg.preset not in SEGMENTATION_PRESETS:
        raise ValueError(f"unknown segmentation preset {cfg.preset!r}; choose from {sorted(SEGMENTATION_PRESETS)}")
    return _train(SegmentationTask(_resolve(cfg, SEGMENTATION_PRESETS[cfg.preset])), log)


def _resize_short(x: torch.Tensor, base_size: Optional[int]) -> torch.Tensor:
    if not base_size:
        return x
    h, w = x.shape[-2:]
    s = base_size / min(h, w)
    if s == 1:
        return x
    return F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                         align_corners=False, antialias=s < 1)


@torch.no_grad()
def segment_image(model: nn.Module, image: torch.Tensor, base_size: Optional[int] = None) -> torch.Tensor:
    """Label map (H, W) of one float image (3, H, W) in [0, 1]: run at shorter side ``base_size``, logits
    resized back to the image's own size (mmseg's 'whole' inference)."""
    logits = model(_resize_short(image[None], base_size))
    logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits[0].argmax(0)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: SegmentationFolder,
                          base_size: Optional[int] = None) -> Dict[str, Any]:
    """mIoU, aAcc, mAcc and per-class IoU of ``model`` on ``dataset`` against the original-size masks."""
    if dataset.transforms is not None:
        raise ValueError("evaluate_segmentation needs a dataset without transforms (it compares at the original size)")
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    skipped = 0
    for i in range(len(dataset)):
        item = dataset[i]
        if item is None:
            skipped += 1
            continue
        image, mask = item
        cm.update(segment_image(model, image.float() / 255, base_size), mask)
    model.train(was_training)
    return {**cm.compute(), "images": len(dataset) - skipped, "skipped_images": skipped}


# --- loading and prediction ---------------------------------------------------------------------
def load_downstream_model(path: PathLike) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a trained detector or segmenter from a ``cpubone detect/segment train`` checkpoint (eval mode)."""
    from ..models.checkpoints import CheckpointError

    state = _read_checkpoint(path)
    c = state["config"]
    if c.get("task") == "detect":
        model = create_retinanet(c["backbone"], c["num_classes"], fpn_channels=c["fpn_channels"],
                                 head_norm=c.get("head_norm", False), min_size=c["min_size"], max_size=c["max_size"])
    elif c.get("task") == "segment":
        model = create_semantic_fpn(c["backbone"], c["num_classes"], fpn_channels=c["fpn_channels"],
                                    channels=c["head_channels"])
    else:
        raise CheckpointError(f"{path}: config has no task 'detect' or 'segment'")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {c['backbone']} ({e})") from e
    return model.eval(), c


def _read_image(path: PathLike) -> torch.Tensor:
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB")).copy()
    except OSError as e:
        raise ValueError(f"{path}: cannot decode the image: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1)


def _save_png(img: torch.Tensor, path: PathLike) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, format="PNG")
    return path


def _palette(n: int) -> List[Tuple[int, int, int]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [tuple(int(255 * v) for v in cmap(i % 20)[:3]) for i in range(n)]


@torch.no_grad()
def predict_detection(checkpoint: PathLike, image: PathLike, output: PathLike,
                      score_thresh: float = 0.3) -> List[Dict[str, Any]]:
    """Detect objects in ``image`` and write a PNG with the boxes drawn; returns the kept detections."""
    from torchvision.utils import draw_bounding_boxes

    model, c = load_downstream_model(checkpoint)
    if c["task"] != "detect":
        raise ValueError(f"{checkpoint}: a {c['task']} checkpoint, not a detection one")
    img = _read_image(image)
    model.score_thresh = min(model.score_thresh, score_thresh)  # RetinaNet's own candidate threshold (0.05)
    det = model([img.float() / 255])[0]
    keep = det["scores"] >= score_thresh
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    names = [f"{c['classes'][int(l)]} {float(s):.2f}" for l, s in zip(labels, scores)]
    colours = _palette(c["num_classes"])
    drawn = draw_bounding_boxes(img, boxes, labels=names, colors=[colours[int(l)] for l in labels], width=2)
    _save_png(drawn, output)
    return [{"label": c["classes"][int(l)], "score": round(float(s), 4), "box_xyxy": [round(v, 1) for v in b.tolist()]}
            for b, s, l in zip(boxes, scores, labels)]


@torch.no_grad()
def predict_segmentation(checkpoint: PathLike, image: PathLike, output: PathLike,
                         alpha: float = 0.5) -> Dict[str, float]:
    """Segment ``image`` and write a PNG with the coloured class mask over it; returns each class's pixel share."""
    from torchvision.utils import draw_segmentation_masks

    model, c = load_downstream_model(checkpoint)
    if c["task"] != "segment":
        raise ValueError(f"{checkpoint}: a {c['task']} checkpoint, not a segmentation one")
    img = _read_image(image)
    pred = segment_image(model, img.float() / 255, c.get("base_size"))
    masks = torch.stack([pred == k for k in range(c["num_classes"])])
    drawn = draw_segmentation_masks(img, masks, alpha=alpha, colors=_palette(c["num_classes"]))
    _save_png(drawn, output)
    total = pred.numel()
    return {c["classes"][k]: round(float(masks[k].sum()) / total, 4) for k in range(c["num_classes"]) if masks[k].any()}
