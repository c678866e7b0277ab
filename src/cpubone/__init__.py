"""cpubone: CPUBone vision backbones for CPUs, and the tools to measure, deploy, train and transfer them."""
from __future__ import annotations

from ._lazy import lazy_attributes

__version__ = "0.1.0"

# Resolved on first use (PEP 562) so that torch-free parts, such as the ONNX predictor in
# cpubone.deploy.predictor, can be imported where torch is not installed.
_LAZY = {name: ".models" for name in ("create_model", "list_models", "load_checkpoint", "save_pretrained",
                                        "CPUBone", "VARIANTS", "CheckpointError")}

__all__ = ["create_model", "list_models", "load_checkpoint", "save_pretrained", "CPUBone", "VARIANTS",
           "CheckpointError", "__version__"]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())
