"""RetinaNet on a CPUBone (or any timm) backbone: C3-C5 (strides 8-32) -> FPN P3-P7 -> torchvision's RetinaNet.

The detector is torchvision's ``RetinaNet`` (focal loss, box coder, NMS post-processing); this module only
builds the backbone/FPN it runs on, the 5-level anchor generator, and the training presets.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any, Sequence, Union

import torch
import torch.nn as nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .backbone import BackboneWithFPN, backbone_mean_std, create_feature_backbone
from .presets import DETECTION_PRESETS, DetectionPreset

__all__ = ["create_retinanet", "retinanet_anchor_generator", "RetinaNetRaw", "DetectionPreset", "DETECTION_PRESETS"]

RETINANET_STRIDES = (8, 16, 32, 64, 128)


def retinanet_anchor_generator(strides: Sequence[int] = RETINANET_STRIDES, octave_base_scale: float = 4.0,
                               scales_per_octave: int = 3,
                               aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)):
    """RetinaNet's anchors: per level, sizes ``octave_base_scale * stride * 2**(i/scales_per_octave)`` (32-512 px
    for strides 8-128) at each aspect ratio, 9 anchors per location."""
    sizes = tuple(tuple(octave_base_scale * s * 2 ** (i / scales_per_octave) for i in range(scales_per_octave))
                  for s in strides)
    return AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))


def create_retinanet(
    backbone: str,
    num_classes: int,
    pretrained_backbone: Union[bool, str, os.PathLike] = False,
    fpn_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
    head_norm: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """torchvision ``RetinaNet`` on ``backbone``'s stride 8/16/32 maps with an FPN giving P3-P7.

    Args:
        backbone: CPUBone variant or timm model name; any model with ``features_only`` at strides 8-32.
        num_classes: object classes (no background class: RetinaNet scores each class with a sigmoid).
        pretrained_backbone: ImageNet weights for the backbone (True or a checkpoint path).
        fpn_channels: FPN and head width (256 in the paper's setup).
        min_size / max_size: images are resized so the shorter side is ``min_size`` and the longer at most
            ``max_size`` (COCO: 800 / 1333); set both to the image side to run at native resolution.
        head_norm: GroupNorm in the head's conv towers (torchvision's RetinaNet v2); steadier when the backbone
            starts from random weights. The paper's setup (mmdet RetinaNet) has none.
        kwargs: passed to ``torchvision.models.detection.RetinaNet`` (``nms_thresh``, ``topk_candidates``...).
    """
    body = create_feature_backbone(backbone, strides=(8, 16, 32), pretrained=pretrained_backbone)
    c5 = body.feature_info.channels()[-1]
    # P6 from C5 (mmdet's add_extra_convs='on_input'), P7 from ReLU(P6)
    fpn = BackboneWithFPN(body, fpn_channels, extra_blocks=LastLevelP6P7(c5, fpn_channels),
                          level_names=("p3", "p4", "p5"))
    mean, std = backbone_mean_std(body)
    if head_norm:
        kwargs["head"] = RetinaNetHead(fpn_channels, 9, num_classes, norm_layer=partial(nn.GroupNorm, 32 if fpn_channels % 32 == 0 else 1))
    model = RetinaNet(fpn, num_classes, min_size=min_size, max_size=max_size, image_mean=list(mean),
                      image_std=list(std), anchor_generator=retinanet_anchor_generator(),
                      score_thresh=score_thresh, detections_per_img=detections_per_img, **kwargs)
    model.backbone_name = backbone
    return model


class RetinaNetRaw(nn.Module):
    """The exportable part of a RetinaNet: normalised image -> backbone, FPN, heads -> per-anchor outputs.

    Output (N, A, num_classes + 4): class logits then box deltas for all anchors of P3-P7. Anchor decoding,
    score thresholding and NMS (data-dependent shapes) stay outside; this is what ``bench`` runs in ONNX Runtime.
    """

    def __init__(self, retinanet: nn.Module) -> None:
        super().__init__()
        self.backbone = retinanet.backbone
        self.head = retinanet.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = list(self.backbone(x).values())
        return torch.cat([self.head.classification_head(feats), self.head.regression_head(feats)], dim=-1)
