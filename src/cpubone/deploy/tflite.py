"""TFLite / LiteRT export and timing, the path the paper used on phones (optional extra ``[mobile]``).

Needs ``litert-torch`` (PyTorch -> .tflite) and ``ai-edge-litert`` (the interpreter, XNNPACK on CPU).
They are not in the default environment: they pull in jax and transformers and pin an older
``typing_extensions``; ``make mobile`` installs them in a separate environment, ``.venv-mobile``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..outputs import atomic_write, atomic_write_text, check_output_file
from ..engines import get_engine
from ..engines.base import ExportError
from ..engines.verify import EngineVerificationError, verification_inputs, verify_fp32
from .onnx import ExportReport, ExportVerificationError, _quiet_exporter, _reason
from .preprocess import PreprocessConfig

__all__ = ["export_tflite", "export_tflite_model", "quantize_tflite", "measure_litert"]

_MISSING = ("TFLite export needs the optional packages litert-torch and ai-edge-litert: "
            "pip install 'cpubone[mobile]' in a separate environment (make mobile; docs/deployment.md)")


def _require(module: str):
    import importlib

    try:
        with _quiet_exporter():  # importing the converter logs TensorFlow's C++ start-up lines
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
    from ..engines.xnnpack_form import regroup_convs

    litert_torch = _require("litert_torch")
    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    model = regroup_convs(model.eval())
    x = torch.randn(1, getattr(model, "in_chans", 3), *input_size)

    def write(tmp: Path) -> None:
        try:
            with _quiet_exporter(), torch.no_grad():
                litert_torch.convert(model, (x,)).export(str(tmp))
        except OSError:
            raise  # the destination, not the model: atomic_write names the file
        except Exception as e:  # torch.export, the MLIR lowering and the converter raise many types
            raise ExportError(f"{name}: TFLite conversion failed ({_reason(e)})") from e

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
        with _quiet_exporter():  # the quantizer prints progress bars and a size report
            q = aeq.quantizer.Quantizer(str(path), aeq.recipe.static_wi8_ai8())
            q.quantize(q.calibrate(data, num_threads=1)).export_model(str(tmp), overwrite=True)

    return atomic_write(output, write)


def measure_litert(path: Union[str, os.PathLike], threads: int = 1, runs: int = 50, warmup: int = 10, seed: int = 0):
    """Batch-1 latency of a .tflite file in LiteRT (the ``litert`` engine), timed by the project's one harness."""
    from ..engines.timing import time_callable

    runner = get_engine("litert", for_load=True).load(path, threads)
    return time_callable(runner.timer(seed), runs, warmup, threads, "litert")


def export_tflite_model(model: Union[str, nn.Module], output: Union[str, os.PathLike],
                        checkpoint: Optional[Union[str, os.PathLike]] = None,
                        input_size: Optional[Tuple[int, int]] = None, tolerance: float = 1e-4) -> ExportReport:
    """``cpubone export --format tflite``: inference form -> .tflite, verified against PyTorch.

    TFLite files have no free-form metadata like ONNX's ``metadata_props``, so the preprocessing and class
    names go beside the file as ``FILE.tflite.json`` (what ``cpubone deploy`` writes too), where
    ``cpubone predict FILE.tflite`` reads them.
    """
    from ..models import CPUBone, create_model
    from .onnx import model_metadata
    from .reparam import reparameterize

    name = model if isinstance(model, str) else type(model).__name__
    _require("litert_torch")
    check_output_file(output)  # before the conversion, which takes minutes
    if isinstance(model, str):
        model = create_model(model, pretrained=checkpoint if checkpoint is not None else False)
    model.eval()
    if input_size is None:
        input_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:])
    deploy_model = reparameterize(model) if isinstance(model, CPUBone) else model
    meta = model_metadata(model, tuple(input_size), name=name)
    output = export_tflite(deploy_model, output, input_size, name=name)
    runner = get_engine("litert", for_load=True).load(output)
    report = ExportReport(str(output), name, tuple(input_size), False, 0, tolerance)
    try:
        report.checks = verify_fp32(runner, model, verification_inputs(PreprocessConfig.from_metadata(meta)), tolerance)
    except EngineVerificationError as e:
        os.replace(output, output.with_name(output.name + ".failed"))  # no unverified file under the asked name
        raise ExportVerificationError(str(e)) from None
    meta.update({"cpubone.engine": json.dumps("litert"), "cpubone.precision": json.dumps("fp32")})
    report.metadata_path = str(atomic_write_text(str(output) + ".json", json.dumps(meta, indent=2)))
    return report
