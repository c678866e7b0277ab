"""Eager PyTorch: the inference form called under ``torch.inference_mode`` (fp32, or bf16 autocast).

No file is written; this is the reference point for what the other runtimes add.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from .base import Engine, Runner
from .timing import LatencyResult, check_timing_args, time_callable

__all__ = ["EagerEngine", "torch_runner", "torch_threads", "eager_call", "measure_eager"]

# torch is imported inside the functions: the engines package stays importable without torch (the
# torch-free predictor loads ONNX, OpenVINO, LiteRT and ncnn files through it)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Pin torch's intra-op thread count for the duration of the block."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def eager_call(model, input_shape: Sequence[int], channels_last: bool = False, seed: int = 0) -> Callable[[], object]:
    """A zero-argument eager call of ``model`` (eval mode) on a fixed random input.

    Call it inside ``torch_threads(n)`` and ``torch.inference_mode()``.
    """
    import torch

    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(input_shape), generator=g)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return lambda: model(x)


def measure_eager(model, input_shape: Sequence[int], threads: int = 1, runs: int = 50, warmup: int = 10,
                  channels_last: bool = False, seed: int = 0) -> LatencyResult:
    """Batch-1 latency of a PyTorch model in eager mode under ``torch.inference_mode``."""
    import torch

    check_timing_args(threads, runs, warmup)
    fn = eager_call(model, input_shape, channels_last, seed)
    with torch_threads(threads), torch.inference_mode():
        return time_callable(fn, runs, warmup, threads, "eager" + ("-cl" if channels_last else ""))


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
