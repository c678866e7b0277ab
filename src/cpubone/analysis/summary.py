"""Params / MACs summaries of models and of the variant table (``cpubone list`` / ``cpubone info``)."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..models import VARIANTS, create_model, resolve_model_name
from ..models.macs import count_macs, count_params


def variant_table(size: int = 224) -> List[Dict[str, Any]]:
    """One row per CPUBone variant: our params and MACs beside the published ones."""
    rows = []
    for name, cfg in VARIANTS.items():
        with torch.device("cpu"):
            model = create_model(name)
        macs = count_macs(model, size).total
        rows.append(dict(
            model=name, paper_name=cfg.published_name, original_config=cfg.original_config,
            params=count_params(model), released_params=cfg.params,
            macs=macs, released_macs_224=cfg.macs, top1=cfg.top1,
        ))
    return rows


def model_summary(name: str, size: Tuple[int, int] = (224, 224)) -> Dict[str, Any]:
    """Params, MACs and, for CPUBone, a per-stage table (resolution, channels, blocks, MACs, params)."""
    _check_size(size)
    model = create_model(name).eval()
    report = count_macs(model, size)
    stages: List[Dict[str, Any]] = []
    if resolve_model_name(name).source in ("cpubone", "config"):
        shapes: Dict[str, Tuple[int, ...]] = {}
        hooks = [model.stem.register_forward_hook(lambda m, i, o: shapes.__setitem__("stem", tuple(o.shape)))]
        for i, st in enumerate(model.stages):
            hooks.append(st.register_forward_hook(lambda m, inp, o, i=i: shapes.__setitem__(f"stages.{i}", tuple(o.shape))))
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
        for h in hooks:
            h.remove()
        parts = [("stem", model.stem, 1 + len(model.stem.blocks))]
        parts += [(f"stages.{i}", st, 1 + len(st.blocks)) for i, st in enumerate(model.stages)]
        for key, mod, nblocks in parts:
            shp = shapes[key]
            stages.append(dict(stage=key, resolution=f"{shp[2]}x{shp[3]}", channels=shp[1], blocks=nblocks,
                               macs=report.module(key), params=count_params(mod)))
        stages.append(dict(stage="head", resolution="1x1", channels=model.head_hidden_size, blocks=1,
                           macs=report.module("head"), params=count_params(model.head)))
    return dict(model=name, input_size=list(size), params=count_params(model), macs=report.total, stages=stages)


def _check_size(size: Sequence[int]) -> None:
    if len(size) != 2 or any(int(s) < 32 for s in size):
        raise ValueError(f"input size {tuple(size)}: height and width must be at least 32")
