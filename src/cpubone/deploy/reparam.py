"""The inference form of CPUBone: the same function as the training form, fewer and cheaper ops.

``reparameterize(model)`` rewrites a trained ``CPUBone`` (eval semantics) into modules that compute the
same outputs (within float32 rounding) for any input size:

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
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..models.cpubone import CPUBone, CPUBoneBlock
from ..models.layers import ConvNormAct, Lowtention

__all__ = ["reparameterize", "reparameterize_blocks", "ConvAct", "LowtentionInference", "shape_general", "is_reparameterized",
           "densify_groups", "PAD_MODES"]

# How a 2x2 stride-1 conv gets its (1, 0, 1, 0) "same" pad in the inference form:
#   "crop": symmetric conv padding of 1, then drop the last row and column (one extra output row/col);
#   "pad":  an explicit zero pad before the conv (a copy of the input in eager; ONNX Runtime fuses
#           Pad into Conv's own asymmetric pads, so in ONNX it costs nothing).
PAD_MODES = ("crop", "pad")

_SHAPE_GENERAL = False


@contextmanager
def shape_general(enabled: bool = True) -> Iterator[None]:
    """Record size-dependent pads and crops even where the traced size does not need them.

    Used around a dynamic-shape ONNX export: tracing bakes Python branches on the traced size into the
    graph, so the odd-size branches must be taken (with pad amounts that evaluate to 0 at even sizes).
    """
    global _SHAPE_GENERAL
    old = _SHAPE_GENERAL
    _SHAPE_GENERAL = enabled
    try:
        yield
    finally:
        _SHAPE_GENERAL = old


class ConvAct(nn.Module):
    """Conv2d (norm folded in, with bias) -> activation; the inference form of ``ConvNormAct``.

    Args:
        conv: the fused conv (its ``padding`` is replaced for an asymmetric pad).
        act: activation module (``nn.Identity`` for none).
        pad: the training form's explicit (left, right, top, bottom) zero pad, or None.
        pad_mode: how ``pad`` is realised, one of ``PAD_MODES``.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module, pad: Optional[Tuple[int, int, int, int]] = None,
                 pad_mode: str = "pad") -> None:
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
        self.pad: Optional[Tuple[int, int, int, int]] = None
        self.crop = False
        if pad is not None:
            if pad_mode == "crop" and pad == (1, 0, 1, 0) and conv.padding == (0, 0):
                # conv with padding 1 computes output rows -1..H-1 of the left/top-padded conv shifted by
                # one: rows 0..H-1 are exactly the "same" output, row H is the extra one we drop.
                conv.padding = (1, 1)
                self.crop = True
            else:
                self.pad = tuple(pad)
        self.conv = conv
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad, value=0.0)  # an explicit 0 lets ONNX Runtime fuse Pad into Conv
        x = self.conv(x)
        if self.crop:
            x = x[:, :, :-1, :-1]
        return self.act(x)

    def extra_repr(self) -> str:
        return "crop=True" if self.crop else (f"pad={self.pad}" if self.pad else "")


def densify_groups(conv: nn.Conv2d) -> nn.Conv2d:
    """The grouped conv as an ungrouped one with block-diagonal weights (same output, exactly)."""
    g = conv.groups
    out_g, in_g = conv.out_channels // g, conv.in_channels // g
    dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        dense.weight.zero_()
        for i in range(g):
            dense.weight[i * out_g:(i + 1) * out_g, i * in_g:(i + 1) * in_g] = conv.weight[i * out_g:(i + 1) * out_g]
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    return dense


def _fold_conv_norm_act(m: ConvNormAct, pad_mode: str, densify_below: int = 0) -> ConvAct:
    conv = copy.deepcopy(m.conv)
    if isinstance(m.norm, nn.BatchNorm2d):
        conv = fuse_conv_bn_eval(conv.eval(), m.norm.eval())
    elif not isinstance(m.norm, nn.Identity):
        raise TypeError(f"cannot fold {type(m.norm).__name__} into a conv (only BatchNorm2d)")
    if 1 < conv.groups < conv.in_channels and conv.in_channels // conv.groups < densify_below:
        # ONNX Runtime's blocked (NCHWc) conv kernels need whole SIMD blocks of channels per group; a
        # grouped conv with fewer (B0's first downsample: 8 per group) falls back to a slow im2col path
        # (~30 vs ~90 GMAC/s on AVX-512), so doing twice the MACs densely is faster.
        conv = densify_groups(conv)
    return ConvAct(conv, m.act, m.pad, pad_mode)


class LowtentionInference(nn.Module):
    """Lowtention with the query scale folded into ``qkv`` and attention in channels-first layout.

    For each head, with q, k, v as (d, N) slices of the qkv conv's output: o = v softmax(q^T k)^T, which
    equals softmax(q k^T / sqrt(d)) v of the training form transposed, without materialising the
    (N, d) transposes.
    """

    def __init__(self, attn: Lowtention, pad_mode: str = "pad") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.stride = attn.num_heads, attn.head_dim, attn.stride
        self.proj = _fold_conv_norm_act(attn.proj, pad_mode)
        qkv = copy.deepcopy(attn.qkv)
        with torch.no_grad():
            w = qkv.weight.view(self.num_heads, 3, self.head_dim, *qkv.weight.shape[1:])
            w[:, 0] *= self.head_dim ** -0.5
        self.qkv = qkv
        self.out = copy.deepcopy(attn.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        s = self.stride
        general = _SHAPE_GENERAL and torch.jit.is_tracing()
        if s > 1 and (general or H % s or W % s):
            x = F.pad(x, (0, (s - W % s) % s, 0, (s - H % s) % s))
        x = self.qkv(self.proj(x))
        B, _, h, w = x.shape
        d = self.head_dim
        qkv = x.reshape(B, self.num_heads, 3 * d, h * w)
        q, k, v = qkv[:, :, :d], qkv[:, :, d:2 * d], qkv[:, :, 2 * d:]
        a = torch.matmul(q.transpose(-1, -2), k).softmax(dim=-1)
        o = torch.matmul(v, a.transpose(-1, -2)).reshape(B, self.num_heads * d, h, w)
        o = self.out(o)
        if s > 1:
            o = F.interpolate(o, scale_factor=float(s), mode="nearest")
            if general or o.shape[-2] != H or o.shape[-1] != W:
                o = o[:, :, :H, :W]
        return o


def _fold_groupnorm_affine_into_conv(norm: nn.GroupNorm, conv: nn.Conv2d) -> nn.GroupNorm:
    """conv(gamma * n + beta) = (conv * gamma)(n) + conv(beta) for a 1x1 conv; returns the bare norm."""
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ValueError("the GroupNorm affine folds only into an ungrouped 1x1 conv")
    with torch.no_grad():
        w = conv.weight  # (out, in, 1, 1)
        bias = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        new_bias = bias + (w[:, :, 0, 0] * norm.bias[None, :]).sum(1)
        conv.weight.mul_(norm.weight[None, :, None, None])
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)
    return nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)


def is_reparameterized(model: nn.Module) -> bool:
    """True when ``model`` holds no BatchNorm, dropout or training-form Lowtention any more."""
    return not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout, Lowtention, ConvNormAct)) for m in model.modules())


def _replace(module: nn.Module, pad_mode: str, densify_below: int) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, Lowtention):
            new: nn.Module = LowtentionInference(child, pad_mode)
        elif isinstance(child, ConvNormAct):
            new = _fold_conv_norm_act(child, pad_mode, densify_below)
        elif isinstance(child, nn.Dropout) or type(child).__name__ == "DropPath":
            new = nn.Identity()
        else:
            if isinstance(child, CPUBoneBlock):
                child.norm2 = _fold_groupnorm_affine_into_conv(child.norm2, child.mlp.fc1)
            _replace(child, pad_mode, densify_below)
            continue
        setattr(module, name, new)


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
    model.eval()
    _replace(model, pad_mode, densify_below)
    model.drop_rate = 0.0
    model.pretrained_cfg = dict(model.pretrained_cfg, reparameterized=True)
    return model.eval()


@torch.no_grad()
def reparameterize_blocks(module: nn.Module, pad_mode: str = "pad", densify_below: int = 16) -> nn.Module:
    """The inference form of a part of a CPUBone (a block, a stage, a head), rewritten in place.

    The same rewrites as ``reparameterize`` applies to a whole model; ``cpubone.design`` times the parts
    of the design space one by one in the form the whole model is deployed in.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
    holder = nn.Sequential(module).eval()  # _replace rewrites children, so the part itself needs a parent
    _replace(holder, pad_mode, densify_below)
    return holder[0].eval()
