"""Downstream tasks on CPUBone: RetinaNet detection and Semantic FPN segmentation, their data, metrics and training."""
from .backbone import BackboneWithFPN, backbone_mean_std, create_feature_backbone
from .datasets import AnnotationError, CocoDetection, SegmentationFolder, write_synthetic_ade, write_synthetic_coco
from .detection import DETECTION_PRESETS, RetinaNetRaw, create_retinanet
from .metrics import ConfusionMatrix, coco_detection_metrics
from .segmentation import SEGMENTATION_PRESETS, SemanticFPN, create_semantic_fpn

__all__ = [
    "BackboneWithFPN", "create_feature_backbone", "backbone_mean_std", "AnnotationError", "CocoDetection",
    "SegmentationFolder", "write_synthetic_coco", "write_synthetic_ade", "DETECTION_PRESETS", "RetinaNetRaw",
    "create_retinanet", "ConfusionMatrix", "coco_detection_metrics", "SEGMENTATION_PRESETS", "SemanticFPN",
    "create_semantic_fpn",
]
