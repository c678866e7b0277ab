"""Building blocks of CPUBone.

The paper's point is that on a CPU latency is about MACs / MACpS: depthwise convs do little work but
run at poor MACpS, full convs run fast but do too much work. The blocks below are the paper's answer:
grouped (groups=2) expansion convs in fused and unfused MBConvs (``GrFuMBConv``, ``GrMBConv``), 2x2
kernels in the late stages, and a cheap attention (``Lowtention``) that works on a strided,
depthwise-projected map and restores the size with nearest-neighbour upsampling.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = [
    "ConvNormAct",
    "ConvAct",
    "MBConv",
    "FusedMBConv",
    "GrMBConv",
    "GrFuMBConv",
    "Lowtention",
    "LowtentionInference",
    "lowtention_heads",
    "pad_to_multiple",
    "densify_groups",
    "fold_groupnorm_affine",
    "shape_general",
    "pad_to_stride",
    "crop_to",
    "PAD_MODES",
]

# How a 2x2 stride-1 conv gets its (1, 0, 1, 0) "same" pad in the inference form (``ConvAct``):
#   "crop": symmetric conv padding of 1, then drop the last row and column (one extra output row/col);
#   "pad":  an explicit zero pad before the conv (a copy of the input in eager; ONNX Runtime fuses
#           Pad into Conv's own asymmetric pads, so in ONNX it costs nothing).
PAD_MODES = ("crop", "pad")

_SHAPE_GENERAL = False


@contextmanager
def shape_general(enabled: bool = True) -> Iterator[None]:
    """Record size-dependent pads and crops of the inference form even where the traced size does not need them.

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

LayerFn = Optional[Callable[..., nn.Module]]


def _same_padding(kernel_size: int, stride: int) -> tuple[int, tuple[int, int, int, int] | None]:
    """Symmetric conv padding plus an optional explicit (left, right, top, bottom) zero pad.

    Odd kernels pad k // 2 on every side. A 2x2 kernel tiles the map exactly at stride 2 (no pad) and
    at stride 1 keeps the size with an asymmetric pad of 1 on the left/top and 0 on the right/bottom,
    which is how the released checkpoints were trained.
    """
    if kernel_size % 2 == 1:
        return kernel_size // 2, None
    if kernel_size == 2:
        return 0, (None if stride == 2 else (1, 0, 1, 0))
    raise ValueError(f"kernel_size={kernel_size}: only odd kernels and 2x2 are supported")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the right and bottom of ``x`` (N, C, H, W) up to the next multiple of ``multiple``.

    The pad is written as ceil-multiple minus size with floor division of positive numbers, not as
    ``(-H) % multiple``: under ``torch.compile`` with dynamic sizes a Python ``%`` on a size becomes a
    sympy ``PythonMod``, and every float later derived from the padded size (BatchNorm's n / (n - 1)
    in training, the nearest upsample's scale in eval) then fails in inductor ("'TensorReferenceAnalysis'
    has no attribute 'python_mod'"). Floor division lowers fine, and with positive operands it is the
    same in a traced ONNX graph, whose integer Div truncates.
    """
    H, W = x.shape[-2:]
    m = multiple
    return F.pad(x, (0, (W + m - 1) // m * m - W, 0, (H + m - 1) // m * m - H))


def _shape_general_trace() -> bool:
    """Whether a trace under ``shape_general`` is being recorded (never inside TorchScript)."""
    if torch.jit.is_scripting():
        return False
    return _SHAPE_GENERAL and torch.jit.is_tracing()


# The shape-dependent steps of Lowtention (a pad only at sizes the stride does not divide, a crop back to
# the input size) are functions, and these functions are leaves for torch.fx: a symbolic trace records a
# call to them instead of branching on a symbolic size, so the traced graph takes the same branch as
# eager at every input size. ``torch.fx.wrap`` makes them leaves for any FX tracer (torch.fx.symbolic_trace,
# torchvision's create_feature_extractor); timm's registry does the same for timm's FX helpers.
@register_notrace_function
def pad_to_stride(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``x`` zero-padded right/bottom to a multiple of ``stride`` where the stride does not divide its size.

    Always recorded (pads that evaluate to 0 at divisible sizes) in a trace under ``shape_general``.
    """
    H, W = x.shape[-2], x.shape[-1]
    if stride > 1 and (_shape_general_trace() or H % stride != 0 or W % stride != 0):
        x = pad_to_multiple(x, stride)
    return x


@register_notrace_function
def crop_to(x: torch.Tensor, ref: torch.Tensor, always: bool = True) -> torch.Tensor:
    """``x`` cropped (bottom/right) to the spatial size of ``ref``.

    With ``always=False`` the crop is only applied where it changes the shape (or in a trace under
    ``shape_general``), so a traced graph at a divisible size records no Slice.
    """
    H, W = ref.shape[-2], ref.shape[-1]
    if always or _shape_general_trace() or x.shape[-2] != H or x.shape[-1] != W:
        x = x[:, :, :H, :W]
    return x


@register_notrace_function
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, with the strided views made contiguous on CUDA (a leaf for torch.fx)."""
    if q.is_cuda:
        # CUDA's fused attention kernels need aligned strides, which these strided views lack
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v)


torch.fx.wrap("pad_to_stride")
torch.fx.wrap("crop_to")
torch.fx.wrap("attention")


class ConvNormAct(nn.Module):
    """Conv2d -> optional norm -> optional activation, with "same" padding for 2x2 kernels.

    Args:
        in_chs / out_chs: channels.
        kernel_size: odd, or 2 (asymmetric left/top pad at stride 1, exact tiling at stride 2).
        stride: conv stride.
        groups: conv groups (``groups=in_chs`` is a depthwise conv).
        bias: conv bias (the released unfused local blocks use biases instead of norms).
        norm_layer: norm applied after the conv, or None.
        act_layer: activation applied last, or None.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: LayerFn = nn.Hardswish,
    ) -> None:
        super().__init__()
        padding, pad = _same_padding(kernel_size, stride)
        # Kept as a tuple, not a module: the reparameterized form folds it into the conv's padding.
        self.pad = pad
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)
        self.norm = norm_layer(out_chs) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.norm(self.conv(x)))

    def extra_repr(self) -> str:
        return f"pad={self.pad}" if self.pad is not None else ""

    @torch.no_grad()
    def fuse(self, pad_mode: str = "pad", densify_below: int = 16) -> "ConvAct":
        """The inference form: a ``ConvAct`` with the BatchNorm's eval statistics folded into the conv.

        Args:
            pad_mode: how a 2x2 stride-1 "same" pad is realised, one of ``PAD_MODES``.
            densify_below: a grouped (not depthwise) conv with fewer input channels per group than this
                becomes a dense conv with block-diagonal weights (0 keeps every group). ONNX Runtime's
                blocked (NCHWc) conv kernels need whole SIMD blocks of channels per group; a grouped conv
                with fewer (B0's first downsample: 8 per group) falls back to a slow im2col path (~30 vs
                ~90 GMAC/s on AVX-512), so doing twice the MACs densely is faster.

        ``timm.utils.reparameterize_model`` calls this hook too (it replaces a child by ``child.fuse()``).
        """
        conv = copy.deepcopy(self.conv)
        if isinstance(self.norm, nn.BatchNorm2d):
            bn = self.norm
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        elif not isinstance(self.norm, nn.Identity):
            raise TypeError(f"cannot fold {type(self.norm).__name__} into a conv (only BatchNorm2d)")
        if 1 < conv.groups < conv.in_channels and conv.in_channels // conv.groups < densify_below:
            conv = densify_groups(conv)
        return ConvAct(conv, self.act, self.pad, pad_mode)


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


def fold_groupnorm_affine(norm: nn.GroupNorm, conv: nn.Module) -> nn.GroupNorm:
    """Fold ``norm``'s affine into the 1x1 ``conv`` after it, in place; returns the norm without affine.

    conv(gamma * n + beta) = (conv * gamma)(n) + conv(beta) for an ungrouped 1x1 conv (exact: it is
    linear per position).
    """
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


class FusedMBConv(nn.Module):
    """Fused MBConv: k x k expansion conv (grouped by ``expand_groups``) -> 1x1 projection.

    The residual is added when the block keeps shape (stride 1, in == out) unless ``skip=False``.

    Args:
        in_chs / out_chs: channels.
        kernel_size: expansion conv kernel (3 in stages 1-2 and downsampling blocks, 2 in the local
            branch of the attention stages).
        stride: expansion conv stride.
        expand_ratio: hidden width = round(in_chs * expand_ratio).
        expand_groups: groups of the expansion conv (2 in every released model: "GrFuMBConv").
        expand_bias: bias on the expansion conv (the released attention-stage local blocks have one).
        drop_path: stochastic depth rate on the residual branch.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 4.0,
        expand_groups: int = 1,
        expand_bias: bool = False,
        skip: bool = True,
        drop_path: float = 0.0,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        act_layer: Type[nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        mid_chs = round(in_chs * expand_ratio)
        self.has_skip = skip and stride == 1 and in_chs == out_chs
        self.conv_exp = ConvNormAct(
            in_chs, mid_chs, kernel_size, stride, groups=expand_groups, bias=expand_bias,
            norm_layer=norm_layer, act_layer=act_layer,
        )
        self.conv_pwl = ConvNormAct(mid_chs, out_chs, 1, norm_layer=norm_layer, act_layer=None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.conv_exp(x))
        return x + self.drop_path(out) if self.has_skip else out


class MBConv(nn.Module):
    """MBConv: 1x1 expansion (grouped by ``expand_groups``) -> depthwise k x k -> 1x1 projection.

    Follows the released unfused local block: the expansion and depthwise convs carry a bias and an
    activation but no norm (``norm_hidden=False``); only the projection is batch-normalized.

    Args:
        in_chs / out_chs: channels.
        kernel_size: depthwise kernel (2 in the released models).
        stride: depthwise stride.
        expand_ratio: hidden width = round(in_chs * expand_ratio).
        expand_groups: groups of the expansion conv (2 in every released model: "GrMBConv").
        norm_hidden: BatchNorm (instead of a bias) after the expansion and depthwise convs.
        drop_path: stochastic depth rate on the residual branch.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 4.0,
        expand_groups: int = 1,
        norm_hidden: bool = False,
        skip: bool = True,
        drop_path: float = 0.0,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        act_layer: Type[nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        mid_chs = round(in_chs * expand_ratio)
        hidden_norm = norm_layer if norm_hidden else None
        self.has_skip = skip and stride == 1 and in_chs == out_chs
        self.conv_pw = ConvNormAct(
            in_chs, mid_chs, 1, groups=expand_groups, bias=not norm_hidden,
            norm_layer=hidden_norm, act_layer=act_layer,
        )
        self.conv_dw = ConvNormAct(
            mid_chs, mid_chs, kernel_size, stride, groups=mid_chs, bias=not norm_hidden,
            norm_layer=hidden_norm, act_layer=act_layer,
        )
        self.conv_pwl = ConvNormAct(mid_chs, out_chs, 1, norm_layer=norm_layer, act_layer=None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.conv_dw(self.conv_pw(x)))
        return x + self.drop_path(out) if self.has_skip else out


class GrFuMBConv(FusedMBConv):
    """Grouped fused MBConv: a ``FusedMBConv`` with groups=2 on the expansion conv.

    With k x k kernels it has 0.55x the MACs of a FusedMBConv of expand ratio 4 at any width (the
    expansion conv's MACs halve, the projection's do not), at nearly the same MACpS on a CPU.
    """

    def __init__(self, in_chs: int, out_chs: int, **kwargs) -> None:
        kwargs.setdefault("expand_groups", 2)
        super().__init__(in_chs, out_chs, **kwargs)


class GrMBConv(MBConv):
    """Grouped MBConv: an ``MBConv`` with groups=2 on the 1x1 expansion conv (about 0.75x the MACs)."""

    def __init__(self, in_chs: int, out_chs: int, **kwargs) -> None:
        kwargs.setdefault("expand_groups", 2)
        super().__init__(in_chs, out_chs, **kwargs)


def lowtention_heads(dim: int, head_dim_ratio: float = 0.5) -> tuple[int, int]:
    """Head count and head width of the released models: about 30 channels of ``dim * ratio`` a head."""
    num_heads = max(1, int(dim * head_dim_ratio) // 30)
    head_dim = int((dim // num_heads) * head_dim_ratio)
    return num_heads, head_dim


class Lowtention(nn.Module):
    """LowFormer-style attention on a down-projected map, restored by nearest-neighbour upsampling.

    depthwise k x k conv (stride ``stride``) + BN -> 1x1 to q, k, v for ``num_heads`` heads ->
    softmax(q k^T / sqrt(d)) v per head -> 1x1 (bias) back to ``dim`` -> nearest upsample by
    ``stride`` -> crop to the input size.

    Nearest upsampling instead of the original transposed conv is one of the paper's latency wins
    (B1 on a Raspberry Pi 5: 33.5 ms vs 39.7 ms).

    Args:
        dim: channels in and out.
        stride: projection stride (2 in stage 3, 1 in stage 4 of the released models).
        kernel_size: projection kernel (2 in the released models).
        num_heads / head_dim: defaults follow ``lowtention_heads(dim)``.
    """

    def __init__(
        self,
        dim: int,
        stride: int = 2,
        kernel_size: int = 2,
        num_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        default_heads, default_head_dim = lowtention_heads(dim)
        self.num_heads = num_heads or default_heads
        self.head_dim = head_dim or default_head_dim
        self.stride = stride
        inner = self.num_heads * self.head_dim
        self.proj = ConvNormAct(dim, dim, kernel_size, stride, groups=dim, norm_layer=norm_layer, act_layer=None)
        self.qkv = nn.Conv2d(dim, 3 * inner, 1, bias=False)
        self.out = nn.Conv2d(inner, dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        inp = x
        # A strided 2x2 projection floors odd sizes and the upsample could not cover the input again
        # (the original code crashes there); zero-pad right/bottom to a multiple instead.
        x = pad_to_stride(x, s)
        x = self.qkv(self.proj(x))
        B, _, h, w = x.shape
        # Channel layout per head: [q | k | v], head-major (matches the released checkpoints).
        qkv = x.reshape(B, self.num_heads, 3 * self.head_dim, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        o = attention(q, k, v)
        # The 1x1 output conv applied as a Linear on (B, N, heads * d), then viewed back as NCHW: fed to
        # the conv, the reshaped attention output is a 4-D view saved for the backward pass, whose
        # symbolic strides torch.compile (inductor, torch 2.14) fails to order once sizes are dynamic
        # ("cannot determine truth value of Relational"). Same weights, same MACs.
        o = o.transpose(1, 2).reshape(B, h * w, self.num_heads * self.head_dim)
        o = F.linear(o, self.out.weight.flatten(1), self.out.bias)
        o = o.transpose(1, 2).reshape(B, -1, h, w)
        if s > 1:
            o = F.interpolate(o, scale_factor=float(s), mode="nearest")
            o = crop_to(o, inp)
        return o

    @torch.no_grad()
    def fuse(self, pad_mode: str = "pad") -> "LowtentionInference":
        """The inference form (``LowtentionInference``); the projection's BatchNorm is folded."""
        return LowtentionInference(self, pad_mode)


class LowtentionInference(nn.Module):
    """Lowtention with the query scale folded into ``qkv`` and attention in channels-first layout.

    For each head, with q, k, v as (d, N) slices of the qkv conv's output: o = v softmax(q^T k)^T, which
    equals softmax(q k^T / sqrt(d)) v of the training form transposed, without materialising the
    (N, d) transposes (ONNX Runtime fuses the remaining ones into its MatMul kernels). The Lowtention
    crop is skipped where it cannot change the result (sizes divisible by the stride), except under
    ``shape_general``.
    """

    def __init__(self, attn: Lowtention, pad_mode: str = "pad") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.stride = attn.num_heads, attn.head_dim, attn.stride
        self.proj = attn.proj.fuse(pad_mode)
        qkv = copy.deepcopy(attn.qkv)
        with torch.no_grad():
            w = qkv.weight.view(self.num_heads, 3, self.head_dim, *qkv.weight.shape[1:])
            w[:, 0] *= self.head_dim ** -0.5
        self.qkv = qkv
        self.out = copy.deepcopy(attn.out)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Projection, qkv and attention: the heads' output at the projected resolution, before ``out``."""
        x = self.qkv(self.proj(pad_to_stride(x, self.stride)))
        B, _, h, w = x.shape
        d = self.head_dim
        qkv = x.reshape(B, self.num_heads, 3 * d, h * w)
        q, k, v = qkv[:, :, :d], qkv[:, :, d:2 * d], qkv[:, :, 2 * d:]
        a = torch.matmul(q.transpose(-1, -2), k).softmax(dim=-1)
        return torch.matmul(v, a.transpose(-1, -2)).reshape(B, self.num_heads * d, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        o = self.out(self.attend(x))
        if s > 1:
            o = F.interpolate(o, scale_factor=float(s), mode="nearest")
            o = crop_to(o, x, always=False)
        return o
