import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from official import OFFICIAL_DIR

# Subprocesses that train get no stdin and a session of their own: under pytest-xdist a worker talks to its
# controller over stdin/stdout, and workers waiting on such a subprocess were seen to die ("node down") in full
# runs; neither the child nor anything it starts may touch the worker's channel or its process group.
ISOLATED = dict(stdin=subprocess.DEVNULL, start_new_session=True)

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


# --- a trained model, for judging low precision (random weights give every input the same class) ---
DIGITS_SIZE = 32


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """scikit-learn's digits as an ImageFolder (train/ and val/, class folders '0'..'9', 32 px PNGs)."""
    from cpubone.train.data import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=DIGITS_SIZE)


def digits_config():
    from cpubone.preprocess import PreprocessConfig

    return PreprocessConfig(input_size=(3, DIGITS_SIZE, DIGITS_SIZE), crop_pct=1.0)


def load_split(folder: Path):
    """(float32 inputs (N, 3, S, S), int labels) of an ImageFolder split, preprocessed as deployed."""
    import numpy as np

    from cpubone.preprocess import preprocess
    from cpubone.images import list_images

    files = list_images(folder)
    cfg = digits_config()
    x = np.stack([preprocess(f, cfg) for f in files])
    y = np.array([int(f.parent.name) for f in files])
    return x, y


@pytest.fixture(scope="session")
def trained_nano(digits_folder):
    """cpubone_nano trained on the digits for a few epochs (about 90% val top-1): (training-form model, val x, val y).

    Its pretrained_cfg carries the digits' preprocessing and class names, as ``save_pretrained`` would.
    """
    from cpubone.models import create_model

    x, y = load_split(digits_folder / "train")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model("cpubone_nano", num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    epochs, batch = 5, 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(xt) // batch))
    model.train()
    for epoch in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(batch):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    cfg = digits_config()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std,
                                crop_pct=cfg.crop_pct, label_names=[str(i) for i in range(10)])
    vx, vy = load_split(digits_folder / "val")
    return model, vx, vy
