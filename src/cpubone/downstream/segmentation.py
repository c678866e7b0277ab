"""Semantic FPN (the Panoptic-FPN semantic head) on a CPUBone (or any timm) backbone.

Backbone C2-C5 (strides 4-32) -> FPN P2-P5 -> per level, ``log2(stride/4)`` stages of conv3x3 + GroupNorm +
ReLU + 2x bilinear upsampling (one conv stage without upsampling for P2) -> sum at 1/4 -> 1x1 classifier ->
bilinear upsampling to the input size. Normalisation is part of the model, so it takes RGB in [0, 1] and the
exported ONNX file is end to end.
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import BackboneWithFPN, backbone_mean_std, create_feature_backbone
from .presets import SEGMENTATION_PRESETS, SegmentationPreset

__all__ = ["SemanticFPNHead", "SemanticFPN", "create_semantic_fpn", "SegmentationPreset", "SEGMENTATION_PRESETS"]


def _conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(32 if cout % 32 == 0 else 1, cout),
                         nn.ReLU(inplace=True))


class _ScaleBranch(nn.Module):
    """From one FPN level to stride 4: ``num_up`` x (conv-GN-ReLU, 2x upsample), or one conv for P2."""

    def __init__(self, cin: int, channels: int, num_up: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([_conv_gn_relu(cin if i == 0 else channels, channels) for i in range(max(1, num_up))])
        self.num_up = num_up

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.num_up:
                # the last stage lands exactly on P2's size (inputs not divisible by 32 give odd map sizes)
                x = F.interpolate(x, size=size if i == self.num_up - 1 else None,
                                  scale_factor=None if i == self.num_up - 1 else 2.0, mode="bilinear",
                                  align_corners=False)
        return x


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch.

    Args:
        in_channels: FPN width.
        strides: strides of the FPN levels, finest first (4, 8, 16, 32).
        channels: branch width (128 in Panoptic FPN / mmseg's FPNHead).
        num_classes: segmentation classes (150 for ADE20K).
        dropout: dropout before the classifier (0.1 in mmseg).
    """

    def __init__(self, in_channels: int, strides: Sequence[int], num_classes: int, channels: int = 128,
                 dropout: float = 0.1) -> None:
        super().__init__()
        base = strides[0]
        self.branches = nn.ModuleList([_ScaleBranch(in_channels, channels, (s // base).bit_length() - 1)
                                       for s in strides])
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        size = tuple(feats[0].shape[-2:])
        out = self.branches[0](feats[0], size)
        for branch, f in zip(self.branches[1:], feats[1:]):
            out = out + branch(f, size)
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Image in [0, 1] (N, 3, H, W) -> class logits (N, num_classes, H, W)."""

    def __init__(self, backbone: BackboneWithFPN, num_classes: int, channels: int = 128, dropout: float = 0.1,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = SemanticFPNHead(backbone.out_channels, backbone.strides, num_classes, channels, dropout)
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = list(self.backbone((x - self.mean) / self.std).values())
        logits = self.head(feats)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def create_semantic_fpn(backbone: str, num_classes: int, pretrained_backbone: Union[bool, str, os.PathLike] = False,
                        fpn_channels: int = 256, channels: int = 128, dropout: float = 0.1) -> SemanticFPN:
    """Semantic FPN on ``backbone``'s stride 4/8/16/32 maps (any CPUBone variant or timm ``features_only`` model).

    Args:
        num_classes: segmentation classes (150 for ADE20K).
        pretrained_backbone: ImageNet weights for the backbone (True or a checkpoint path).
        fpn_channels / channels: FPN width (256) and semantic-branch width (128), as in the paper's setup.
    """
    body = create_feature_backbone(backbone, strides=(4, 8, 16, 32), pretrained=pretrained_backbone)
    mean, std = backbone_mean_std(body)
    model = SemanticFPN(BackboneWithFPN(body, fpn_channels, level_names=("p2", "p3", "p4", "p5")), num_classes,
                        channels, dropout, mean, std)
    model.backbone_name = backbone
    return model
