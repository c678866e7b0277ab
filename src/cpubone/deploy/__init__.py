"""Deployment: inference form, ONNX export, int8, the torch-free predictor.

Names are resolved lazily: ``cpubone.deploy.predictor`` and ``cpubone.deploy.preprocess`` must import
without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "reparameterize": ".reparam",
    "to_onednn": ".onednn",
    "export_onnx": ".onnx",
    "export_model": ".onnx",
    "verify_onnx": ".onnx",
    "quantize_onnx": ".quantize",
    "Predictor": ".predictor",
    "PreprocessConfig": ".preprocess",
    "preprocess": ".preprocess",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
