"""``cpubone design lut``: a latency lookup table of the design space, measured on this CPU.

Every unit (``cpubone.design.units``) the search space and the released variants can use at the chosen
input size is built from the real layers in its inference form, exported to ONNX and timed alone at
batch 1 with the project's timing harness (ONNX Runtime with pinned threads, or eager PyTorch). An entry
is the unit's median time minus the runtime's per-call overhead, measured the same way on a one-op
graph; the overhead is stored once and added once per predicted model.

The table is a portable JSON file naming the machine, engine, threads and library versions, so it can be
measured on the target device (a Raspberry Pi with the project installed) and searched anywhere. It is
written after every few entries, and a later call with the same file measures only what is missing.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .units import Unit, make_unit

__all__ = ["LUT_FORMAT", "ENGINES", "LatencyTable", "LutError", "build_lut", "load_lut", "unit_runner",
           "overhead_runner", "unit_work"]

LUT_FORMAT = "cpubone-lut/1"
ENGINES = ("onnxruntime", "eager")


class LutError(ValueError):
    """A latency table that cannot be read, or does not fit the request (the message names the file)."""


@dataclass
class LatencyTable:
    """Measured unit latencies (ms, per-call overhead removed) of one machine, engine and thread count."""

    engine: str
    threads: int
    machine: Dict[str, Any]
    overhead_ms: float = 0.0
    entries: Dict[str, Dict[str, float]] = field(default_factory=dict)
    runs: int = 0
    path: Optional[str] = None

    def ms(self, key: str) -> float:
        return self.entries[key]["ms"]

    def missing(self, keys: Iterable[str]) -> List[str]:
        return sorted({k for k in keys if k not in self.entries})

    def describe(self) -> str:
        m = self.machine
        return (f"{m.get('cpu', '?')} ({m.get('arch', '?')}), {self.engine}, {self.threads} thread(s), "
                f"{len(self.entries)} entries")

    def to_dict(self) -> Dict[str, Any]:
        return dict(format=LUT_FORMAT, engine=self.engine, threads=self.threads, machine=self.machine,
                    overhead_ms=self.overhead_ms, runs=self.runs, entries=dict(sorted(self.entries.items())))

    def save(self, path: os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # a kill leaves the old table or the new one, never half of one
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
    return LatencyTable(engine=raw["engine"], threads=int(raw["threads"]), machine=raw["machine"],
                        overhead_ms=float(raw.get("overhead_ms", 0.0)), entries=entries, runs=int(raw.get("runs", 0)),
                        path=str(path))


def _export(module: nn.Module, shape: Sequence[int], tmp: str, name: str) -> Path:
    from ..deploy.onnx import export_onnx

    return export_onnx(module, Path(tmp) / f"{name}.onnx", input_size=tuple(shape[2:]))


def unit_runner(unit: Unit, engine: str, threads: int, tmp: str) -> Callable[[], object]:
    """A zero-argument batch-1 call of ``unit`` in ``engine`` (eager: call it under ``torch_threads`` and
    ``torch.inference_mode``)."""
    from ..analysis.latency import eager_runner, onnx_runner

    module = make_unit(unit)
    if engine == "onnxruntime":
        return onnx_runner(_export(module, unit.input_shape, tmp, "unit"), unit.input_shape, threads)
    return eager_runner(module, unit.input_shape)


class _OneOp(nn.Module):
    """A one-op graph: what a runtime call costs when the work is negligible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def overhead_runner(engine: str, threads: int, tmp: str) -> Callable[[], object]:
    from ..analysis.latency import eager_runner, onnx_runner

    module, shape = _OneOp(), (1, 8, 1, 1)
    module.in_chans = 8
    if engine == "onnxruntime":
        return onnx_runner(_export(module, shape, tmp, "overhead"), shape, threads)
    return eager_runner(module, shape)


def unit_work(unit: Unit) -> Tuple[int, int]:
    """MACs and params of a unit, counted on its training form (the work of the released model; the
    inference form may densify thin grouped convs, which runs faster but counts more)."""
    from ..analysis.macs import count_macs, count_params

    module = make_unit(unit, inference_form=False)
    return count_macs(module, unit.input_shape).total, count_params(module)


def _time(fn: Callable[[], object], engine: str, threads: int, runs: int, warmup: int) -> float:
    from ..analysis.latency import time_callable, torch_threads

    if engine == "eager":
        with torch_threads(threads), torch.inference_mode():
            return time_callable(fn, runs, warmup, threads, engine).median_ms
    return time_callable(fn, runs, warmup, threads, engine).median_ms


def build_lut(
    units: Iterable[Unit],
    output: os.PathLike,
    engine: str = "onnxruntime",
    threads: int = 1,
    runs: int = 20,
    warmup: int = 5,
    progress: bool = True,
    save_every_s: float = 10.0,
) -> LatencyTable:
    """Measure every unit not yet in the table at ``output`` and write the table there.

    Args:
        units: the units to cover (``design_space_units`` of a search space, or a model's units).
        output: the JSON table; an existing one measured with the same engine, threads and CPU is extended
            (entries already there are reused, not measured again).
        engine: 'onnxruntime' or 'eager'.
        threads: intra-op threads.
        runs / warmup: timed and untimed calls per unit (the median is kept).
        progress: a progress bar on the terminal.
        save_every_s: write the table at least this often while measuring (a kill loses less).
    """
    from ..analysis.latency import check_timing_args
    from ..analysis.machine import machine_info

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
    check_timing_args(threads, runs, warmup)
    output = Path(output)
    if output.exists() and output.is_dir():
        raise LutError(f"{output}: is a directory, expected a .json file to write the table to")
    here = machine_info().to_dict()
    if output.is_file():
        table = load_lut(output)
        if table.engine != engine or table.threads != threads:
            raise LutError(f"{output}: measured with {table.engine} at {table.threads} thread(s), not {engine} at "
                           f"{threads}; write to another file")
        if table.machine.get("cpu") != here["cpu"] or table.machine.get("arch") != here["arch"]:
            raise LutError(f"{output}: measured on {table.machine.get('cpu')!r}, this is {here['cpu']!r}; "
                           "write to another file")
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        table = LatencyTable(engine=engine, threads=threads, machine=here, runs=runs)
    todo = [u for u in dict.fromkeys(units) if u.key not in table.entries]
    with tempfile.TemporaryDirectory() as tmp, _Progress(progress, len(todo)) as step:
        # the per-call overhead, measured beside the entries in this session
        overhead = _time(overhead_runner(engine, threads, tmp), engine, threads, max(runs, 50), warmup)
        table.overhead_ms = overhead if not table.entries else statistics.median([table.overhead_ms, overhead])
        last = time.monotonic()
        for unit in todo:
            step(unit.key)
            fn = unit_runner(unit, engine, threads, tmp)
            ms = _time(fn, engine, threads, runs, warmup)
            macs, params = unit_work(unit)
            table.entries[unit.key] = dict(ms=round(max(ms - overhead, 0.0), 5), macs=macs, params=params)
            if time.monotonic() - last > save_every_s:
                table.save(output)
                last = time.monotonic()
        step(None)
    table.save(output)
    return table


class _Progress:
    """A rich progress bar over units (nothing when disabled or when there is nothing to do)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar, self.started = enabled and total > 0, total, None, False

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn())
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total)
        return self.step

    def step(self, label: Optional[str]) -> None:
        if self.bar is None:
            return
        if self.started:
            self.bar.advance(self.task)
        self.started = True
        self.bar.update(self.task, description=(label or "done")[:44])

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
