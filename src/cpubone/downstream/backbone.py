"""A multi-scale backbone (CPUBone or any timm model with ``features_only``) followed by an FPN.

Detection and segmentation heads only see ``BackboneWithFPN``: an ordered dict of pyramid levels with
``out_channels`` channels each, so CPUBone and its peers are compared with the very same head.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.ops import FeaturePyramidNetwork

from ..models import create_model

__all__ = ["create_feature_backbone", "BackboneWithFPN", "backbone_mean_std"]


def _reductions(model: nn.Module) -> List[int]:
    return list(model.feature_info.reduction())


def create_feature_backbone(
    name: str,
    strides: Sequence[int] = (8, 16, 32),
    pretrained: Union[bool, str, os.PathLike] = False,
) -> nn.Module:
    """A ``features_only`` backbone returning the feature maps at exactly ``strides``.

    Args:
        name: a CPUBone variant or any timm model name (``cpubone.create_model``).
        strides: output strides of the maps to return, e.g. (8, 16, 32) for RetinaNet's C3-C5 or
            (4, 8, 16, 32) for Semantic FPN. Indices differ between families (MobileNetV3's index 0 is
            stride 2, CPUBone's is stride 4), so levels are chosen by stride, not by index.
        pretrained: as ``cpubone.create_model`` (False, True for hub weights, or a checkpoint path).
    """
    model = create_model(name, pretrained=pretrained, features_only=True)
    red = _reductions(model)
    missing = [s for s in strides if s not in red]
    if missing:
        raise ValueError(f"backbone {name!r} has feature maps at strides {red}; strides {missing} are not available")
    if red != list(strides):
        # rebuild returning only the wanted levels (keeps forward outputs and feature_info in step)
        info_idx = getattr(model.feature_info, "out_indices", None) or tuple(range(len(red)))
        want = tuple(info_idx[red.index(s)] for s in strides)
        model = create_model(name, pretrained=pretrained, features_only=True, out_indices=want)
        if _reductions(model) != list(strides):
            raise ValueError(f"backbone {name!r}: asked for strides {list(strides)}, got {_reductions(model)}")
    return model


def backbone_mean_std(model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation the backbone was (pre)trained with; ImageNet's when the model does not say."""
    for m in (model, getattr(model, "model", None)):
        cfg = getattr(m, "pretrained_cfg", None) or {}
        if cfg.get("mean") and cfg.get("std"):
            return tuple(cfg["mean"]), tuple(cfg["std"])
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


class BackboneWithFPN(nn.Module):
    """Backbone feature maps -> torchvision ``FeaturePyramidNetwork`` (top-down pathway + 3x3 output convs).

    Args:
        backbone: a ``features_only`` model (``create_feature_backbone``).
        out_channels: FPN width (256 in RetinaNet and Semantic FPN).
        extra_blocks: extra levels above the last one, e.g. ``LastLevelP6P7`` for RetinaNet's P6/P7.
        level_names: names of the returned levels, e.g. ("p3", "p4", "p5") for strides 8-32.
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 256, extra_blocks: Optional[nn.Module] = None,
                 level_names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.body = backbone
        self.in_channels_list: List[int] = list(backbone.feature_info.channels())
        self.strides: List[int] = _reductions(backbone)
        self.level_names = list(level_names) if level_names else [f"p{s.bit_length() - 1}" for s in self.strides]
        self.fpn = FeaturePyramidNetwork(self.in_channels_list, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict(zip(self.level_names, feats)))
