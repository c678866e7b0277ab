"""The project's one latency harness: batch-1 CPU latency with pinned threads, in ONNX Runtime or eager.

Method: build the engine (ONNX Runtime session with ``intra_op_num_threads=threads`` and
``inter_op_num_threads=1``, or the eager model under ``torch.inference_mode`` with
``torch.set_num_threads(threads)``), run ``warmup`` untimed calls, then time ``runs`` calls one by one
with ``time.perf_counter``; only the model call is inside the timed region (the input is prepared once).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, asdict
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np

__all__ = ["LatencyResult", "time_callable", "summarize_times", "ort_session", "onnx_runner", "eager_runner",
           "measure_onnx", "measure_eager", "torch_threads"]


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


def check_timing_args(threads: int, runs: int, warmup: int) -> None:
    """Reject a thread count below 1, no timed run, or negative warm-up, naming the value."""
    if threads < 1:
        raise ValueError(f"threads={threads}: need at least 1 thread")
    if runs < 1:
        raise ValueError(f"runs={runs}: need at least 1 timed run")
    if warmup < 0:
        raise ValueError(f"warmup={warmup}: cannot be negative")


def time_callable(fn: Callable[[], object], runs: int = 50, warmup: int = 10, threads: int = 1,
                  engine: str = "callable", times: Optional[List[float]] = None,
                  clock: Callable[[], float] = time.perf_counter) -> LatencyResult:
    """Time ``fn()`` ``runs`` times after ``warmup`` calls; returns median / p10 / p90 in ms.

    ``times``: a list the raw per-call times (ms) are appended to, for callers that interleave several
    models in rounds and summarize all rounds at the end (``summarize_times``).
    ``clock``: wall-clock ``time.perf_counter`` (latency); ``time.process_time`` gives the CPU time the
    call used, which other processes competing for the cores do not inflate (equal to the latency of a
    single-threaded call on an idle core).
    """
    check_timing_args(threads, runs, warmup)
    for _ in range(warmup):
        fn()
    run_times: List[float] = []
    for _ in range(runs):
        t0 = clock()
        fn()
        run_times.append((clock() - t0) * 1e3)
    if times is not None:
        times.extend(run_times)
    return summarize_times(run_times, warmup, threads, engine)


def summarize_times(times: Sequence[float], warmup: int, threads: int, engine: str) -> LatencyResult:
    """Median / p10 / p90 / mean / min of per-call times in ms."""
    arr = np.asarray(times, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no timed runs to summarize")
    return LatencyResult(
        median_ms=float(np.median(arr)), p10_ms=float(np.percentile(arr, 10)), p90_ms=float(np.percentile(arr, 90)),
        mean_ms=float(arr.mean()), min_ms=float(arr.min()), runs=int(arr.size), warmup=warmup, threads=threads,
        engine=engine,
    )


def ort_session(path: Union[str, os.PathLike], threads: int = 1, enable_profiling: bool = False,
                optimized_model_path: Optional[str] = None, profile_prefix: Optional[str] = None):
    """An ONNX Runtime CPU session with pinned thread counts and all graph optimizations on.

    ``enable_profiling`` needs ``profile_prefix`` (a path prefix for the trace file): ONNX Runtime would
    otherwise write it into the current directory.
    """
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads={threads}: need at least 1 thread")
    if enable_profiling and not profile_prefix:
        raise ValueError("profiling needs profile_prefix: where ONNX Runtime writes its trace file")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = enable_profiling
    if profile_prefix:
        so.profile_file_prefix = str(profile_prefix)
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_runner(path: Union[str, os.PathLike], input_shape: Sequence[int], threads: int = 1,
                seed: int = 0) -> Callable[[], object]:
    """A zero-argument call of an ONNX Runtime session on a fixed random input (prepared once, untimed)."""
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    feed = {name: x}
    return lambda: sess.run(None, feed)


def measure_onnx(path: Union[str, os.PathLike], input_shape: Sequence[int], threads: int = 1, runs: int = 50,
                 warmup: int = 10, seed: int = 0) -> LatencyResult:
    """Batch-1 latency of an ONNX file in ONNX Runtime."""
    check_timing_args(threads, runs, warmup)
    return time_callable(onnx_runner(path, input_shape, threads, seed), runs, warmup, threads, "onnxruntime")


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


def eager_runner(model, input_shape: Sequence[int], channels_last: bool = False, seed: int = 0) -> Callable[[], object]:
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
    fn = eager_runner(model, input_shape, channels_last, seed)
    with torch_threads(threads), torch.inference_mode():
        return time_callable(fn, runs, warmup, threads, "eager" + ("-cl" if channels_last else ""))
