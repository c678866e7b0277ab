"""The project's one latency harness: batch-1 CPU latency of zero-argument calls, pinned threads.

Method: run ``warmup`` untimed calls, then time ``runs`` calls one by one with ``time.perf_counter``;
only the model call is inside the timed region (the input is prepared once). ``time_interleaved``
times several calls in rounds (a few runs of each in turn), so a burst of load from elsewhere on the
machine hits every candidate alike and the ratios between them stay meaningful.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

# Before timing a call at more than one thread, wait this long: the worker threads of the runtime timed just
# before (another ONNX Runtime session, OpenVINO, torch) spin for a while after their last call before they
# park, and on a small CPU they take the cores from the call being timed. Interleaved timing switches
# between many such runtimes; without the pause, 0.1 ms units timed in turn with B0's other units at two
# threads measured 1.6x what they take one session at a time (design LUT, 2-core AMD EPYC).
SETTLE_S = 0.02

__all__ = ["LatencyResult", "SETTLE_S", "check_timing_args", "time_callable", "summarize_times", "time_interleaved"]


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
    if threads > 1:
        time.sleep(SETTLE_S)  # let the previous runtime's spinning threads park (see SETTLE_S)
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


def time_interleaved(calls: Dict[str, Callable[[], object]], runs: int = 50, warmup: int = 10, rounds: int = 5,
                     threads: int = 1, step: Optional[Callable[[str], None]] = None,
                     later_warmup: Optional[int] = None, clock: Callable[[], float] = time.perf_counter,
                     times: Optional[Dict[str, List[float]]] = None) -> Dict[str, LatencyResult]:
    """Time every call of ``calls`` in ``rounds`` interleaved rounds of about ``runs / rounds`` calls each:
    the one timing loop of bench, blocks, profile, design, deploy and the downstream bench.

    Args:
        runs: timed calls per call in all (split over the rounds).
        warmup: untimed calls before each call's first round.
        later_warmup: untimed calls before each later round; by default ``min(warmup, 2)`` (brings the
            call's weights back into cache after the others ran). At more than one thread it is at least 3:
            a thread pool switched in after other runtimes ran needs a few calls to reach the steady state
            it has inside a whole network (B0's design units at two threads, switched in with one warm-up
            call each, summed to 1.3-1.6x what they take timed one after another on a 2-core AMD EPYC).
        clock: ``time.perf_counter`` (latency) or ``time.process_time`` (CPU time, one thread only).
        step: called with a label before each round (a progress bar).
        times: a dict the raw per-call times (ms) are appended to, per name, in round order (callers that
            summarize rounds their own way, e.g. the fastest round).

    Before every call at more than one thread the harness pauses ``SETTLE_S`` (``time_callable``).
    """
    check_timing_args(threads, runs, warmup)
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need at least 1 round")
    rounds = min(rounds, runs)
    chunks = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
    later = min(warmup, 2) if later_warmup is None else later_warmup
    if threads > 1:
        later = max(later, 3)
    raw: Dict[str, List[float]] = {k: [] for k in calls}
    for r, chunk in enumerate(chunks):
        if step is not None:
            step(f"timing round {r + 1}/{rounds}")
        for name, fn in calls.items():
            time_callable(fn, chunk, warmup if r == 0 else later, threads, name, times=raw[name], clock=clock)
    if times is not None:
        for k, v in raw.items():
            times.setdefault(k, []).extend(v)
    return {k: summarize_times(v, warmup, threads, k) for k, v in raw.items()}
