"""Deployment: inference form, ONNX export, int8, the torch-free predictor.

Names are resolved lazily: ``cpubone.deploy.predictor`` and ``cpubone.preprocess`` must import
without torch.
"""
from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "export_model": ".export",
    "export_tflite_model": ".export",
    "deploy_model": ".auto",
    "Predictor": ".predictor",
    "TorchPredictor": ".predictor",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
