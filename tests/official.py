"""The authors' release as test data: its checkpoint key layouts and the original code's logits.

``tests/data/official/`` (see its README.md) holds, per released variant, the key names and shapes of the
authors' ``evalmodel.pt``, and, for B0 and T0, the logits their original code computes under the
deterministic weights below. The real checkpoints are not needed: filling every key of the layout with
``deterministic_weights`` and comparing our logits with the stored ones checks the checkpoint converter
and the model against the original implementation, in float64.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Sequence

import numpy as np
import torch

OFFICIAL_DIR = Path(__file__).resolve().parent / "data" / "official"

# our variant -> tag of its files (official_<tag>_state_dict_shapes.json); B2 is the release's config `b15`
TAGS = {
    "cpubone_nano": "nano", "cpubone_t0": "t0", "cpubone_s0": "s0", "cpubone_b0": "b0",
    "cpubone_b1": "b1", "cpubone_b2": "b2", "cpubone_b2_5": "b2_5", "cpubone_b3": "b3",
}


def official_shapes(tag: str) -> Dict[str, list]:
    """Key -> shape of the authors' checkpoint of variant ``tag`` (e.g. "b0")."""
    return json.loads((OFFICIAL_DIR / f"official_{tag}_state_dict_shapes.json").read_text())


def official_logits(tag: str) -> np.ndarray:
    """Logits of the original code for input ``np.random.default_rng(1).standard_normal((2, 3, 224, 224))``
    under ``deterministic_weights(official_shapes(tag), seed=0)``, float64, shape (2, 1000)."""
    return np.load(OFFICIAL_DIR / f"official_{tag}_logits_seed0.npy")


def deterministic_weights(shapes: Mapping[str, Sequence[int]], seed: int = 0) -> Dict[str, np.ndarray]:
    """Reproducible float64 values for every key of a checkpoint layout, with numpy alone.

    One ``np.random.default_rng(seed)`` is drawn from key by key in sorted key order, so the stored
    logits pin down every value. Per key, by its name and rank:

    - ``num_batches_tracked``: int64 zeros, no draw (a counter, not a weight);
    - ``running_var``: uniform in [0.5, 1.5) (positive, around BatchNorm's fresh 1);
    - ``running_mean``: normal, std 0.1;
    - other 1-d ``weight`` (norm scales): uniform in [0.5, 1.5);
    - other 1-d tensors (biases): normal, std 0.05;
    - everything else (conv and linear weights): normal, std 1/sqrt(fan_in), fan_in = product of all
      but the first dimension, so activations keep their scale through the depth of the network.
    """
    rng = np.random.default_rng(seed)
    weights: Dict[str, np.ndarray] = {}
    for key in sorted(shapes):
        shape = tuple(int(s) for s in shapes[key])
        if key.endswith("num_batches_tracked"):
            weights[key] = np.zeros(shape, dtype=np.int64)
            continue
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("running_mean"):
            value = rng.normal(0.0, 0.1, shape)
        elif len(shape) == 1 and key.endswith("weight"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 1:
            value = rng.normal(0.0, 0.05, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        weights[key] = np.asarray(value, dtype=np.float64)
    return weights


def official_state_dict(tag: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A state dict in the authors' layout for variant ``tag``, filled by ``deterministic_weights``."""
    return {k: torch.from_numpy(v) for k, v in deterministic_weights(official_shapes(tag), seed).items()}
