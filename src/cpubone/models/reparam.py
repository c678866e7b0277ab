"""The inference form of CPUBone: the same function as the training form, fewer and cheaper ops.

``reparameterize(model)`` returns a trained ``CPUBone`` (eval semantics) rewritten into modules that
compute the same outputs (within float32 rounding) for any input size. The rewrites live with the
blocks they rewrite (``fuse()`` of ``ConvNormAct``, ``Lowtention``, ``CPUBoneBlock`` and ``CPUBone`` in
``cpubone.models``); this module checks the input, copies it and names the result:

* every BatchNorm is folded into the conv before it (stem, (Fused)MBConv, Lowtention projection, head);
* the affine part of the GroupNorm1 before each MLP is folded into the MLP's first 1x1 conv (exact: a
  1x1 conv is linear per position). The GroupNorm1 before Lowtention keeps its affine: the attention's
  depthwise projection zero-pads at odd sizes and in stage 4, where a folded shift would be wrong;
* the attention's 1/sqrt(d) scale is folded into the query rows of the qkv conv, and attention runs in
  the channels-first layout the convs produce (``q^T k`` and ``v a^T``), so no transposes are left for
  ONNX Runtime to copy (it fuses them into its MatMul kernels);
* the 2x2 stride-1 "same" convs lose their explicit asymmetric ``F.pad`` (see ``ConvAct``);
* grouped convs with fewer than 16 input channels per group become dense block-diagonal convs (more
  MACs, but ONNX Runtime's blocked kernels need whole SIMD blocks per group; see ``densify_groups``);
* dropout and stochastic depth are removed, and crops that cannot change the result are skipped
  (the Lowtention crop at sizes divisible by its stride).

Odd sizes stay exact. In a dynamic-shape ONNX export, whose graph must be valid for every size, the
Lowtention pad and crop are always recorded (``shape_general``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .cpubone import CPUBone, _fuse_children
from .layers import (
    PAD_MODES,
    ConvAct,
    ConvNormAct,
    Lowtention,
    LowtentionInference,
    densify_groups,
    shape_general,
)

__all__ = ["reparameterize", "reparameterize_blocks", "ConvAct", "LowtentionInference", "shape_general", "is_reparameterized",
           "densify_groups", "PAD_MODES"]


def is_reparameterized(model: nn.Module) -> bool:
    """True when ``model`` holds no BatchNorm, dropout or training-form Lowtention any more."""
    return not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout, Lowtention, ConvNormAct)) for m in model.modules())


@torch.no_grad()
def reparameterize(model: nn.Module, inplace: bool = False, pad_mode: str = "pad",
                   densify_below: int = 16) -> nn.Module:
    """The inference form of a ``CPUBone`` (eval mode; see the module docstring for what changes).

    Args:
        model: a ``CPUBone`` in training form (BatchNorm statistics are used as in eval mode).
        inplace: rewrite ``model`` itself instead of a copy.
        pad_mode: how 2x2 stride-1 "same" convs pad, one of ``PAD_MODES`` ("pad" exports best to ONNX
            Runtime, which folds the pad into the conv; "crop" avoids the input copy in eager PyTorch).
        densify_below: grouped (not depthwise) convs with fewer input channels per group than this become
            dense convs with block-diagonal weights (more MACs, faster kernels; 0 keeps every group).

    Returns the model in eval mode. A timm ``cpubone_*`` model must first be converted to ours
    (``create_model(variant)`` + ``load_checkpoint(ours, timm_model.state_dict())``).
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
    if not isinstance(model, CPUBone):
        raise TypeError(
            f"reparameterize expects a cpubone CPUBone, got {type(model).__module__}.{type(model).__name__}; "
            "convert timm's cpubone models with create_model(variant) + load_checkpoint(model, timm_state_dict)"
        )
    if is_reparameterized(model):
        return model.eval()
    if not inplace:
        model = copy.deepcopy(model)
    return model.fuse(pad_mode=pad_mode, densify_below=densify_below)


@torch.no_grad()
def reparameterize_blocks(module: nn.Module, pad_mode: str = "pad", densify_below: int = 16) -> nn.Module:
    """The inference form of a part of a CPUBone (a block, a stage, a head), rewritten in place.

    The same rewrites ``CPUBone.fuse`` applies to a whole model; ``cpubone.design`` times the parts of
    the design space one by one in the form the whole model is deployed in.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
    holder = nn.Sequential(module).eval()  # the rewrite replaces children, so the part itself needs a parent
    _fuse_children(holder, pad_mode, densify_below)
    return holder[0].eval()
