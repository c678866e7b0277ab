"""TFLite / LiteRT export and timing, the path the paper used on phones (optional extra ``[mobile]``).

Needs ``litert-torch`` (PyTorch -> .tflite) and ``ai-edge-litert`` (the interpreter, XNNPACK on CPU).
They are not in the default environment: they pull in jax and transformers and pin an older
``typing_extensions``; install them with ``pip install 'cpubone[mobile]'`` in a separate environment.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..outputs import atomic_write, check_output_file
from .onnx import ExportReport, ExportVerificationError, VerifyResult, photo_inputs
from .preprocess import PreprocessConfig

__all__ = ["export_tflite", "export_tflite_model", "litert_interpreter", "measure_litert"]

_MISSING = ("TFLite export needs the optional packages litert-torch and ai-edge-litert: "
            "pip install 'cpubone[mobile]' (preferably in a separate environment; see docs/deployment.md)")


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{_MISSING} ({e})") from None


def export_tflite(model: nn.Module, path: Union[str, os.PathLike], input_size: Tuple[int, int] = (224, 224)) -> Path:
    """Convert ``model`` (eval, batch 1, float32, fixed size) to a .tflite file with litert-torch."""
    litert_torch = _require("litert_torch")
    model.eval()
    x = torch.randn(1, getattr(model, "in_chans", 3), *input_size)
    return atomic_write(path, lambda tmp: litert_torch.convert(model, (x,)).export(str(tmp)))


def litert_interpreter(path: Union[str, os.PathLike], threads: int = 1):
    """A LiteRT interpreter (XNNPACK CPU delegate) with ``threads`` threads, tensors allocated."""
    interp_mod = _require("ai_edge_litert.interpreter")
    it = interp_mod.Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    return it


def _run(it, x: np.ndarray) -> np.ndarray:
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def measure_litert(path: Union[str, os.PathLike], input_shape: Sequence[int], threads: int = 1, runs: int = 50,
                   warmup: int = 10, seed: int = 0):
    """Batch-1 latency of a .tflite file in LiteRT, timed by the project's one harness."""
    from ..engines.timing import time_callable

    it = litert_interpreter(path, threads)
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    inp = it.get_input_details()[0]["index"]
    it.set_tensor(inp, x)
    return time_callable(it.invoke, runs, warmup, threads, "litert")


def export_tflite_model(model: Union[str, nn.Module], output: Union[str, os.PathLike],
                        checkpoint: Optional[Union[str, os.PathLike]] = None,
                        input_size: Optional[Tuple[int, int]] = None, tolerance: float = 1e-4) -> ExportReport:
    """``cpubone export --format tflite``: inference form -> .tflite, verified against PyTorch.

    TFLite files have no free-form metadata like ONNX's ``metadata_props``; the preprocessing is that of
    ``PreprocessConfig.from_data_config(resolve_data_config(model=...))``.
    """
    from timm.data import resolve_data_config

    from ..models import CPUBone, create_model
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
    output = export_tflite(deploy_model, output, input_size)
    data_cfg = resolve_data_config(model=model)
    data_cfg["input_size"] = (getattr(model, "in_chans", 3), *input_size)
    cfg = PreprocessConfig.from_data_config(data_cfg)
    it = litert_interpreter(output)
    inputs = [("random", np.random.default_rng(0).standard_normal((1, cfg.input_size[0], *input_size)).astype(np.float32))]
    inputs += photo_inputs(cfg)
    report = ExportReport(str(output), name, tuple(input_size), False, 0, tolerance)
    for label, x in inputs:
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        out = _run(it, x)
        report.checks.append(VerifyResult(label, tuple(x.shape), float(np.abs(out - ref).max()),
                                          float(np.abs(ref).max()), bool((out.argmax(-1) == ref.argmax(-1)).all())))
    bad = [c for c in report.checks if not c.max_abs_diff <= tolerance * max(1.0, c.max_abs_ref)]
    if bad:
        os.replace(output, Path(str(output) + ".failed"))
        raise ExportVerificationError(f"{output}: LiteRT disagrees with PyTorch by {max(c.max_abs_diff for c in bad):.3g} "
                                      f"on {bad[0].input}")
    return report
