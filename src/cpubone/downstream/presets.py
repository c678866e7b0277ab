"""Training presets of the downstream tasks, and the default peer backbones (no torch needed to read them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["DetectionPreset", "DETECTION_PRESETS", "SegmentationPreset", "SEGMENTATION_PRESETS", "DEFAULT_PEERS"]

# backbones `cpubone detect|segment bench` compares with the same head by default
DEFAULT_PEERS = ("cpubone_b0", "mobilenetv3_large_100", "fasternet_t0")


@dataclass(frozen=True)
class DetectionPreset:
    """A training schedule. ``decay_epochs``: epochs after which the lr is multiplied by ``decay_rate``."""

    epochs: int
    batch_size: int
    opt: str
    lr: float
    weight_decay: float
    momentum: float = 0.9
    decay_epochs: Tuple[int, ...] = (8, 11)
    decay_rate: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    grad_clip: Optional[float] = None
    min_size: int = 800
    max_size: int = 1333


DETECTION_PRESETS: Dict[str, DetectionPreset] = {
    # the 1x schedule as backbone papers since PVT run RetinaNet with AdamW (the CPUBone paper names only
    # "12 epochs, 1x"): 12 epochs, batch 16, AdamW lr 1e-4 wd 1e-4, x0.1 after epochs 8 and 11, 500-iter linear warmup,
    # images resized to shorter side 800 (longer <= 1333)
    "1x": DetectionPreset(epochs=12, batch_size=16, opt="adamw", lr=1e-4, weight_decay=1e-4),
    # mmdet's original retinanet_r50_fpn_1x: the same schedule with SGD lr 0.01, momentum 0.9, wd 1e-4, grad clip 35
    "1x-sgd": DetectionPreset(epochs=12, batch_size=16, opt="sgd", lr=0.01, weight_decay=1e-4, grad_clip=35.0),
}


@dataclass(frozen=True)
class SegmentationPreset:
    """A training schedule: ``iters`` updates of ``batch_size`` random ``crop_size`` crops, poly lr decay."""

    iters: int
    batch_size: int
    crop_size: int
    opt: str
    lr: float
    weight_decay: float
    poly_power: float = 0.9
    warmup_iters: int = 0
    base_size: int = 512
    ratio_range: Tuple[float, float] = (0.5, 2.0)


SEGMENTATION_PRESETS: Dict[str, SegmentationPreset] = {
    # the paper's ADE20K setup (as in PoolFormer / EfficientFormer): 40k iterations, batch 32, 512x512 crops,
    # AdamW lr 2e-4 wd 1e-4, poly decay (power 0.9), shorter side rescaled to 512 x [0.5, 2.0]
    "ade20k-40k": SegmentationPreset(iters=40_000, batch_size=32, crop_size=512, opt="adamw", lr=2e-4,
                                     weight_decay=1e-4),
}
