"""CPUBone model: stem, four stages, classifier head, and the released variant table.

Stages 1-2 are GrFuMBConv stages (3x3); stages 3-4 add attention: a stride-2 GrFuMBConv downsample,
then ``CPUBoneBlock``s (Lowtention + MLP + a 2x2 local block, fused below 256 channels).

Every per-stage choice of that recipe (expand ratio, expansion groups, kernel, attention or not and its
stride) is a constructor argument, so a new design is the released one with some choices changed;
``arch_args`` gives the complete, JSON-ready architecture of any argument set (a model's
``model_config``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, GroupNorm1, Mlp
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from .layers import (
    PAD_MODES,
    ConvNormAct,
    FusedMBConv,
    Lowtention,
    MBConv,
    fold_groupnorm_affine,
)

__all__ = ["CPUBone", "CPUBoneBlock", "CPUBoneStage", "ClassifierHead", "CPUBoneConfig", "VARIANTS", "ARCH_KEYS",
           "arch_args"]


class CPUBoneBlock(nn.Module):
    """The attention-stage block: context (Lowtention + MLP) then a local conv block, all residual.

    x = x + Lowtention(GroupNorm1(x)); x = x + MLP(GroupNorm1(x)); x = x + Local(x), where Local is a
    ``GrFuMBConv`` with 2x2 kernels below ``fused_below_channels`` channels and a ``GrMBConv`` from
    there on: the paper measured fused blocks at ~70% higher MACpS at low widths and unfused ones
    ahead from 256 channels.

    Args:
        dim: channels.
        attn_stride: Lowtention projection stride.
        mlp_ratio: MLP hidden width = dim * mlp_ratio (GELU, exact).
        expand_ratio / expand_groups / local_kernel: of the local block.
        fused_below_channels: channel threshold of the fused/unfused rule (256 in the paper).
        proj_drop: dropout after the MLP (0.1 in the release).
        drop_path: stochastic depth rate of the three residual branches.
    """

    def __init__(
        self,
        dim: int,
        attn_stride: int = 2,
        attn_kernel: int = 2,
        mlp_ratio: float = 4.0,
        expand_ratio: float = 4.0,
        expand_groups: int = 2,
        local_kernel: int = 2,
        fused_below_channels: int = 256,
        proj_drop: float = 0.1,
        drop_path: float = 0.0,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        act_layer: Type[nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.attn = Lowtention(dim, stride=attn_stride, kernel_size=attn_kernel, norm_layer=norm_layer)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = GroupNorm1(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=(0.0, proj_drop), use_conv=True)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        local_args = dict(
            kernel_size=local_kernel, expand_ratio=expand_ratio, expand_groups=expand_groups,
            drop_path=drop_path, norm_layer=norm_layer, act_layer=act_layer,
        )
        if dim < fused_below_channels:
            self.local: nn.Module = FusedMBConv(dim, dim, expand_bias=True, **local_args)
        else:
            self.local = MBConv(dim, dim, **local_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.local(x)

    @torch.no_grad()
    def fuse(self) -> "CPUBoneBlock":
        """Fold the affine of the GroupNorm1 before the MLP into the MLP's first 1x1 conv (in place).

        The GroupNorm1 before Lowtention keeps its affine: the attention's depthwise projection
        zero-pads at odd sizes and in stage 4, where a folded shift would be wrong. The sub-blocks
        are not touched (``CPUBone.fuse`` and ``timm.utils.reparameterize_model`` walk into them).
        """
        if self.norm2.affine:
            self.norm2 = fold_groupnorm_affine(self.norm2, self.mlp.fc1)
        return self


class CPUBoneStage(nn.Module):
    """One stage: a stride-2 GrFuMBConv (3x3) downsample, then ``blocks``.

    In stages 1-2 the blocks are residual GrFuMBConvs (3x3), in stages 3-4 ``CPUBoneBlock``s.
    """

    def __init__(self, downsample: nn.Module, blocks: List[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Stem(nn.Module):
    """3x3 stride-2 conv + BN + Hardswish, then residual GrFuMBConvs at the stem width (B3 only)."""

    def __init__(self, conv: nn.Module, blocks: List[nn.Module]) -> None:
        super().__init__()
        self.conv = conv
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv(x))


class ClassifierHead(nn.Module):
    """1x1 conv + BN + Hardswish -> global avg pool -> Linear (no bias) + LayerNorm + Hardswish -> Linear.

    ``forward(pre_logits=True)`` stops before the last Linear (``head_hidden_size`` features).
    With ``global_pool=''`` the linear layers are applied per position (dense prediction).
    """

    def __init__(
        self,
        in_chs: int,
        head_widths: Tuple[int, int],
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        act_layer: type = nn.Hardswish,
    ) -> None:
        super().__init__()
        _check_pool(global_pool)
        self.global_pool = global_pool
        self.num_features = head_widths[1]
        self.conv = ConvNormAct(in_chs, head_widths[0], 1, act_layer=act_layer)
        self.pre_fc = nn.Linear(head_widths[0], head_widths[1], bias=False)
        self.pre_norm = nn.LayerNorm(head_widths[1])
        self.pre_act = act_layer()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(head_widths[1], num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.conv(x)
        if self.global_pool:
            x = x.mean((2, 3))
        else:
            x = x.permute(0, 2, 3, 1)
        x = self.pre_act(self.pre_norm(self.pre_fc(x)))
        if not pre_logits:
            x = self.fc(self.drop(x))
        if not self.global_pool:
            x = x.permute(0, 3, 1, 2)
        return x


def _check_pool(global_pool: str) -> None:
    if global_pool not in ("", "avg"):
        raise ValueError(f"global_pool={global_pool!r}: CPUBone supports 'avg' or '' (no pooling)")


Number = Union[int, float]
PerStage = Union[Number, Sequence[Number]]

# The architecture arguments of ``CPUBone`` (what a design config holds), in the order configs list them.
ARCH_KEYS = ("widths", "depths", "head_widths", "expand_ratio", "expand_groups", "downsample_expand_ratio",
             "stem_expand_ratio", "kernel_sizes", "attention", "attn_strides", "fused_below_channels", "mlp_ratio")


def _per_stage(value: Any, key: str, kind: type) -> Tuple[Any, ...]:
    """One value for each of stages 1-4, from a scalar (all stages) or a 4-sequence."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * 4
    if len(values) != 4:
        raise ValueError(f"{key}={value!r}: give one value or 4 (stages 1-4)")
    out = []
    for v in values:
        if kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{key}={value!r}: expected true/false per stage")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)) or v <= 0:
            raise ValueError(f"{key}={value!r}: expected positive {'integers' if kind is int else 'numbers'}")
        out.append(kind(v))
    return tuple(out)


def arch_args(
    widths: Sequence[int] = (16, 32, 64, 128, 256),
    depths: Sequence[int] = (0, 1, 1, 3, 4),
    head_widths: Sequence[int] = (1536, 1600),
    expand_ratio: PerStage = 4.0,
    expand_groups: PerStage = 2,
    downsample_expand_ratio: PerStage = 4.0,
    stem_expand_ratio: float = 4.0,
    kernel_sizes: Optional[Sequence[int]] = None,
    attention: Sequence[bool] = (False, False, True, True),
    attn_strides: Sequence[int] = (2, 1),
    fused_below_channels: int = 256,
    mlp_ratio: float = 4.0,
    small_kernels: bool = True,
) -> Dict[str, Any]:
    """The complete architecture (``ARCH_KEYS``, JSON types) of a ``CPUBone`` built with these arguments.

    Scalars apply to every stage; ``attn_strides`` may list stages 3-4 only (the released form);
    ``kernel_sizes`` defaults to 3x3 in stages 1-2 and, with ``small_kernels``, 2x2 in stages 3-4.
    Raises ``ValueError`` naming the argument when a value cannot build a model.
    """
    widths, depths = list(widths), list(depths)
    if len(widths) != 5 or len(depths) != 5:
        raise ValueError(f"widths and depths need 5 entries (stem, stages 1-4), got {widths}, {depths}")
    for key, vals, low in (("widths", widths, 1), ("depths", depths, 0)):
        if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in vals):
            raise ValueError(f"{key}={vals}: expected integers >= {low}")
    head_widths = list(head_widths)
    if len(head_widths) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in head_widths):
        raise ValueError(f"head_widths={head_widths}: expected 2 positive integers (head conv, pre-logits)")
    if kernel_sizes is None:
        kernel_sizes = (3, 3) + ((2, 2) if small_kernels else (3, 3))
    kernels = _per_stage(kernel_sizes, "kernel_sizes", int)
    if any(k != 2 and k % 2 == 0 for k in kernels):
        raise ValueError(f"kernel_sizes={list(kernels)}: only odd kernels and 2 are supported")
    strides = list(attn_strides)
    if len(strides) == 2:  # the released form: stages 3 and 4
        strides = [1, 1] + strides
    attn = _per_stage(attention, "attention", bool)
    strides = list(_per_stage(strides, "attn_strides", int))
    ratios = _per_stage(expand_ratio, "expand_ratio", float)
    groups = _per_stage(expand_groups, "expand_groups", int)
    down = _per_stage(downsample_expand_ratio, "downsample_expand_ratio", float)
    for i, (w, g, r, d) in enumerate(zip(widths[1:], groups, ratios, down)):
        prev = widths[i]
        # a grouped expansion conv needs whole groups on both sides
        for cin, mid, what in ((w, round(w * r), "blocks"), (prev, round(prev * d), "downsample")):
            if cin % g or mid % g:
                raise ValueError(f"expand_groups={g} in stage {i + 1}: {cin} -> {mid} channels ({what}) "
                                 f"do not split into {g} groups")
    if groups[0] > 1 and depths[0] and (widths[0] % groups[0] or round(widths[0] * stem_expand_ratio) % groups[0]):
        raise ValueError(f"expand_groups={groups[0]}: the stem blocks' {widths[0]} channels do not split into groups")
    if not isinstance(fused_below_channels, int) or isinstance(fused_below_channels, bool):
        raise ValueError(f"fused_below_channels={fused_below_channels!r}: expected an integer channel count")
    return dict(
        widths=widths, depths=depths, head_widths=head_widths, expand_ratio=list(ratios),
        expand_groups=list(groups), downsample_expand_ratio=list(down), stem_expand_ratio=float(stem_expand_ratio),
        kernel_sizes=list(kernels), attention=list(attn), attn_strides=[s if a else 1 for s, a in zip(strides, attn)],
        fused_below_channels=fused_below_channels, mlp_ratio=float(mlp_ratio),
    )


class CPUBone(nn.Module):
    """CPUBone backbone and classifier.

    Per-stage arguments (``expand_ratio``, ``expand_groups``, ``downsample_expand_ratio``,
    ``kernel_sizes``, ``attention``, ``attn_strides``) take one value for all stages or one per stage 1-4;
    the defaults build the released recipe.

    Args:
        widths: channels of the stem and of stages 1-4.
        depths: residual blocks in the stem and in stages 1-4 (a conv stage counts its stride-2 block,
            an attention stage only its CPUBoneBlocks, as in the release's configs).
        num_classes: classifier outputs (0 for no classifier).
        in_chans: input image channels.
        head_widths: widths of the head's 1x1 conv and of its pre-logits Linear.
        expand_ratio: hidden-width ratio of the stride-1 blocks, per stage.
        expand_groups: groups of the expansion convs, per stage (2 = the paper's "Gr" blocks); the stem
            blocks use stage 1's.
        downsample_expand_ratio: hidden-width ratio of each stage's stride-2 block (6 in B1-B3).
        stem_expand_ratio: hidden-width ratio of the stem blocks.
        kernel_sizes: kernel of each stage's stride-1 blocks (and of its Lowtention projection); None:
            3 in stages 1-2, and in stages 3-4 2 if ``small_kernels`` else 3.
        small_kernels: 2x2 kernels in the attention stages (used when ``kernel_sizes`` is None).
        attention: per stage, CPUBoneBlocks (Lowtention + MLP + local block) instead of conv blocks.
        attn_strides: Lowtention projection stride per stage, or for stages 3 and 4 only.
        fused_below_channels: blocks narrower than this are fused (GrFuMBConv), the others unfused
            (GrMBConv), in conv stages and in the local branch of attention stages.
        mlp_ratio: hidden ratio of the attention-stage MLPs.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after each attention-stage MLP.
        drop_path_rate: stochastic depth, rising linearly over the residual blocks.
        global_pool: 'avg', or '' for dense per-position logits.
    """

    def __init__(
        self,
        widths: Tuple[int, ...] = (16, 32, 64, 128, 256),
        depths: Tuple[int, ...] = (0, 1, 1, 3, 4),
        num_classes: int = 1000,
        in_chans: int = 3,
        head_widths: Tuple[int, int] = (1536, 1600),
        expand_ratio: PerStage = 4.0,
        expand_groups: PerStage = 2,
        downsample_expand_ratio: PerStage = 4.0,
        stem_expand_ratio: float = 4.0,
        small_kernels: bool = True,
        fused_below_channels: int = 256,
        attn_strides: Sequence[int] = (2, 1),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        norm_layer: type = nn.BatchNorm2d,
        act_layer: type = nn.Hardswish,
        kernel_sizes: Optional[Sequence[int]] = None,
        attention: Sequence[bool] = (False, False, True, True),
    ) -> None:
        super().__init__()
        arch = arch_args(widths, depths, head_widths, expand_ratio, expand_groups, downsample_expand_ratio,
                         stem_expand_ratio, kernel_sizes, attention, attn_strides, fused_below_channels,
                         mlp_ratio, small_kernels)
        self.model_config: Dict[str, Any] = arch
        widths, depths = arch["widths"], arch["depths"]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        conv_args = dict(norm_layer=norm_layer, act_layer=act_layer)

        # residual blocks in order: stem blocks, then per stage (conv stages count their first block)
        n_res = depths[0] + sum(d if a else max(d - 1, 0) for d, a in zip(depths[1:], arch["attention"]))
        dpr = iter([drop_path_rate * i / max(n_res - 1, 1) for i in range(n_res)])

        stem_blocks = [
            FusedMBConv(widths[0], widths[0], 3, 1, arch["stem_expand_ratio"], arch["expand_groups"][0],
                        drop_path=next(dpr), **conv_args)
            for _ in range(depths[0])
        ]
        self.stem = Stem(ConvNormAct(in_chans, widths[0], 3, 2, **conv_args), stem_blocks)

        stages = []
        self.feature_info: List[Dict[str, Any]] = []
        prev = widths[0]
        for i, (width, depth) in enumerate(zip(widths[1:], depths[1:])):
            ratio, groups, k = arch["expand_ratio"][i], arch["expand_groups"][i], arch["kernel_sizes"][i]
            downsample = FusedMBConv(prev, width, 3, 2, arch["downsample_expand_ratio"][i], groups, **conv_args)
            if arch["attention"][i]:
                blocks: List[nn.Module] = [
                    CPUBoneBlock(
                        width, attn_stride=arch["attn_strides"][i], attn_kernel=k, mlp_ratio=arch["mlp_ratio"],
                        expand_ratio=ratio, expand_groups=groups, local_kernel=k,
                        fused_below_channels=fused_below_channels, proj_drop=proj_drop_rate,
                        drop_path=next(dpr), **conv_args,
                    )
                    for _ in range(depth)
                ]
            else:
                # the fused/unfused rule of the paper, as in the attention stages' local blocks
                block = FusedMBConv if width < fused_below_channels else MBConv
                blocks = [block(width, width, k, 1, ratio, groups, drop_path=next(dpr), **conv_args)
                          for _ in range(depth - 1)]
            stages.append(CPUBoneStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=width, reduction=2 ** (i + 2), module=f"stages.{i}"))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.head_hidden_size = arch["head_widths"][1]
        self.head = ClassifierHead(prev, tuple(arch["head_widths"]), num_classes, drop_rate, global_pool, act_layer)
        self.pretrained_cfg: Dict[str, Any] = default_cfg()
        self._init_weights()

    def _init_weights(self) -> None:
        from timm.layers import trunc_normal_

        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- timm API -----------------------------------------------------------------------------
    # TorchScript compiles properties; this one returns the mixed-type config dict, which it cannot type.
    __jit_unused_properties__ = ["default_cfg"]

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """timm's older name of ``pretrained_cfg`` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:  # timm's builder assigns both names
        self.pretrained_cfg = cfg

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (strides 4, 8, 16, 32) for ``indices`` (last n if int, all if None)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last wanted intermediate (and the head) for feature extraction."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.head = nn.Identity()
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def fuse(self, pad_mode: str = "pad", densify_below: int = 16) -> "CPUBone":
        """Rewrite this model in place into its inference form, in eval mode; returns it.

        Each block's ``fuse()`` gives its inference form (BatchNorms folded into convs, the query
        scale folded into Lowtention's qkv, the MLP's GroupNorm affine folded into its first conv);
        dropout and stochastic depth are removed. Same outputs as eval mode, at any input size.

        Args:
            pad_mode: how 2x2 stride-1 "same" convs pad, one of ``PAD_MODES`` ("pad" exports best to
                ONNX Runtime, which folds the pad into the conv; "crop" avoids the input copy in eager).
            densify_below: grouped (not depthwise) convs with fewer input channels per group become
                dense block-diagonal convs (see ``ConvNormAct.fuse``; 0 keeps every group).
        """
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
        _fuse_children(self, pad_mode, densify_below)
        self.drop_rate = 0.0
        self.pretrained_cfg = dict(self.pretrained_cfg, reparameterized=True)
        return self.eval()  # the new modules start in training mode


def _fuse_children(module: nn.Module, pad_mode: str, densify_below: int) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, ConvNormAct):
            setattr(module, name, child.fuse(pad_mode, densify_below))
        elif isinstance(child, Lowtention):
            setattr(module, name, child.fuse(pad_mode))
        elif isinstance(child, (nn.Dropout, DropPath)):
            setattr(module, name, nn.Identity())
        else:
            if isinstance(child, CPUBoneBlock):
                child.fuse()
            _fuse_children(child, pad_mode, densify_below)


def default_cfg(**kwargs: Any) -> Dict[str, Any]:
    """Pretrained config in timm's format (read by ``timm.data.resolve_data_config``)."""
    cfg = dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.95, crop_mode="center",
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="stem.conv.conv", classifier="head.fc", license="apache-2.0",
    )
    cfg.update(kwargs)
    return cfg


# --- the released family ----------------------------------------------------------------------
@dataclass(frozen=True)
class CPUBoneConfig:
    """One released variant: constructor arguments plus the published facts about it."""

    widths: Tuple[int, ...]
    depths: Tuple[int, ...]
    head_widths: Tuple[int, int] = (1536, 1600)
    downsample_expand_ratio: float = 4.0
    stem_expand_ratio: float = 4.0
    published_name: str = ""
    original_config: str = ""
    params: int = 0  # of the original code, 1000 classes
    macs: int = 0  # at 224x224, torch.utils.flop_counter FLOPs / 2
    top1: Optional[float] = None  # published ImageNet-1k top-1
    # timm checkpoint that `pretrained=True` loads (Hugging Face Hub id, input size it was trained at)
    hf_hub_id: str = ""
    pretrained_input_size: Tuple[int, int, int] = (3, 224, 224)

    def model_args(self) -> Dict[str, Any]:
        return dict(
            widths=self.widths, depths=self.depths, head_widths=self.head_widths,
            downsample_expand_ratio=self.downsample_expand_ratio, stem_expand_ratio=self.stem_expand_ratio,
        )


VARIANTS: Dict[str, CPUBoneConfig] = {
    "cpubone_nano": CPUBoneConfig(
        (12, 24, 48, 96, 192), (0, 1, 1, 1, 2), published_name="CPUBone-Nano", original_config="nano",
        params=6_519_700, macs=187_292_512, top1=72.67, hf_hub_id="timm/cpubone_nano.r224_in1k"),
    "cpubone_t0": CPUBoneConfig(
        (12, 24, 48, 96, 192), (0, 1, 1, 2, 3), published_name="CPUBone-T0", original_config="t0",
        params=7_542_100, macs=264_809_728, top1=74.85, hf_hub_id="timm/cpubone_t0.r224_in1k"),
    "cpubone_s0": CPUBoneConfig(
        (14, 28, 56, 112, 224), (0, 1, 1, 2, 3), published_name="CPUBone-S0", original_config="s0",
        params=8_732_766, macs=354_836_154, top1=75.89, hf_hub_id="timm/cpubone_s0.r224_in1k"),
    "cpubone_b0": CPUBoneConfig(
        (16, 32, 64, 128, 256), (0, 1, 1, 3, 4), published_name="CPUBone-B0", original_config="b0",
        params=10_357_368, macs=519_710_080, top1=77.6, hf_hub_id="timm/cpubone_b0_bfrobust.r224_in1k"),
    "cpubone_b1": CPUBoneConfig(
        (16, 32, 64, 128, 256), (0, 1, 1, 5, 5), downsample_expand_ratio=6.0, published_name="CPUBone-B1",
        original_config="b1", params=12_429_112, macs=746_028_928, top1=78.7,
        hf_hub_id="timm/cpubone_b1_bfrobust.r224_in1k"),
    "cpubone_b2": CPUBoneConfig(
        (20, 40, 80, 160, 320), (0, 1, 1, 6, 6), head_widths=(2304, 2560), downsample_expand_ratio=6.0,
        published_name="CPUBone-B2", original_config="b15", params=23_856_668, macs=1_354_884_160, top1=80.3,
        hf_hub_id="timm/cpubone_b2_bfrobust.r224_in1k"),
    "cpubone_b2_5": CPUBoneConfig(
        (24, 48, 96, 192, 384), (0, 1, 1, 6, 6), head_widths=(2304, 2560), downsample_expand_ratio=6.0,
        published_name="CPUBone-B2.5", original_config="b2", params=30_422_752, macs=1_934_859_136, top1=None,
        hf_hub_id="timm/cpubone_b2pt5_dwnorm.timm_r256_in1k", pretrained_input_size=(3, 256, 256)),
    "cpubone_b3": CPUBoneConfig(
        (32, 64, 128, 256, 512), (1, 2, 3, 6, 6), downsample_expand_ratio=6.0, stem_expand_ratio=4.0,
        published_name="CPUBone-B3", original_config="b3", params=40_742_344, macs=4_054_590_464, top1=83.1,
        hf_hub_id="timm/cpubone_b3.r224_in1k"),
}
