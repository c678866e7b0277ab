"""The inference form rewritten into ops XNNPACK has kernels for (used by the ExecuTorch engine).

Left as they are, ExecuTorch runs GroupNorm, nearest upsampling and LayerNorm in its portable (reference)
kernels, and each of them splits the XNNPACK graph into another partition with a hand-over on both sides
(cpubone_b0 at 224: 20 partitions; 1 after this rewrite, and ~5% faster at one thread on AMD EPYC).
Each rewrite computes the same function (fp32 rounding aside):

* ``GroupNorm(G, C)`` (timm's ``GroupNorm1`` included): per-channel spatial means, averaged over each
  group's channels by a 1x1 conv (XNNPACK's mean reduces only H and W) and, for G > 1, copied back to the
  group's channels by another; the variance alike.
* Lowtention's 1x1 output conv followed by the nearest upsample by s: one transposed conv with kernel s
  and stride s whose s x s taps all hold the 1x1 weights, since each output pixel then receives exactly
  one low-resolution pixel's projection. (A depthwise all-ones transposed conv after the 1x1 conv is
  exact as well but made B0 slower than leaving the upsample to the portable kernel.)
* The classifier head's Linear + LayerNorm on the pooled vector: a 1x1 conv and the GroupNorm above on
  the 1 x 1 map, pooled with ``keepdim`` (XNNPACK's mean keeps the reduced dims only).
* A dense conv whose weights are block-diagonal -- the inference form makes thin grouped convs dense for
  ONNX Runtime's kernels (``densify_below``) -- back into the grouped conv it computes. XNNPACK runs
  grouped convs at full speed, so the densified one only doubles the work (B0's first downsample alone:
  0.48 ms grouped vs 0.70 ms dense; whole B0 in ExecuTorch 0.93x -> 0.91x of ONNX Runtime fp32 in
  ``benchmarks/fp32_pieces.py``). LiteRT's export uses this one alone (``regroup_convs``).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..models.cpubone import ClassifierHead
from ..models.layers import LowtentionInference

__all__ = ["xnnpack_form", "GroupNormAsMeans", "LowtentionTransposedOut", "PooledHeadAsConvs", "regroup_conv",
           "regroup_convs"]


def xnnpack_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the modules above swapped (the model itself is left untouched)."""

    def rule(module: nn.Module) -> Optional[nn.Module]:
        if isinstance(module, nn.GroupNorm):
            return GroupNormAsMeans(module.num_channels, module.eps, module.weight, module.bias, module.num_groups)
        if isinstance(module, LowtentionInference) and module.stride > 1:
            return LowtentionTransposedOut(module)
        if isinstance(module, ClassifierHead) and module.global_pool == "avg":
            return PooledHeadAsConvs(module)
        if type(module) is nn.Conv2d:
            return regroup_conv(module)
        return None

    return _rewritten(model, rule)


def regroup_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with only the block-diagonal dense convs made grouped again (LiteRT's export:
    its CPU path is XNNPACK as well, and its converter lowers the other ops itself)."""
    return _rewritten(model, lambda m: regroup_conv(m) if type(m) is nn.Conv2d else None)


def _rewritten(model: nn.Module, rule: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """A copy of ``model`` with each module for which ``rule`` returns a replacement replaced (outermost first:
    a replaced module's children are not visited)."""

    def swap(module: nn.Module) -> nn.Module:
        new = rule(module)
        if new is not None:
            return new
        for name, child in module.named_children():
            setattr(module, name, swap(child))
        return module

    return swap(copy.deepcopy(model)).eval()


def block_diagonal_groups(conv: nn.Conv2d) -> int:
    """The most groups whose blocks hold every non-zero weight of the dense ``conv`` (1: none).

    Only splits that leave at least two input channels per group count: an all-zero conv is not
    rewritten into a channel-by-channel one.
    """
    if conv.groups != 1 or conv.transposed:
        return 1
    cin, cout = conv.in_channels, conv.out_channels
    w = conv.weight.detach()
    common = [g for g in range(2, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0 and cin // g >= 2]
    for g in reversed(common):
        block = (torch.arange(cout)[:, None] // (cout // g)) == (torch.arange(cin)[None, :] // (cin // g))
        if not w[~block].any():
            return g
    return 1


def regroup_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as a grouped conv when its weights are block-diagonal (exactly the same function), else itself."""
    g = block_diagonal_groups(conv)
    if g == 1:
        return conv
    out_g, in_g = conv.out_channels // g, conv.in_channels // g
    grouped = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, g, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        for i in range(g):
            grouped.weight[i * out_g:(i + 1) * out_g] = conv.weight[i * out_g:(i + 1) * out_g, i * in_g:(i + 1) * in_g]
        if conv.bias is not None:
            grouped.bias.copy_(conv.bias)
    return grouped


class GroupNormAsMeans(nn.Module):
    """GroupNorm over each group's (C / G, H, W) from spatial means and group-averaging 1x1 convs."""

    def __init__(self, channels: int, eps: float, weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, groups: int = 1) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"GroupNorm of {channels} channels in {groups} groups: not a whole number per group")
        self.eps = eps
        member = torch.arange(channels) // (channels // groups) == torch.arange(groups)[:, None]  # (G, C)
        # equal counts per channel, so the mean of a group's channel means is the mean over the group
        self.mean_c = nn.Conv2d(channels, groups, 1, bias=False)
        # back to the group's channels; one group broadcasts by itself
        self.expand = nn.Conv2d(groups, channels, 1, bias=False) if groups > 1 else None
        with torch.no_grad():
            self.mean_c.weight.copy_((member.float() * groups / channels)[:, :, None, None])
            if self.expand is not None:
                self.expand.weight.copy_(member.t().float()[:, :, None, None])
        shape = (1, channels, 1, 1)
        self.weight = None if weight is None else nn.Parameter(weight.detach().reshape(shape).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().reshape(shape).clone())

    def _group_mean(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mean_c(x.mean((2, 3), keepdim=True))
        return m if self.expand is None else self.expand(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self._group_mean(x)
        y = d * torch.rsqrt(self._group_mean(d * d) + self.eps)
        return y if self.weight is None else y * self.weight + self.bias


class LowtentionTransposedOut(nn.Module):
    """Lowtention (stride s > 1) with its output conv and nearest upsample as one transposed conv."""

    def __init__(self, attn: LowtentionInference) -> None:
        super().__init__()
        s = attn.stride
        w = attn.out.weight.detach()[:, :, 0, 0]  # (dim, inner)
        self.out_up = nn.ConvTranspose2d(w.shape[1], w.shape[0], s, s)
        with torch.no_grad():
            self.out_up.weight.copy_(w.t()[:, :, None, None].expand(-1, -1, s, s))
            self.out_up.bias.copy_(attn.out.bias)
        # shares the projection and qkv; the 1x1 `out` lives on in `out_up` only (no dead weights in the file)
        self.attn = copy.copy(attn)
        self.attn._modules = {k: m for k, m in attn._modules.items() if k != "out"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        o = self.out_up(self.attn.attend(x))
        return o if tuple(o.shape[-2:]) == (H, W) else o[:, :, :H, :W]


class PooledHeadAsConvs(nn.Module):
    """``ClassifierHead`` (global average pool) with its Linear + LayerNorm as 1x1 conv + GroupNormAsMeans."""

    def __init__(self, head: ClassifierHead) -> None:
        super().__init__()
        self.conv, self.pre_act, self.drop, self.fc = head.conv, head.pre_act, head.drop, head.fc
        self.pre_fc = nn.Conv2d(head.pre_fc.in_features, head.pre_fc.out_features, 1, bias=False)
        with torch.no_grad():
            self.pre_fc.weight.copy_(head.pre_fc.weight[:, :, None, None])
        norm = head.pre_norm
        self.pre_norm = GroupNormAsMeans(norm.normalized_shape[0], norm.eps, norm.weight, norm.bias)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_fc(self.conv(x).mean((2, 3), keepdim=True))
        x = self.pre_act(self.pre_norm(x)).flatten(1)
        return x if pre_logits else self.fc(self.drop(x))
