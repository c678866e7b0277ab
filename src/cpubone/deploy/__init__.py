"""Deployment: inference form, ONNX export, int8, the torch-free predictor.

Names are resolved lazily: ``cpubone.deploy.predictor`` and ``cpubone.deploy.preprocess`` must import
without torch.
"""
from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "reparameterize": ".reparam",
    "to_onednn": ".onednn",
    "export_onnx": ".onnx",
    "export_model": ".onnx",
    "verify_onnx": ".onnx",
    "quantize_onnx": ".quantize",
    "Predictor": ".predictor",
    "TorchPredictor": ".predictor",
    "PreprocessConfig": ".preprocess",
    "preprocess": ".preprocess",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
