"""TFLite export and int8 quantization for the ``litert`` engine, the path the paper used on phones (optional extra ``[mobile]``).

Needs ``litert-torch`` (PyTorch -> .tflite) and ``ai-edge-litert`` (the interpreter, XNNPACK on CPU).
They are not in the default environment: they pull in jax and transformers and pin an older
``typing_extensions``; ``make mobile`` installs them in a separate environment, ``.venv-mobile``.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..outputs import atomic_write
from .base import ExportError
from .onnx_export import exporter_reason, quiet_exporter
from .xnnpack_form import regroup_convs

__all__ = ["export_tflite", "quantize_tflite"]

_MISSING = ("TFLite export needs the optional packages litert-torch and ai-edge-litert: "
            "pip install 'cpubone[mobile]' in a separate environment (make mobile; docs/deployment.md)")


def require_converter() -> None:
    """Raise ``ValueError`` naming the extra to install unless the TFLite converter is importable."""
    _require("litert_torch")


def _require(module: str):
    try:
        with quiet_exporter():  # importing the converter logs TensorFlow's C++ start-up lines
            return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{_MISSING} ({e})") from None


def export_tflite(model: nn.Module, path: Union[str, os.PathLike], input_size: Tuple[int, int] = (224, 224),
                  name: Optional[str] = None) -> Path:
    """Convert ``model`` (eval, batch 1, float32, fixed size) to a .tflite file with litert-torch.

    Dense convs with block-diagonal weights (the inference form's densified thin grouped convs) are
    converted as the grouped convs they are: LiteRT's XNNPACK runs those at full speed. The converter's
    progress lines and logs are silenced; a model it cannot convert raises ``ExportError`` naming ``name``
    (default: its architecture) and the converter's reason in one line.
    """
    litert_torch = _require("litert_torch")
    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    model = regroup_convs(model.eval())
    x = torch.randn(1, getattr(model, "in_chans", 3), *input_size)

    def write(tmp: Path) -> None:
        try:
            with quiet_exporter(), torch.no_grad():
                litert_torch.convert(model, (x,)).export(str(tmp))
        except OSError:
            raise  # the destination, not the model: atomic_write names the file
        except Exception as e:  # torch.export, the MLIR lowering and the converter raise many types
            raise ExportError(f"{name}: TFLite conversion failed ({exporter_reason(e)})") from e

    return atomic_write(path, write)


def quantize_tflite(path: Union[str, os.PathLike], output: Union[str, os.PathLike],
                    calib: Sequence[np.ndarray]) -> Path:
    """Full-integer int8 copy of a float .tflite file (ai-edge-quantizer's ``static_wi8_ai8`` recipe).

    Weights int8 per channel, activations int8 with ranges calibrated on ``calib`` ((1, C, H, W) float32
    samples, preprocessed as the model expects); input and output become int8 tensors, which the
    ``litert`` engine quantizes and dequantizes with their scales, so callers keep passing float32.
    """
    aeq = _require("ai_edge_quantizer")
    from ai_edge_litert.interpreter import Interpreter

    samples = [np.ascontiguousarray(x, dtype=np.float32) for x in calib]
    if not samples:
        raise ValueError("int8 quantization needs calibration samples")
    signature = Interpreter(model_path=str(path)).get_signature_list()
    (key, io), = signature.items()  # litert-torch writes one signature, serving_default, with one input
    data = {key: [{io["inputs"][0]: x} for x in samples]}

    def write(tmp: Path) -> None:
        with quiet_exporter():  # the quantizer prints progress bars and a size report
            q = aeq.quantizer.Quantizer(str(path), aeq.recipe.static_wi8_ai8())
            q.quantize(q.calibrate(data, num_threads=1)).export_model(str(tmp), overwrite=True)

    return atomic_write(output, write)
