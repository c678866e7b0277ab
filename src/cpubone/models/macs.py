"""The project's one MAC counter.

1 MAC = one multiply-add of a convolution, linear layer or attention matmul, counted by
``torch.utils.flop_counter.FlopCounterMode`` (its FLOPs / 2). Norms, activations, softmax, pooling and
upsampling are not counted, the same convention as the paper's and the release's figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["MacReport", "count_macs", "count_params"]


@dataclass
class MacReport:
    """Total MACs and MACs per module name (every level of the module tree) for one input size."""

    total: int
    by_module: Dict[str, int] = field(default_factory=dict)
    by_op: Dict[str, int] = field(default_factory=dict)
    input_size: Tuple[int, ...] = ()

    def module(self, name: str) -> int:
        """MACs spent inside module ``name`` (dotted path as in ``named_modules``; '' is the model)."""
        return self.by_module.get(name, 0)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prepare_input(model: nn.Module, size: Union[int, Sequence[int], torch.Tensor]) -> torch.Tensor:
    if isinstance(size, torch.Tensor):
        return size
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        size = (getattr(model, "in_chans", 3),) + size
    if len(size) == 3:
        size = (1,) + size
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    return torch.zeros(size, dtype=dtype)


@torch.no_grad()
def count_macs(model: nn.Module, size: Union[int, Sequence[int], torch.Tensor] = 224) -> MacReport:
    """MACs of one forward pass at batch size 1.

    Args:
        model: any ``nn.Module`` taking one image tensor.
        size: ``S`` (S x S), ``(H, W)``, ``(C, H, W)``, ``(B, C, H, W)`` or an input tensor.
    """
    x = _prepare_input(model, size)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
    flops = counter.get_flop_counts()
    by_module: Dict[str, int] = {}
    for name, ops in flops.items():
        # FlopCounterMode names modules "Global" and "Global.<path>" ("<Class>.<path>" in newer torch)
        key = name.split(".", 1)[1] if "." in name else ""
        by_module[key] = int(sum(ops.values()) // 2)
    by_op: Dict[str, int] = {}
    for op, n in flops.get("Global", {}).items():
        by_op[str(op).split(".")[1] if str(op).count(".") else str(op)] = int(n // 2)
    total = int(counter.get_total_flops() // 2)
    by_module[""] = total
    return MacReport(total=total, by_module=by_module, by_op=by_op, input_size=tuple(x.shape))
