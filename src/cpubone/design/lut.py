"""``cpubone design lut``: a latency lookup table of the design space, measured on this CPU.

Every unit (``cpubone.design.units``) the search space and the released variants can use at the chosen
input size is built from the real layers in its inference form, prepared by an engine of
``cpubone.engines`` (ONNX Runtime by default; OpenVINO, ExecuTorch, ncnn, LiteRT, eager; fp32, bf16 or
int8 as that engine runs it, quantized by the engine's own quantizer as ``cpubone deploy`` quantizes) and
timed alone at batch 1 with the project's one timing loop (``cpubone.engines.timing``). An entry
is the unit's median time minus the runtime's per-call overhead, measured the same way on a one-op
graph. What a whole network costs beyond the sum of its parts is measured once per input size on two
reference networks (``REFERENCES``: CPUBone-Nano with one block per attention stage, and a B0 with more
blocks), timed in interleaved rounds with their own units: their latencies against the sums of their
entries give a fixed overhead (the call, the input copy) and a scale (weights and activations that a
unit timed alone finds hot in cache and a whole network does not), so that

    predicted latency = fixed overhead + scale x sum of entries.

At more than one thread, timing hundreds of small sessions is noisy (each session's worker threads are
placed anew by the OS, and any other task on the machine stalls a call's parallel sections): the units
share one ONNX Runtime thread pool (``cpubone.engines.onnxruntime.share_thread_pool``, which the
``cpubone design lut`` command sets up for its process), are timed in several passes over the whole list
and keep their fastest pass (``estimate_ms``).

Clock: wall time (``perf_counter``) by default; ``clock="cpu"`` (one thread only) times the CPU time a
call uses, which other processes do not inflate: on a machine shared beyond its cores, a whole network is
preempted many times per call while a unit of 0.1 ms rarely is, so wall-clock tables and measurements
there disagree by the load, not by the method.

The table is a portable JSON file naming the machine, engine, precision, threads and library versions, so
it can be
measured on the target device (a Raspberry Pi with the project installed) and searched anywhere. It is
written after every few entries, and a later call with the same file measures only what is missing.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.data import resolve_data_config

from ..engines import PRECISIONS, engine_class, get_engine, inference_form
from ..engines.base import Runner
from ..engines.machine import machine_info
from ..engines.timing import check_timing_args, time_interleaved
from ..engines.verify import photo_samples
from ..models import create_model, load_config
from ..models.macs import count_macs, count_params
from ..outputs import atomic_write_text, check_output_file
from ..progress import StepProgress
from .units import Unit, make_unit, model_units

__all__ = ["LUT_FORMAT", "CLOCKS", "REFERENCES", "LatencyTable", "LutError", "build_lut", "load_lut",
           "unit_runner", "overhead_runner", "model_runner", "time_rounds", "estimate_ms", "calibrate", "fit_overhead",
           "unit_work", "unit_calibration", "check_table_for"]

LUT_FORMAT = "cpubone-lut/1"
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# the calibration networks: a small one (the fixed overhead is not lost in its noise) and a larger one
# (the scale); neither is a released variant, so those stay independent checks of the predictor
REFERENCES = ({"name": "reference_small", "base": "cpubone_nano", "depths": [0, 1, 1, 1, 1]},
              {"name": "reference_large", "base": "cpubone_b0", "depths": [0, 1, 2, 4, 4]})
UNIT_PASSES = 3  # passes over the units at more than one thread (build_lut)
SCALE_RANGE = (0.8, 1.5)  # outside it the two references disagree too much (noise): scale 1 is used


class LutError(ValueError):
    """A latency table that cannot be read, or does not fit the request (the message names the file)."""


@dataclass
class LatencyTable:
    """Measured unit latencies (ms, per-call overhead removed) of one machine, engine and thread count."""

    engine: str
    threads: int
    machine: Dict[str, Any]
    overhead_ms: float = 0.0  # one runtime call on a negligible graph
    entries: Dict[str, Dict[str, float]] = field(default_factory=dict)
    runs: int = 0
    path: Optional[str] = None
    clock: str = "wall"
    fixed_ms: Dict[str, float] = field(default_factory=dict)  # per "HxW": a network's cost beyond its units
    scale: Dict[str, float] = field(default_factory=dict)  # per "HxW": whole network / sum of its units
    precision: str = "fp32"  # as the engine runs the units (int8: quantized by the engine's quantizer)

    def ms(self, key: str) -> float:
        return self.entries[key]["ms"]

    def fixed_overhead(self, size: Sequence[int]) -> float:
        """The measured fixed overhead at ``size`` (H, W); the per-call overhead where none was measured."""
        return self.fixed_ms.get(f"{int(size[0])}x{int(size[1])}", self.overhead_ms)

    def scale_at(self, size: Sequence[int]) -> float:
        """The measured scale of the sum of entries at ``size`` (1 where none was measured)."""
        return self.scale.get(f"{int(size[0])}x{int(size[1])}", 1.0)

    def predict_ms(self, entries_sum: float, size: Sequence[int]) -> float:
        return self.fixed_overhead(size) + self.scale_at(size) * entries_sum

    def missing(self, keys: Iterable[str]) -> List[str]:
        return sorted({k for k in keys if k not in self.entries})

    def describe(self) -> str:
        m = self.machine
        return (f"{m.get('cpu', '?')} ({m.get('arch', '?')}), {self.engine} {self.precision}, "
                f"{self.threads} thread(s), {self.clock} clock, {len(self.entries)} entries")

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=LUT_FORMAT, engine=self.engine, precision=self.precision, threads=self.threads,
                    clock=self.clock,
                    machine=self.machine, overhead_ms=self.overhead_ms, fixed_ms=self.fixed_ms, scale=self.scale,
                    runs=self.runs,
                    entries=dict(sorted(self.entries.items())))

    def save(self, path: os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a kill leaves the old table or the new one, never half of one; a special file is never replaced
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        self.path = str(path)
        return path


def load_lut(path: os.PathLike) -> LatencyTable:
    """Read a table written by ``build_lut``; raises ``LutError`` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise LutError(f"{path}: no such latency table")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != LUT_FORMAT:
        raise LutError(f"{path}: not a cpubone latency table (expected format {LUT_FORMAT!r})")
    for key in ("engine", "threads", "machine", "entries"):
        if key not in raw:
            raise LutError(f"{path}: missing key {key!r}")
    entries = raw["entries"]
    for k, v in entries.items():
        if not isinstance(v, dict) or any(not isinstance(v.get(f), (int, float)) for f in ("ms", "macs", "params")):
            raise LutError(f"{path}: entry {k!r} needs numbers 'ms', 'macs' and 'params'")
        try:
            Unit.from_key(k)
        except ValueError:
            raise LutError(f"{path}: entry {k!r} is not a unit key") from None
    if raw.get("precision", "fp32") not in PRECISIONS:
        raise LutError(f"{path}: precision {raw.get('precision')!r} is not one of {', '.join(PRECISIONS)}")
    if raw.get("clock", "wall") not in CLOCKS:
        raise LutError(f"{path}: clock {raw.get('clock')!r} is not one of {', '.join(CLOCKS)}")
    return LatencyTable(engine=raw["engine"], threads=int(raw["threads"]), machine=raw["machine"],
                        precision=raw.get("precision", "fp32"),
                        overhead_ms=float(raw.get("overhead_ms", 0.0)), entries=entries, runs=int(raw.get("runs", 0)),
                        path=str(path), clock=raw.get("clock", "wall"),
                        fixed_ms={str(k): float(v) for k, v in (raw.get("fixed_ms") or {}).items()},
                        scale={str(k): float(v) for k, v in (raw.get("scale") or {}).items()})


def unit_calibration(shape: Sequence[int], n: int = 4, seed: int = 0) -> List[np.ndarray]:
    """int8 calibration samples for a unit alone: standard-normal maps of its input shape.

    A unit's input is a feature map inside the network, not an image; its int8 kernels and their time do not
    depend on the calibrated ranges, only on the graph the quantizer makes, which is the one ``deploy`` makes
    (the same engine quantizer, the same node groups). The whole networks (references, designs) are
    calibrated on photos, as ``deploy`` calibrates them.
    """
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(shape)).astype(np.float32) for _ in range(n)]


def unit_runner(unit: Unit, engine: str, threads: int, precision: str = "fp32") -> Runner:
    """``unit`` prepared alone at batch 1 in ``engine`` x ``precision`` (the engine's own export and quantizer)."""
    calib = unit_calibration(unit.input_shape) if precision == "int8" else None
    return get_engine(engine).prepare(make_unit(unit), unit.input_shape, precision, threads, calib=calib)


class _OneOp(nn.Module):
    """A one-op graph: what a runtime call costs when the work is negligible (64 MACs). A conv, not a bare
    activation: ncnn crashes running a graph that holds only a ReLU."""

    in_chans = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def overhead_runner(engine: str, threads: int) -> Runner:
    """The per-call cost of ``engine``: a one-op graph, fp32 (what a call costs does not depend on precision)."""
    torch.manual_seed(0)
    return get_engine(engine).prepare(_OneOp().eval(), (1, 8, 1, 1), "fp32", threads)


def unit_work(unit: Unit) -> Tuple[int, int]:
    """MACs and params of a unit, counted on its training form (the work of the released model; the
    inference form may densify thin grouped convs, which runs faster but counts more)."""
    module = make_unit(unit, inference_form=False)
    return count_macs(module, unit.input_shape).total, count_params(module)


def model_runner(config: Dict[str, Any], size: Sequence[int], engine: str, threads: int,
                 precision: str = "fp32", calib: Optional[Sequence[np.ndarray]] = None) -> Runner:
    """The whole design ``config`` at batch 1 in the form ``cpubone deploy`` deploys it (int8 calibrated on
    ``calib``, default the built-in sample photos through the model's eval preprocessing)."""
    torch.manual_seed(0)
    model = create_model(dict(config)).eval()
    shape = (1, 3, int(size[0]), int(size[1]))
    if precision == "int8" and calib is None:
        data_cfg = resolve_data_config(model=model)
        data_cfg["input_size"] = shape[1:]
        calib = photo_samples(data_cfg)
    return get_engine(engine).prepare(inference_form(model), shape, precision, threads, calib=calib)


def time_rounds(runners: Dict[str, Runner], threads: int, rounds: int, runs: int, warmup: int,
                clock: str = "wall") -> Dict[str, List[float]]:
    """Per-call times (ms) of every runner, timed in ``rounds`` interleaved rounds of ``runs`` calls each, so
    that a change of load on the machine hits all runners alike (summarize them with ``estimate_ms``).

    The project's one timing loop (``time_interleaved``): at one thread the rounds after the first warm up
    with one call; at more, every round warms up with ``warmup`` calls (at least 3; see ``time_interleaved``).
    """
    times: Dict[str, List[float]] = {}
    time_interleaved({k: r.timer() for k, r in runners.items()}, runs * rounds, warmup, rounds, threads,
                     later_warmup=1 if threads == 1 else warmup, clock=CLOCKS[clock], times=times)
    return times


def estimate_ms(times: Sequence[float], runs: int, threads: int) -> float:
    """A runner's latency from its ``time_rounds`` times: the median of all calls at one thread; at more,
    the fastest round's median.

    A call at one thread leaves the other cores to whatever else runs on the machine. A call at as many
    threads as there are cores is stalled at every parallel section by any other runnable task, so its slow
    rounds measure that interference, not the network: on the 2-core AMD EPYC the same unit's median moved
    by up to 2.4x between two table builds a minute apart, and the fastest of several rounds spread over
    the build is the repeatable figure.
    """
    if threads == 1 or len(times) <= runs:
        return statistics.median(times)
    return min(statistics.median(times[i:i + runs]) for i in range(0, len(times) - runs + 1, runs))


def _measure(runner: Runner, threads: int, runs: int, warmup: int, clock: str, rounds: int = 1) -> float:
    return estimate_ms(time_rounds({"x": runner}, threads, rounds, runs, warmup, clock)["x"], runs, threads)


def fit_overhead(measured: Sequence[float], sums: Sequence[float], call_ms: float) -> Tuple[float, float]:
    """(fixed overhead, scale) with measured = fixed + scale x sum through the small and the large reference.

    Falls back to scale 1 and fixed = small reference - its sum when the references disagree beyond
    ``SCALE_RANGE``; the fixed overhead is at least one call.
    """
    (m_s, m_l), (s_s, s_l) = measured, sums
    scale = (m_l - m_s) / (s_l - s_s) if s_l > s_s else 1.0
    if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        scale = 1.0
    fixed = m_s - scale * s_s
    if fixed < call_ms:  # a small network cannot cost less than its call: keep the call, refit the scale
        fixed = call_ms
        scale = min(max((m_l - fixed) / s_l, SCALE_RANGE[0]), SCALE_RANGE[1]) if s_l > 0 else 1.0
    return fixed, scale


def calibrate(table: LatencyTable, size: Sequence[int], runs: int = 10, rounds: int = 5,
              calib: Optional[Sequence[np.ndarray]] = None) -> Tuple[float, float]:
    """Measure the fixed overhead and the scale at ``size`` on ``REFERENCES`` (module doc) into ``table``."""
    refs = [load_config(r) for r in REFERENCES]
    ref_units = [[u for _, u in model_units(cfg, size)] for cfg in refs]
    runners = {"call": overhead_runner(table.engine, table.threads)}
    for cfg in refs:
        runners["model:" + cfg["name"]] = model_runner(cfg, size, table.engine, table.threads, table.precision, calib)
    for u in dict.fromkeys(u for units in ref_units for u in units):
        runners[u.key] = unit_runner(u, table.engine, table.threads, table.precision)
    med = {k: estimate_ms(v, runs, table.threads) for k, v in
           time_rounds(runners, table.threads, rounds, runs, 3, table.clock).items()}
    sums = [sum(max(med[u.key] - med["call"], 0.0) for u in units) for units in ref_units]  # as entries are kept
    fixed, scale = fit_overhead([med["model:" + cfg["name"]] for cfg in refs], sums, med["call"])
    key = f"{int(size[0])}x{int(size[1])}"
    table.fixed_ms[key], table.scale[key] = round(fixed, 5), round(scale, 5)
    return fixed, scale


def check_table_for(table: LatencyTable, engine: Optional[str] = None, precision: Optional[str] = None) -> None:
    """Refuse a table measured for another engine or precision than the one asked for, naming both."""
    if engine is not None and table.engine != engine or precision is not None and table.precision != precision:
        raise LutError(f"{table.path or 'latency table'}: measured with {table.engine} {table.precision}, "
                       f"not {engine or table.engine} {precision or table.precision}; "
                       f"measure one with `cpubone design lut --engine {engine or table.engine} "
                       f"--precision {precision or table.precision}`")


def build_lut(
    units: Iterable[Unit],
    output: os.PathLike,
    engine: str = "onnxruntime",
    threads: int = 1,
    runs: int = 20,
    warmup: int = 5,
    progress: bool = True,
    save_every_s: float = 10.0,
    clock: str = "wall",
    sizes: Sequence[Sequence[int]] = (),
    precision: str = "fp32",
    calib: Optional[Sequence[np.ndarray]] = None,
) -> LatencyTable:
    """Measure every unit not yet in the table at ``output`` and write the table there.

    Args:
        units: the units to cover (``space_units`` of a search space, ``model_units`` of a design).
        output: the JSON table; an existing one measured with the same engine, precision, threads and CPU is
            extended (entries already there are reused, not measured again).
        engine: any engine of ``cpubone.engines`` that is installed (onnxruntime, openvino, executorch, ncnn,
            litert, eager, compile).
        precision: fp32, bf16 or int8, as the engine runs it; int8 units are quantized by the engine's own
            quantizer, as ``cpubone deploy`` quantizes a network (``unit_calibration``).
        calib: int8 only: preprocessed (1, 3, H, W) samples to calibrate the whole reference networks on
            (default the built-in sample photos).
        threads: intra-op threads.
        runs / warmup: timed and untimed calls per unit (the median is kept).
        progress: a progress bar on the terminal.
        save_every_s: write the table at least this often while measuring (a kill loses less).
        clock: 'wall' (latency) or 'cpu' (CPU time per call, one thread only; see the module doc).
        sizes: input sizes (H, W) whose fixed overhead and scale to measure (``calibrate``) if the table
            lacks them.
    """
    engine_class(engine).require()
    engine_class(engine).check_precision(precision)
    check_timing_args(threads, runs, warmup)
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}: expected one of {', '.join(CLOCKS)}")
    if clock == "cpu" and threads != 1:
        raise ValueError(f"clock='cpu' with threads={threads}: CPU time is the latency of one thread only")
    output = check_output_file(output)  # before minutes of measuring: a folder, read-only or full disk fail now
    here = machine_info().to_dict()
    if output.is_file():
        table = load_lut(output)
        if table.engine != engine or table.precision != precision or table.threads != threads or table.clock != clock:
            raise LutError(f"{output}: measured with {table.engine} {table.precision} at {table.threads} thread(s) "
                           f"({table.clock} clock), not {engine} {precision} at {threads} ({clock} clock); "
                           "write to another file")
        if table.machine.get("cpu") != here["cpu"] or table.machine.get("arch") != here["arch"]:
            raise LutError(f"{output}: measured on {table.machine.get('cpu')!r}, this is {here['cpu']!r}; "
                           "write to another file")
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        table = LatencyTable(engine=engine, threads=threads, machine=here, precision=precision, runs=runs, clock=clock)
    todo = [u for u in dict.fromkeys(units) if u.key not in table.entries]
    calib_sizes = [tuple(int(v) for v in sz) for sz in sizes
                   if f"{int(sz[0])}x{int(sz[1])}" not in table.fixed_ms or f"{int(sz[0])}x{int(sz[1])}" not in table.scale]
    passes = 1 if threads == 1 else UNIT_PASSES
    with StepProgress(progress, passes * len(todo) + len(calib_sizes), width=44) as step:
        # the per-call overhead, measured beside the entries in this session
        overhead = _measure(overhead_runner(engine, threads), threads, max(runs, 50), warmup, clock, rounds=passes)
        table.overhead_ms = overhead if not table.entries else statistics.median([table.overhead_ms, overhead])
        last = time.monotonic()
        for sz in calib_sizes:
            step(f"overhead and scale at {sz[0]}x{sz[1]}")
            calibrate(table, sz, runs=max(runs // 2, 3), calib=calib)
        # At more than one thread every unit is timed in several passes over the whole list and keeps its
        # fastest pass (``estimate_ms``): the runners stay alive between passes, so a burst of load on the
        # machine hits one pass of a unit, not the unit.
        runners: Dict[str, Runner] = {}
        best: Dict[str, float] = {}
        work: Dict[str, Tuple[int, int]] = {}
        for p in range(passes):
            for unit in todo:
                step(unit.key if passes == 1 else f"{unit.key} (pass {p + 1}/{passes})")
                runner = runners.get(unit.key) or unit_runner(unit, engine, threads, precision)
                if passes > 1:
                    runners[unit.key] = runner
                ms = min(_measure(runner, threads, runs, warmup, clock), best.get(unit.key, float("inf")))
                best[unit.key] = ms
                if p == 0:
                    work[unit.key] = unit_work(unit)
                macs, params = work[unit.key]
                table.entries[unit.key] = dict(ms=round(max(ms - overhead, 0.0), 5), macs=macs, params=params)
                if time.monotonic() - last > save_every_s:
                    table.save(output)
                    last = time.monotonic()
        step(None)
    table.save(output)
    return table
