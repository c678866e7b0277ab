"""ONNX export of CPUBone (and any timm model) for ONNX Runtime, the paper's CPU path."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["export_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_size: Tuple[int, int] = (224, 224),
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Optional[Dict[str, str]] = None,
) -> Path:
    """Export ``model`` (eval mode, batch 1, float32) to ``path`` with input ``input`` and output ``output``.

    Args:
        input_size: (H, W) of the traced input.
        dynamic: make batch, height and width symbolic so any size runs in ONNX Runtime.
        opset: ONNX opset.
        metadata: string key/values stored in the model's ``metadata_props``.

    Uses the TorchScript exporter: it traces CPUBone's shape arithmetic into the graph, so a dynamic
    export stays correct at sizes other than the traced one. The file is written atomically.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    in_chans = getattr(model, "in_chans", 3)
    x = torch.randn(1, in_chans, *input_size)
    tmp = path.with_name(path.name + ".tmp")
    dynamic_axes = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}} if dynamic else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(tmp), input_names=["input"], output_names=["output"], opset_version=opset,
                dynamic_axes=dynamic_axes, dynamo=False, do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    if metadata:
        proto = onnx.load(str(tmp))
        for k, v in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = str(k), str(v)
        onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path
