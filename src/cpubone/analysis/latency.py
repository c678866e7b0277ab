"""Batch-1 CPU latency with pinned threads in ONNX Runtime or eager, on the harness of ``cpubone.engines.timing``.

Method: build the engine (ONNX Runtime session with ``intra_op_num_threads=threads`` and
``inter_op_num_threads=1``, or the eager model under ``torch.inference_mode`` with
``torch.set_num_threads(threads)``), run ``warmup`` untimed calls, then time ``runs`` calls one by one
with ``time.perf_counter``; only the model call is inside the timed region (the input is prepared once).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, Union

import numpy as np

__all__ = ["LatencyResult", "time_callable", "summarize_times", "ort_session", "onnx_runner", "eager_runner",
           "measure_onnx", "measure_eager", "torch_threads"]


# the harness itself lives with the engines (deploy and analysis both time through it)
from ..engines.onnxruntime import ort_session  # noqa: E402
from ..engines.timing import LatencyResult, check_timing_args, summarize_times, time_callable  # noqa: E402,F401


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
