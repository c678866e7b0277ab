import shutil
from pathlib import Path

import pytest
import torch

from official import OFFICIAL_DIR

# One thread per test process: the suite runs on small shared CPUs, and results must not depend on it.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def official_dir() -> Path:
    """tests/data/official: the authors' checkpoint layouts and the original code's logits (see official.py)."""
    return OFFICIAL_DIR


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights, biases and norm statistics, so that parity checks cover every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif t.ndim == 1 and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
    return model


def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm statistics and affines, as after training (fresh ones make folding a no-op); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.6 - 0.3)
    return model.eval()


def subset_imagefolder(src: Path, dst: Path, per_class: dict) -> Path:
    """Copy the first ``n`` images of every class of each split ``{split: n}`` from ``src`` to ``dst``."""
    for split, n in per_class.items():
        for cls in sorted((src / split).iterdir()):
            out = dst / split / cls.name
            out.mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, out / f.name)
    return dst
