"""cpubone: CPUBone vision backbones for CPUs, and the tools to measure, deploy, train and transfer them."""
from .models import (
    VARIANTS,
    CheckpointError,
    CPUBone,
    create_model,
    list_models,
    load_checkpoint,
    save_pretrained,
)

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "load_checkpoint", "save_pretrained", "CPUBone", "VARIANTS",
           "CheckpointError", "__version__"]
