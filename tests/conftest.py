from pathlib import Path

import pytest
import torch

# One thread per test process: the suite runs on small shared CPUs, and results must not depend on it.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OFFICIAL = SHARED / "reference" / "official"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL.is_dir():
        pytest.fail(f"reference data missing: {OFFICIAL} (the shared/ folder beside the repo)")
    return OFFICIAL


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
