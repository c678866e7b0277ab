"""The project's one latency harness: batch-1 CPU latency with pinned threads, in ONNX Runtime or eager.

Method: build the engine (ONNX Runtime session with ``intra_op_num_threads=threads`` and
``inter_op_num_threads=1``, or the eager model under ``torch.inference_mode`` with
``torch.set_num_threads(threads)``), run ``warmup`` untimed calls, then time ``runs`` calls one by one
with ``time.perf_counter``; only the model call is inside the timed region (the input is prepared once).
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np

__all__ = ["LatencyResult", "time_callable", "ort_session", "measure_onnx", "measure_eager", "torch_threads"]


@dataclass
class LatencyResult:
    """Latency statistics in milliseconds over ``runs`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    warmup: int
    threads: int
    engine: str

    def macps(self, macs: int) -> float:
        """Achieved GMAC/s for a model of ``macs`` MACs (MACs / median latency)."""
        return macs / (self.median_ms * 1e-3) / 1e9

    def to_dict(self) -> dict:
        return asdict(self)


def _check(threads: int, runs: int, warmup: int) -> None:
    if threads < 1:
        raise ValueError(f"threads={threads}: need at least 1 thread")
    if runs < 1:
        raise ValueError(f"runs={runs}: need at least 1 timed run")
    if warmup < 0:
        raise ValueError(f"warmup={warmup}: cannot be negative")


def time_callable(fn: Callable[[], object], runs: int = 50, warmup: int = 10, threads: int = 1,
                  engine: str = "callable") -> LatencyResult:
    """Time ``fn()`` ``runs`` times after ``warmup`` calls; returns median / p10 / p90 in ms."""
    _check(threads, runs, warmup)
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    arr = np.asarray(times)
    return LatencyResult(
        median_ms=float(np.median(arr)), p10_ms=float(np.percentile(arr, 10)), p90_ms=float(np.percentile(arr, 90)),
        mean_ms=float(arr.mean()), min_ms=float(arr.min()), runs=runs, warmup=warmup, threads=threads, engine=engine,
    )


def ort_session(path: Union[str, os.PathLike], threads: int = 1, enable_profiling: bool = False,
                optimized_model_path: Optional[str] = None):
    """An ONNX Runtime CPU session with pinned thread counts and all graph optimizations on."""
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads={threads}: need at least 1 thread")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = enable_profiling
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def measure_onnx(path: Union[str, os.PathLike], input_shape: Sequence[int], threads: int = 1, runs: int = 50,
                 warmup: int = 10, seed: int = 0) -> LatencyResult:
    """Batch-1 latency of an ONNX file in ONNX Runtime."""
    _check(threads, runs, warmup)
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    feed = {name: x}
    return time_callable(lambda: sess.run(None, feed), runs, warmup, threads, "onnxruntime")


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


def measure_eager(model, input_shape: Sequence[int], threads: int = 1, runs: int = 50, warmup: int = 10,
                  channels_last: bool = False, seed: int = 0) -> LatencyResult:
    """Batch-1 latency of a PyTorch model in eager mode under ``torch.inference_mode``."""
    import torch

    _check(threads, runs, warmup)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(input_shape), generator=g)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch_threads(threads), torch.inference_mode():
        return time_callable(lambda: model(x), runs, warmup, threads, "eager" + ("-cl" if channels_last else ""))
