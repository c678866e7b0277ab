"""Downstream tasks on CPUBone: RetinaNet detection and Semantic FPN segmentation, their data, metrics and training.

Names resolve on first use (PEP 562): the command line reads the presets without importing torch.
"""
from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "BackboneWithFPN": ".backbone", "create_feature_backbone": ".backbone", "backbone_mean_std": ".backbone",
    "AnnotationError": ".datasets", "CocoDetection": ".datasets", "SegmentationFolder": ".datasets",
    "write_synthetic_coco": ".datasets", "write_synthetic_ade": ".datasets",
    "RetinaNetRaw": ".detection", "create_retinanet": ".detection",
    "ConfusionMatrix": ".metrics", "coco_detection_metrics": ".metrics",
    "SemanticFPN": ".segmentation", "create_semantic_fpn": ".segmentation",
    "DETECTION_PRESETS": ".presets", "SEGMENTATION_PRESETS": ".presets",
    "class_colors": ".visualize", "draw_detections": ".visualize", "draw_segmentation": ".visualize",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
