"""Eager PyTorch on oneDNN's fused conv kernels: the fastest eager form of the inference form.

``to_onednn(reparameterize(model))`` swaps every conv of the inference form for a call of
``torch.ops.mkldnn._convolution_pointwise`` (the oneDNN kernel behind ``torch.compile``'s CPU conv
fusions, called here directly, op by op, in eager mode) with

* the weights reordered once into oneDNN's blocked layout (``_reorder_convolution_weight``): eager
  ``F.conv2d`` reorders them on every call, which costs most on the grouped expansion convs
  (B0's stage-3 downsample: 0.19 vs 0.32 ms), and routes the batch-1 1x1 convs at one thread to
  ``_slow_conv2d_forward`` (MKL GEMMs, activation as a separate pass);
* the activation after the conv applied as a oneDNN post-op (Hardswish, exact GELU of the MLP), so
  B0's 25 separate elementwise passes over the activations (18 Hardswish, 7 GELU) disappear.

The model runs channels_last (the stem converts its input). The arithmetic is the same convolution in
float32 with another summation order: outputs stay within float rounding of the training form.
Fusing the residual adds as binary post-ops was measured too and gained nothing (0.71x vs 0.72x of timm).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from .reparam import ConvAct, is_reparameterized

__all__ = ["OneDNNConv", "to_onednn", "onednn_available"]

# activation module -> oneDNN post-op (attr, algorithm)
_POST_OPS = {nn.Identity: ("none", ""), nn.Hardswish: ("hardswish", ""), nn.ReLU: ("relu", "")}


def onednn_available() -> bool:
    """True when this PyTorch build has oneDNN (MKLDNN) and its fused conv op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _post_op(act: Optional[nn.Module]) -> Optional[Tuple[str, str]]:
    if act is None:
        return "none", ""
    if isinstance(act, nn.GELU):
        return "gelu", act.approximate  # "none" (exact, erf) or "tanh"
    return _POST_OPS.get(type(act))


class OneDNNConv(nn.Module):
    """Conv2d (+ bias) + activation as one oneDNN kernel call on a prepacked weight.

    Args:
        conv: the inference form's conv (norm already folded in).
        act: the activation after it (Hardswish, ReLU, GELU or None), fused as a post-op.
        pad: explicit (left, right, top, bottom) zero pad before the conv (2x2 "same" convs), or None.
        crop: drop the last row and column of the output (``ConvAct``'s "crop" pad mode).
        input_shape: the (N, C, H, W) the weights are laid out for; other sizes still compute the same
            result (oneDNN reorders the weight for them).
        to_channels_last: make the input channels_last first (set on the network's first conv).
    """

    def __init__(self, conv: nn.Conv2d, act: Optional[nn.Module] = None,
                 pad: Optional[Tuple[int, int, int, int]] = None, crop: bool = False,
                 input_shape: Optional[List[int]] = None, to_channels_last: bool = False) -> None:
        super().__init__()
        post = _post_op(act)
        if post is None:
            raise ValueError(f"no oneDNN post-op for {type(act).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("OneDNNConv needs numeric zero padding")
        self.attr, self.algorithm = post
        self.pad, self.crop, self.to_channels_last = pad, crop, to_channels_last
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        # the dense parameters stay registered (state_dict, .to(dtype) checks); the kernel uses the packed copy
        self.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.packed = torch.ops.mkldnn._reorder_convolution_weight(
            self.weight.detach(), self.padding, self.stride, self.dilation, self.groups, input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.to_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.pad is not None:
            x = F.pad(x, self.pad, value=0.0)
        x = torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, self.padding, self.stride,
                                                    self.dilation, self.groups, self.attr, [], self.algorithm)
        return x[:, :, :-1, :-1] if self.crop else x

    def __deepcopy__(self, memo: dict) -> "OneDNNConv":
        # the packed (opaque MKLDNN) tensor cannot be deep-copied; rebuild it from the dense weights
        conv = nn.Conv2d(self.weight.shape[1] * self.groups, self.weight.shape[0], self.weight.shape[2:],
                         self.stride, self.padding, self.dilation, self.groups, self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        new = OneDNNConv(conv, None, self.pad, self.crop, None, self.to_channels_last)
        new.attr, new.algorithm = self.attr, self.algorithm
        memo[id(self)] = new
        return new

    def extra_repr(self) -> str:
        out_chs, in_per_group = self.weight.shape[:2]
        return (f"{in_per_group * self.groups}, {out_chs}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={tuple(self.stride)}, groups={self.groups}, post_op={self.attr}")


def _input_shapes(model: nn.Module, input_size: Tuple[int, int]) -> Dict[nn.Module, List[int]]:
    """The input shape of every conv at ``input_size`` (one traced forward pass)."""
    shapes: Dict[nn.Module, List[int]] = {}

    def record(mod: nn.Module, args: tuple) -> None:
        shapes[mod] = list(args[0].shape)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
            model(torch.zeros(1, first.in_channels, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _convert(module: nn.Module, shapes: Dict[nn.Module, List[int]], first: List[bool]) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, ConvAct):
            conv, act, pad, crop = child.conv, child.act, child.pad, child.crop
        elif isinstance(child, nn.Conv2d):
            conv, act, pad, crop = child, None, None, False
        else:
            if isinstance(child, Mlp) and isinstance(child.fc1, nn.Conv2d) and _post_op(child.act) is not None:
                # timm's Mlp (use_conv): fc1 -> act -> drop1 -> norm -> fc2; fold act into fc1
                child.fc1 = OneDNNConv(child.fc1, child.act, input_shape=shapes.get(child.fc1))
                child.act = nn.Identity()
            _convert(child, shapes, first)
            continue
        if _post_op(act) is None:  # an activation oneDNN cannot fuse: keep it as a separate op
            new: nn.Module = nn.Sequential(OneDNNConv(conv, None, pad, crop, shapes.get(conv), first[0]), act)
        else:
            new = OneDNNConv(conv, act, pad, crop, shapes.get(conv), first[0])
        first[0] = False
        setattr(module, name, new)


@torch.no_grad()
def to_onednn(model: nn.Module, input_size: Tuple[int, int] = (224, 224)) -> nn.Module:
    """Rewrite an inference-form CPUBone (from ``reparameterize``) in place for eager oneDNN execution.

    Args:
        model: a reparameterized ``CPUBone``.
        input_size: the (H, W) the weights are laid out for (any size still works, this one is fastest).

    Returns the model, channels_last, in eval mode. Feed it channels_last inputs for the best speed.
    """
    if not onednn_available():
        raise RuntimeError("to_onednn needs a PyTorch build with oneDNN (torch.backends.mkldnn.is_available())")
    if not is_reparameterized(model):
        raise ValueError("to_onednn expects the inference form: call cpubone.deploy.reparameterize(model) first")
    model = model.eval().to(memory_format=torch.channels_last)
    shapes = _input_shapes(model, input_size)
    _convert(model, shapes, [True])
    return model
