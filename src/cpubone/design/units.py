"""The units a CPUBone design is timed by: every block the design space can use, at the shape it runs at.

A model is cut into units along the boundaries where the paper's latency model adds up work: the stem
conv, the stem blocks, each stage's stride-2 downsample, each conv-stage block ((Gr)FuMBConv or
(Gr)MBConv), and in the attention stages each CPUBone block's three residual parts (Lowtention with its
GroupNorm, the MLP with its GroupNorm, the local block), then the head. A unit is named by everything its
latency depends on (kind, channels, input resolution, kernel, stride, expand ratio, groups), so one
measured entry serves every design that contains it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

__all__ = ["Unit", "UNIT_KINDS", "model_units", "make_unit", "conv_out"]

UNIT_KINDS = ("stem", "stem_block", "downsample", "fused", "unfused", "attn", "mlp", "head")


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output side of a CPUBone "same" conv: ceil(size / stride) for odd kernels and for 2x2."""
    return -(-size // stride)


@dataclass(frozen=True)
class Unit:
    """One timed part of a network.

    kind: one of ``UNIT_KINDS``; cin / cout: channels in and out (head: cout = head conv width, extra =
    pre-logits width; fused: extra = 1 for the biased expansion conv of a CPUBone block's local branch;
    mlp: expand = MLP ratio); h, w: input resolution; kernel / stride: of the block's spatial conv (attn:
    the Lowtention projection); expand / groups: expansion ratio and groups.
    """

    kind: str
    cin: int
    cout: int
    h: int
    w: int
    kernel: int = 3
    stride: int = 1
    expand: float = 4.0
    groups: int = 1
    extra: int = 0

    @property
    def key(self) -> str:
        return (f"{self.kind}|c{self.cin}-{self.cout}|{self.h}x{self.w}|k{self.kernel}s{self.stride}|"
                f"e{self.expand:g}|g{self.groups}|x{self.extra}")

    @classmethod
    def from_key(cls, key: str) -> "Unit":
        kind, ch, hw, ks, e, g, x = key.split("|")
        cin, cout = ch[1:].split("-")
        h, w = hw.split("x")
        k, s = ks[1:].split("s")
        return cls(kind, int(cin), int(cout), int(h), int(w), int(k), int(s), float(e[1:]), int(g[1:]), int(x[1:]))

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return (1, self.cin, self.h, self.w)


def model_units(config: Mapping[str, Any], size: Tuple[int, int]) -> List[Tuple[str, Unit]]:
    """(stage label, unit) for every unit of the design ``config`` (a loaded config) at input ``size`` (H, W).

    Labels: 'stem', 'stage1'..'stage4', 'head' (the per-stage breakdown of a prediction).
    """
    widths, depths = config["widths"], config["depths"]
    h, w = conv_out(size[0], 3, 2), conv_out(size[1], 3, 2)
    units: List[Tuple[str, Unit]] = [("stem", Unit("stem", 3, widths[0], size[0], size[1], 3, 2, 1.0, 1))]
    for _ in range(depths[0]):
        units.append(("stem", Unit("stem_block", widths[0], widths[0], h, w, 3, 1, float(config["stem_expand_ratio"]),
                                   config["expand_groups"][0])))
    prev = widths[0]
    for i in range(4):
        label, width, groups = f"stage{i + 1}", widths[i + 1], config["expand_groups"][i]
        k, ratio = config["kernel_sizes"][i], float(config["expand_ratio"][i])
        units.append((label, Unit("downsample", prev, width, h, w, 3, 2, float(config["downsample_expand_ratio"][i]),
                                  groups)))
        h, w = conv_out(h, 3, 2), conv_out(w, 3, 2)
        local = "fused" if width < config["fused_below_channels"] else "unfused"
        if config["attention"][i]:
            for _ in range(depths[i + 1]):
                units.append((label, Unit("attn", width, width, h, w, k, config["attn_strides"][i], 1.0, 1)))
                units.append((label, Unit("mlp", width, width, h, w, 1, 1, float(config["mlp_ratio"]), 1)))
                # extra=1: the local branch's fused expansion conv carries a bias (the release's)
                units.append((label, Unit(local, width, width, h, w, k, 1, ratio, groups, int(local == "fused"))))
        else:
            for _ in range(depths[i + 1] - 1):
                units.append((label, Unit(local, width, width, h, w, k, 1, ratio, groups)))
        prev = width
    hw = config["head_widths"]
    units.append(("head", Unit("head", prev, hw[0], h, w, 1, 1, 1.0, 1, hw[1])))
    return units


class _AttnPart(nn.Module):
    """x + Lowtention(GroupNorm1(x)): the context half of a CPUBone block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn = block.norm1, block.attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm1(x))


class _MlpPart(nn.Module):
    """x + MLP(GroupNorm1(x)): the channel-mixing part of a CPUBone block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm2, self.mlp = block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))


def make_unit(unit: Unit, num_classes: int = 1000, inference_form: bool = True, seed: int = 0) -> nn.Module:
    """The real layers of ``unit`` (seeded random weights), in the inference form ``cpubone export`` deploys."""
    from ..models.cpubone import ClassifierHead, CPUBoneBlock
    from ..models.layers import ConvNormAct, FusedMBConv, MBConv

    torch.manual_seed(seed)
    u = unit
    if u.kind == "stem":
        m: nn.Module = ConvNormAct(u.cin, u.cout, 3, 2)
    elif u.kind in ("stem_block", "fused"):
        m = FusedMBConv(u.cin, u.cout, u.kernel, u.stride, u.expand, u.groups, expand_bias=bool(u.extra))
    elif u.kind == "downsample":
        m = FusedMBConv(u.cin, u.cout, 3, 2, u.expand, u.groups)
    elif u.kind == "unfused":
        m = MBConv(u.cin, u.cout, u.kernel, u.stride, u.expand, u.groups)
    elif u.kind in ("attn", "mlp"):
        # built inside a whole block so that the inference form folds its norms exactly as in the model
        block = CPUBoneBlock(u.cin, attn_stride=u.stride if u.kind == "attn" else 1,
                             attn_kernel=u.kernel if u.kind == "attn" else 2,
                             mlp_ratio=u.expand if u.kind == "mlp" else 4.0)
        if inference_form:
            from ..models.reparam import reparameterize_blocks

            block = reparameterize_blocks(block)
        m = _AttnPart(block) if u.kind == "attn" else _MlpPart(block)
        m.in_chans = u.cin
        return m.eval()
    elif u.kind == "head":
        m = ClassifierHead(u.cin, (u.cout, u.extra), num_classes)
    else:
        raise ValueError(f"unit kind {u.kind!r}: expected one of {', '.join(UNIT_KINDS)}")
    if inference_form:
        from ..models.reparam import reparameterize_blocks

        m = reparameterize_blocks(m)
    m.in_chans = u.cin  # export_onnx traces a (1, in_chans, H, W) input
    return m.eval()


def unit_counts(units: List[Tuple[str, Unit]]) -> Dict[str, int]:
    """How many times each unit key occurs."""
    counts: Dict[str, int] = {}
    for _, u in units:
        counts[u.key] = counts.get(u.key, 0) + 1
    return counts
