"""CPUBone models: building blocks, the model family, design configs, the factory and checkpoint handling."""
from .checkpoints import (
                     CheckpointError,
                     convert_state_dict,
                     detect_layout,
                     load_checkpoint,
                     read_state_dict,
                     save_pretrained,
)
from .config import (
                     ConfigError,
                     is_config_source,
                     load_config,
                     save_config,
                     variant_config,
)
from .cpubone import (
                     ARCH_KEYS,
                     VARIANTS,
                     ClassifierHead,
                     CPUBone,
                     CPUBoneBlock,
                     CPUBoneConfig,
                     CPUBoneStage,
)
from .factory import (
                     ResolvedName,
                     create_model,
                     is_cpubone,
                     list_models,
                     resolve_model_name,
)
from .layers import (
                     ConvAct,
                     ConvNormAct,
                     FusedMBConv,
                     GrFuMBConv,
                     GrMBConv,
                     Lowtention,
                     LowtentionInference,
                     MBConv,
                     lowtention_heads,
)
from .reparam import is_reparameterized, reparameterize, reparameterize_blocks

__all__ = [
    "CPUBone", "CPUBoneBlock", "CPUBoneStage", "ClassifierHead", "CPUBoneConfig", "VARIANTS",
    "ConvNormAct", "ConvAct", "LowtentionInference", "MBConv", "FusedMBConv", "GrMBConv", "GrFuMBConv", "Lowtention",
    "lowtention_heads", "create_model", "list_models", "resolve_model_name", "ResolvedName", "is_cpubone",
    "ARCH_KEYS", "ConfigError", "is_config_source", "load_config", "save_config", "variant_config",
    "CheckpointError", "load_checkpoint", "read_state_dict", "convert_state_dict", "detect_layout", "save_pretrained",
    "reparameterize", "reparameterize_blocks", "is_reparameterized",
]
