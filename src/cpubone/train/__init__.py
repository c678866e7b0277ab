"""Training and evaluation: one training loop (DDP, AMP, EMA, checkpoints that survive a kill) and the
classification task with the authors' release recipe, the paper's summary and small-data presets."""
from .classification import TrainConfig, evaluate_checkpoint, resolved_config, train
from .data import SafeImageFolder, write_digits_imagefolder
from .loop import TrainingDiverged, load_training_state
from .recipes import Recipe, get_recipe

__all__ = ["train", "TrainConfig", "TrainingDiverged", "evaluate_checkpoint", "load_training_state", "Recipe",
           "get_recipe", "resolved_config", "SafeImageFolder", "write_digits_imagefolder"]
