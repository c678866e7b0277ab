"""Training, evaluation and prediction for RetinaNet detection and Semantic FPN segmentation.

Training runs on the one training loop (``cpubone.train.loop``, tasks in ``tasks.py``): torchrun DDP,
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

from ..images import decode_image
from ..models.checkpoints import CheckpointError, atomic_torch_save
from ..train.loop import load_training_state, resolve_checkpoint, run
from .detection import DETECTION_PRESETS, create_retinanet
from .evaluate import (
    coco_split,
    evaluate_detection,
    evaluate_segmentation,
    segment_image,
)
from .segmentation import SEGMENTATION_PRESETS, create_semantic_fpn
from .tasks import DetectionTask, SegmentationTask
from .visualize import draw_detections, draw_segmentation, save_png

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
    return atomic_torch_save(state, path)


_TASK_NAMES = {"detect": "detection", "segment": "segmentation"}


def _describe_foreign(state: Any) -> str:
    """What a checkpoint that is not a detect/segment one holds, in words for an error message."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a checkpoint dictionary"
    cfg = state.get("config")  # cpubone train's config, parsed from its JSON text by _read_checkpoint
    cfg = cfg if isinstance(cfg, dict) else {}
    name = state.get("model_name") or cfg.get("model")
    if name:
        n = state.get("num_classes") or cfg.get("num_classes")
        return f"is an image-classification checkpoint ({name}{f', {n} classes' if n else ''}; from cpubone train)"
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"holds bare weights (a state dict of {len(state)} tensors) without the model's config"
    return f"is not a cpubone detect/segment checkpoint (keys: {', '.join(map(str, list(state)[:6]))})"


def _read_checkpoint(path: PathLike) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save writes a zip (old versions: a pickle)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file (corrupt, or another format)")
    try:
        # weights_only: tensors and plain containers only, no pickled code is run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in why:
            why = "it holds pickled Python objects, which are not loaded for safety"
        raise CheckpointError(f"{path}: cannot read the checkpoint ({why})") from e
    if isinstance(state, dict) and isinstance(state.get("config"), str):  # a config stored as JSON text
        try:
            state["config"] = json.loads(state["config"])
        except json.JSONDecodeError:
            state["config"] = None  # not JSON, so not ours: described below
    if not (isinstance(state, dict) and "model" in state and isinstance(state.get("config"), dict)
            and state["config"].get("task") in _TASK_NAMES):
        raise CheckpointError(f"{path}: {_describe_foreign(state)}")
    return state


# --- detection ----------------------------------------------------------------------------------
def train_detection(cfg: DetectionTrainConfig, log: Optional[Log] = None) -> Dict[str, Any]:
    """Train RetinaNet on the training loop; returns the final validation metrics (COCO AP...), the
    training's skipped-image count and where the final weights are.

    Writes ``<output>/last.pt`` (resumable training state) after every epoch (and every ``checkpoint_every``
    iterations), ``history.csv`` / ``metrics.jsonl`` (one row per epoch) and ``model.pt`` (weights + config)
    at the end. Runs under torchrun as classification does.
    """
    if cfg.preset not in DETECTION_PRESETS:
        raise ValueError(f"unknown detection preset {cfg.preset!r}; choose from {sorted(DETECTION_PRESETS)}")
    return _train(DetectionTask(_resolve(cfg, DETECTION_PRESETS[cfg.preset])), log)


def _train(task, log: Optional[Log]) -> Dict[str, Any]:
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


# --- segmentation -------------------------------------------------------------------------------
def train_segmentation(cfg: SegmentationTrainConfig, log: Optional[Log] = None) -> Dict[str, Any]:
    """Train Semantic FPN on the training loop; returns the final validation metrics (mIoU, aAcc, mAcc,
    per-class IoU), the training's skipped-image count and where the final weights are.

    Writes ``<output>/last.pt`` (resumable) every ``eval_every`` iterations (and every ``checkpoint_every``),
    ``history.csv`` / ``metrics.jsonl`` and, at the end, ``model.pt`` (weights + config).
    """
    if cfg.preset not in SEGMENTATION_PRESETS:
        raise ValueError(f"unknown segmentation preset {cfg.preset!r}; choose from {sorted(SEGMENTATION_PRESETS)}")
    return _train(SegmentationTask(_resolve(cfg, SEGMENTATION_PRESETS[cfg.preset])), log)


# --- loading and prediction ---------------------------------------------------------------------
def _checkpoint_file(path: Path) -> Path:
    """A run folder stands for its ``model.pt`` (else ``last.pt``); other folders are named for what they are."""
    if not path.is_dir():
        return path
    for name in ("model.pt", "last.pt"):
        if (path / name).is_file():
            return path / name
    if (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: a saved image classifier (model.safetensors), not a detect/segment "
                              f"checkpoint")
    raise CheckpointError(f"{path}: a folder without model.pt or last.pt")


def load_downstream_model(path: PathLike, task: Optional[str] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a trained detector or segmenter from a ``cpubone detect/segment train`` checkpoint (eval mode).

    Args:
        path: ``model.pt`` or ``last.pt``, or the run folder holding them.
        task: "detect" or "segment" to insist on one; anything else (a classifier's checkpoint, the other
            task's) raises ``CheckpointError`` saying what the file is and what was expected.
    """
    if task not in (None, *_TASK_NAMES):
        raise ValueError(f"task={task!r}: expected 'detect' or 'segment'")
    wanted = (f"; expected a {_TASK_NAMES[task]} checkpoint (model.pt or last.pt from cpubone {task} train)"
              if task else "; expected model.pt or last.pt from cpubone detect/segment train")
    try:
        path = _checkpoint_file(Path(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e}{wanted}") from e
    if path.is_file() and path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: a safetensors weights file (a saved classifier), not a detect/segment "
                              f"checkpoint{wanted}")
    try:
        state = _read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{wanted}") from e
    c = state["config"]
    kind = c["task"]
    if task and kind != task:
        raise CheckpointError(f"{path}: a {_TASK_NAMES[kind]} checkpoint ({c['backbone']}), not a "
                              f"{_TASK_NAMES[task]} one{wanted}")
    if kind == "detect":
        model = create_retinanet(c["backbone"], c["num_classes"], fpn_channels=c["fpn_channels"],
                                 head_norm=c.get("head_norm", False), min_size=c["min_size"], max_size=c["max_size"])
    else:
        model = create_semantic_fpn(c["backbone"], c["num_classes"], fpn_channels=c["fpn_channels"],
                                    channels=c["head_channels"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:300]  # line 0 only says "Error(s) in loading"
        raise CheckpointError(f"{path}: weights do not fit {c['backbone']} ({why})") from e
    return model.eval(), c


def _read_image(path: PathLike) -> torch.Tensor:
    """(3, H, W) uint8 from the shared decoder, as the datasets read their images."""
    return torch.from_numpy(np.asarray(decode_image(path)).copy()).permute(2, 0, 1)


@torch.no_grad()
def predict_detection(checkpoint: PathLike, image: PathLike, output: PathLike,
                      score_thresh: float = 0.3) -> List[Dict[str, Any]]:
    """Detect objects in ``image`` and write a PNG with the boxes and labelled tags drawn
    (``visualize.draw_detections``); returns the kept detections, boxes in the image's pixels."""
    model, c = load_downstream_model(checkpoint, task="detect")
    img = _read_image(image)
    model.score_thresh = min(model.score_thresh, score_thresh)  # RetinaNet's own candidate threshold (0.05)
    det = model([img.float() / 255])[0]
    keep = det["scores"] >= score_thresh
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    save_png(draw_detections(img.numpy(), boxes.tolist(), labels.tolist(), c["classes"], scores.tolist()), output)
    return [{"label": c["classes"][int(l)], "score": round(float(s), 4), "box_xyxy": [round(v, 1) for v in b.tolist()]}
            for b, s, l in zip(boxes, scores, labels)]


@torch.no_grad()
def predict_segmentation(checkpoint: PathLike, image: PathLike, output: PathLike,
                         alpha: float = 0.5) -> Dict[str, float]:
    """Segment ``image`` and write a PNG with the classes tinted and outlined and a legend
    (``visualize.draw_segmentation``); returns each class's pixel share, largest first."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: the mask opacity must be in [0, 1]")
    model, c = load_downstream_model(checkpoint, task="segment")
    img = _read_image(image)
    pred = segment_image(model, img.float() / 255, c.get("base_size")).numpy()
    save_png(draw_segmentation(img.numpy(), pred, c["classes"], alpha=alpha), output)
    ids, counts = np.unique(pred, return_counts=True)
    return {c["classes"][int(k)]: round(float(n) / pred.size, 4)
            for k, n in sorted(zip(ids, counts), key=lambda t: -t[1])}
