"""Eager PyTorch: the inference form called under ``torch.inference_mode`` (fp32, or bf16 autocast).

No file is written; this is the reference point for what the other runtimes add.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .base import Engine, Runner

__all__ = ["EagerEngine", "torch_runner"]


def torch_runner(fn, threads: int, dtype=None):
    """``fn`` (torch tensor -> tensor) as a numpy -> numpy call at ``threads`` intra-op threads.

    ``dtype``: run under CPU autocast to that dtype (bf16), returning float32.
    """
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            t = torch.from_numpy(x)
            if dtype is None:
                return fn(t).float().numpy()
            with torch.autocast("cpu", dtype=dtype):
                return fn(t).float().numpy()

    return run


class EagerEngine(Engine):
    name = "eager"
    title = "PyTorch eager"
    extra = "all"
    modules = ("torch",)
    load_modules = ("torch",)
    precisions = ("fp32", "bf16")

    def _prepare(self, model, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        import torch

        model = model.eval()
        dtype = torch.bfloat16 if precision == "bf16" else None
        return Runner(self.name, precision, threads, input_shape, torch_runner(model, threads, dtype),
                      info=dict(_model=model))
