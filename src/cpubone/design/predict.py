"""``cpubone design predict``: a design's latency from a lookup table, with MACs, params and a per-stage
breakdown.

predicted latency = the table's measured fixed overhead at the input size + its measured scale x the sum
of its entries over the design's units (``cpubone.design.units``; the overhead and scale are measured on
two reference networks, see ``cpubone.design.lut``): the paper's "latency = sum over blocks of MACs / MACpS", with each
block's MACpS measured on the target CPU instead of assumed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .lut import LatencyTable, LutError
from .units import model_units

__all__ = ["Prediction", "predict_latency", "predict", "model_size"]


@dataclass
class Prediction:
    """Predicted batch-1 latency (ms) of one design, with its MACs and params."""

    name: str
    size: Tuple[int, int]
    latency_ms: float
    overhead_ms: float
    macs: Optional[int] = None
    params: Optional[int] = None
    stages: List[Dict[str, Any]] = field(default_factory=list)
    lut: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def predict_latency(config: Mapping[str, Any], lut: LatencyTable, size: Sequence[int]) -> Tuple[float, Dict[str, float]]:
    """(total ms, scaled ms per stage label) of a loaded config from ``lut``; raises ``LutError`` when the table
    lacks units of the design (naming how many and one of them)."""
    size = (int(size[0]), int(size[1]))
    units = model_units(config, size)
    missing = lut.missing(u.key for _, u in units)
    if missing:
        raise LutError(f"{lut.path or 'latency table'}: {len(missing)} unit(s) of this design at {size[0]}x{size[1]} "
                       f"are not measured (e.g. {missing[0]}); measure them with build_lut on this design")
    per_stage: Dict[str, float] = {}
    scale = lut.scale_at(size)
    for label, u in units:
        per_stage[label] = per_stage.get(label, 0.0) + scale * lut.ms(u.key)
    return lut.fixed_overhead(size) + sum(per_stage.values()), per_stage


def model_size(config: Mapping[str, Any], size: Sequence[int]) -> Tuple[int, int, Dict[str, Tuple[int, int]]]:
    """(MACs, params, {stage label: (MACs, params)}) of a loaded config at ``size``, counted on the model
    built on the meta device for params and with ``count_macs`` for MACs (1000 classes)."""
    import torch

    from ..models import create_model
    from ..models.macs import count_macs, count_params

    with torch.device("cpu"):
        model = create_model(dict(config)).eval()
    report = count_macs(model, (int(size[0]), int(size[1])))
    parts = {"stem": "stem", **{f"stage{i + 1}": f"stages.{i}" for i in range(4)}, "head": "head"}
    mods = dict(model.named_modules())
    by_stage = {label: (report.module(mod), count_params(mods[mod])) for label, mod in parts.items()}
    return report.total, count_params(model), by_stage


def predict(source: Union[str, Mapping[str, Any]], lut: LatencyTable, size: Optional[Sequence[int]] = None,
            count: bool = True) -> Prediction:
    """Predict a design's latency from ``lut`` (see the module doc).

    Args:
        source: a released variant name, a config dict or a config file.
        lut: a table from ``build_lut`` / ``load_lut``.
        size: (H, W); default the config's ``input_size``, else 224x224.
        count: also count MACs and params (builds the model once).
    """
    from ..models import is_config_source, load_config, variant_config

    config = load_config(source) if is_config_source(source) else variant_config(str(source))
    size = tuple(size) if size is not None else tuple(config.get("input_size") or (224, 224))
    if len(size) != 2 or any(int(s) < 32 for s in size):
        raise ValueError(f"size {size}: expected H W, each at least 32")
    total, per_stage = predict_latency(config, lut, size)
    pred = Prediction(name=config["name"], size=(int(size[0]), int(size[1])), latency_ms=total,
                      overhead_ms=lut.fixed_overhead(size), lut=lut.describe())
    macs = {}
    if count:
        pred.macs, pred.params, macs = model_size(config, size)
    for label, ms in per_stage.items():
        row: Dict[str, Any] = dict(stage=label, ms=ms, share_pct=100.0 * ms / total)
        if count:
            row.update(macs=macs[label][0], params=macs[label][1],
                       gmacps=(macs[label][0] / (ms * 1e-3) / 1e9) if ms > 0 else None)
        pred.stages.append(row)
    return pred


__all__ += ["LutError"]
