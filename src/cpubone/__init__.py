"""cpubone: CPUBone vision backbones for CPUs, and the tools to measure, deploy, train and transfer them."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Resolved on first use (PEP 562) so that torch-free parts, such as the ONNX predictor in
# cpubone.deploy.predictor, can be imported where torch is not installed.
_LAZY = {name: ".models" for name in ("create_model", "list_models", "load_checkpoint", "save_pretrained",
                                        "CPUBone", "VARIANTS", "CheckpointError")}

__all__ = ["create_model", "list_models", "load_checkpoint", "save_pretrained", "CPUBone", "VARIANTS",
           "CheckpointError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
