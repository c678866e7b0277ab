"""Training and evaluation: the paper's recipe assembled from timm, DDP, checkpoints that survive a kill."""
from .data import SafeImageFolder, write_digits_imagefolder
from .engine import TrainConfig, TrainingDiverged, evaluate_checkpoint, load_training_state, train
from .recipes import Recipe, get_recipe

__all__ = ["train", "TrainConfig", "TrainingDiverged", "evaluate_checkpoint", "load_training_state", "Recipe",
           "get_recipe", "SafeImageFolder", "write_digits_imagefolder"]
