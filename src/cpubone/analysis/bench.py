"""``cpubone bench``: batch-1 CPU latency, MACs and MACpS of CPUBone against its peers on this machine.

Every model is built with random weights (latency does not depend on them, and nothing is downloaded),
put in its deploy form (timm's ``reparameterize_model``: RepViT / MobileOne / FastViT branches folded,
a no-op for the others), exported once to ONNX (cached by model, size and library versions) and timed
with the project's one harness (:mod:`cpubone.analysis.latency`). MACpS is set against this machine's
GEMM peak of each precision measured in the same run at the same thread count.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..engines import (
    EngineError,
    ExportError,
    check_run_args,
    engine_class,
    get_engine,
    inference_form,
)
from ..engines.base import Runner
from ..engines.eager import torch_threads
from ..engines.machine import (
    GEMM_ENGINES,
    GEMM_N,
    GEMM_PRECISIONS,
    GemmPeak,
    MachineInfo,
    gemm_runner,
    machine_info,
    usable_threads,
)
from ..engines.timing import LatencyResult, time_interleaved
from ..models import VARIANTS, create_model, resolve_model_name
from ..models.macs import count_macs, count_params
from ..outputs import OutputPathError, ResultsNotWritten, check_output_dir
from ..progress import StepProgress

__all__ = [
    "DEFAULT_MODELS", "PEER_TOP1", "BenchRow", "BenchResult", "published_top1", "cache_key", "prepare_runner",
    "build_model", "run_bench",
]

DEFAULT_MODELS: Tuple[str, ...] = (
    "cpubone_nano", "cpubone_t0", "cpubone_b0", "cpubone_b1",
    "mobilenetv3_large_100", "mobilenetv4_conv_small", "mobilenetv4_conv_medium", "fasternet_t0",
    "efficientvit_b1", "repvit_m1_1", "lowformer_b0",
)

# Published ImageNet-1k top-1 (%, 224x224) of the peers, from their papers. CPUBone's own values
# live in the variant table (cpubone.models.VARIANTS[...].top1, the authors' release).
PEER_TOP1: Dict[str, Tuple[float, str]] = {
    "mobilenetv3_large_100": (75.2, "Howard et al., Searching for MobileNetV3, ICCV 2019, Table 3"),
    "mobilenetv4_conv_small": (73.8, "Qin et al., MobileNetV4, ECCV 2024, Table 5"),
    "mobilenetv4_conv_medium": (79.9, "Qin et al., MobileNetV4, ECCV 2024, Table 5"),
    "fasternet_t0": (71.9, "Chen et al., Run, Don't Walk (FasterNet), CVPR 2023, Table 3"),
    "efficientvit_b1": (79.4, "Cai et al., EfficientViT, ICCV 2023, Table 2 (r224)"),
    "repvit_m1_1": (79.4, "Wang et al., RepViT, CVPR 2024, Table 2 (300 epochs)"),
    "lowformer_b0": (78.4, "Nottebaum et al., LowFormer, WACV 2025, Table 1"),
    "mobileone_s1": (75.9, "Vasu et al., MobileOne, CVPR 2023, Table 4"),
    "fastvit_t8": (75.6, "Vasu et al., FastViT, ICCV 2023, Table 2"),
}


def published_top1(name: str) -> Tuple[Optional[float], str]:
    """Published top-1 of ``name`` and where it comes from (None, '' when we have no figure)."""
    resolved = resolve_model_name(name)
    if resolved.source == "cpubone":
        cfg = VARIANTS[resolved.name]
        if cfg.top1 is not None:
            return cfg.top1, f"Nottebaum et al., CPUBone, CVPR Findings 2026 ({cfg.published_name}, authors' release)"
        return None, ""
    return PEER_TOP1.get(resolved.name.split(".")[0], (None, ""))


def build_model(name: str, seed: int = 0) -> Tuple[nn.Module, bool]:
    """``name`` with seeded random weights, in deploy form; returns (model, whether it was reparameterized).

    timm's ``reparameterize_model`` folds the train-time branches of RepViT, MobileOne, FastViT and
    the like into single convs, the form they are deployed and timed in by their authors; measuring
    them unfolded would be unfair to them. CPUBone is deployed (and exported by ``cpubone export``) in
    its inference form. Both through ``cpubone.engines.inference_form``.
    """
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = create_model(name).eval()
    form = inference_form(model)
    return form, form is not model


def cache_key(name: str) -> str:
    """What identifies the network ``build_model(name)`` gives (seeded weights, deploy form), for the engines'
    artifact cache (``Engine.prepare(cache_key=...)``, which adds the shape, precision and library versions)."""
    resolved = resolve_model_name(name)
    key = f"{name}|inference-form" if _ours(name) else name
    if resolved.source == "config":  # the file's content, not its name, says which network it is
        key += "|" + json.dumps(resolved.config, sort_keys=True)
    return key


def prepare_runner(name: str, model: nn.Module, engine: str, precision: str, threads: int, size: int,
                   calib: Optional[List[np.ndarray]] = None) -> Runner:
    """``model`` (from ``build_model(name)``) prepared in ``engine`` x ``precision`` at ``size``, its artifact
    cached by the engine: the one way bench and profile get a runner."""
    shape = (1, getattr(model, "in_chans", 3), size, size)
    if precision == "int8" and calib is None:
        calib = _calibration(model, size)
    return get_engine(engine).prepare(model, shape, precision, threads, calib=calib,
                                      cache_key=cache_key(name) if precision != "int8" else None)


@dataclass
class BenchRow:
    """One model's figures in a benchmark run."""

    model: str
    engine: str
    precision: str
    family: str  # "CPUBone" or "peer"
    params: int
    macs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    gmacps: float
    peak_pct: float  # achieved MACpS as % of the GEMM peak of the row's precision at the same thread count
    ratio: float  # median latency / that of the model's first engine x precision in this run
    top1: Optional[float]
    top1_source: str
    deploy_form: bool  # reparameterized before timing
    latency: LatencyResult = field(repr=False, default=None)  # type: ignore[assignment]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("latency")
        return d


@dataclass
class BenchResult:
    """A whole benchmark run: the machine, the settings, the GEMM peak and one row per model."""

    machine: MachineInfo
    engine: str
    threads: int
    size: int
    runs: int
    warmup: int
    channels_last: bool
    peak: GemmPeak  # fp32
    rounds: int
    rows: List[BenchRow]
    files: Dict[str, str] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)  # model -> why it could not be measured
    precisions: List[str] = field(default_factory=lambda: ["fp32"])
    skipped: List[str] = field(default_factory=list)  # engine x precision that could not be prepared, and why
    peaks: Dict[str, GemmPeak] = field(default_factory=dict)  # per precision of the rows, fp32 included

    def to_dict(self) -> dict:
        return dict(
            machine=self.machine.to_dict(), engine=self.engine, threads=self.threads, batch_size=1,
            size=self.size, runs=self.runs, warmup=self.warmup, rounds=self.rounds, channels_last=self.channels_last,
            precisions=self.precisions, skipped=self.skipped,
            gemm_peak=self.peak.to_dict(), gemm_peaks={k: v.to_dict() for k, v in self.peaks.items()},
            rows=[r.to_dict() for r in self.rows],
            failed=[dict(model=m, error=e) for m, e in self.failed.items()],
        )


@dataclass
class _Entry:
    """A model prepared for timing in one engine x precision: its figures and a zero-argument call."""

    name: str
    params: int
    macs: int
    deployed: bool
    fn: object
    engine: str = "onnxruntime"
    precision: str = "fp32"
    times: List[float] = field(default_factory=list)
    keep: object = None  # what must stay alive while fn runs (a runner and its files)


def _ours(name: str) -> bool:
    """A CPUBone: one of our variants or a design config."""
    return resolve_model_name(name).source in ("cpubone", "config")


def counted_model(name: str, built: nn.Module) -> nn.Module:
    """The form whose MACs, params and blocks are reported for ``built`` (from ``build_model(name)``).

    CPUBone's inference form densifies thin grouped convs (zeros outside the groups, for faster kernels):
    its work is still the released model's, so it is counted on the training form (same module names).
    """
    return create_model(name).eval() if _ours(name) else built


def _calibration(model: nn.Module, size: int, n: int = 8) -> List[np.ndarray]:
    """int8 calibration samples for a timing run (random weights: the ranges only need to be plausible)."""
    from timm.data import resolve_data_config

    from ..engines.verify import photo_samples

    cfg = resolve_data_config(model=model)
    cfg["input_size"] = (getattr(model, "in_chans", 3), size, size)
    return photo_samples(cfg, n)


def _prepare(name: str, engines: Sequence[str], precisions: Sequence[str], threads: int, size: int,
             channels_last: bool, skipped: List[str]) -> List[_Entry]:
    model, deployed = build_model(name)
    counted = counted_model(name, model)
    macs, params = count_macs(counted, size).total, count_params(counted)
    calib = None
    entries = []
    for engine in engines:
        for precision in precisions:
            if precision not in engine_class(engine).precisions:
                continue
            if precision == "int8" and calib is None:
                calib = _calibration(model, size)
            form = model.to(memory_format=torch.channels_last) if channels_last and engine == "eager" else model
            try:
                runner = prepare_runner(name, form, engine, precision, threads, size, calib)
            except ExportError:
                raise  # run_bench names the model the exporter cannot convert and goes on with the others
            except EngineError as e:  # e.g. bf16 on a CPU without bf16 instructions
                skipped.append(f"{name} {engine} {precision}: {e}")
                continue
            entries.append(_Entry(name, params, macs, deployed, runner.timer(), engine, precision, keep=runner))
    return entries


def run_bench(
    models: Sequence[str] = DEFAULT_MODELS,
    engine: Union[str, Sequence[str]] = "onnxruntime",
    threads: int = 1,
    size: int = 224,
    runs: int = 50,
    warmup: int = 10,
    channels_last: bool = False,
    rounds: int = 5,
    out_dir: Optional[os.PathLike] = "cpubone-bench",
    progress: bool = True,
    precision: Union[str, Sequence[str]] = "fp32",
) -> BenchResult:
    """Benchmark ``models`` at batch 1 and write CSV, JSON, Markdown and a top-1 vs latency plot.

    Every model runs in every engine x precision (where the engine runs that precision). All of them (and
    the GEMM peak) are prepared first, then timed in ``rounds`` interleaved rounds of about
    ``runs / rounds`` calls each, so a burst of load from elsewhere on the machine hits every candidate
    alike and the ratios between them stay meaningful.

    Args:
        models: CPUBone variants and/or timm model names.
        engine: one or more of ``cpubone.engines.ENGINES`` (a list or 'a,b'); 'onnxruntime' (the paper's CPU
            path, default) and 'eager' need no extra.
        precision: one or more of fp32, bf16, int8 (int8 calibrated on scikit-image photos: random
            weights, so the timings are real but the outputs are not judged here; ``cpubone deploy`` does).
        threads: intra-op threads, pinned for the models and for the GEMM peak.
        size: input side S (S x S), at least 32.
        runs / warmup: timed calls per candidate, and untimed calls before its first round (2 before each
            later round, to bring its weights back into cache).
        channels_last: eager only, run in channels_last memory format.
        rounds: interleaved rounds (1: each candidate timed in one go).
        out_dir: where the report files go (None: write nothing); checked before anything is measured.
        progress: show a progress bar on the terminal.

    A model the ONNX exporter cannot convert is left out and named in ``failed`` with the reason; the
    others are measured. More threads than usable cores are reduced to the cores (with a warning).
    Raises ``ResultsNotWritten`` (holding the result) if the report files cannot be written at the end.
    """
    models = list(models) or list(DEFAULT_MODELS)
    engines, precisions = check_run_args(models, engine, threads, size, runs, warmup, precision)
    if channels_last and "eager" not in engines:
        raise ValueError("channels_last applies to the eager engine only (the other runtimes pick their own layout)")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need at least 1 round")
    threads = usable_threads(threads)
    if out_dir is not None:
        check_output_dir(out_dir, need_bytes=2 ** 20)  # before the measuring, not after it
    rounds = min(rounds, runs)
    entries: List[_Entry] = []
    failed: Dict[str, str] = {}
    skipped: List[str] = []
    # the GEMM peak in the first engine that has one (ONNX Runtime's MatMul or torch.matmul)
    peak_engine = next((e for e in engines if e in GEMM_ENGINES), "onnxruntime")
    with StepProgress(progress, len(models) + rounds) as step:
        # a peak per precision the rows have, timed in the same rounds: an int8 row set against the fp32 GEMM
        # rate would read 116-232% "of peak"
        peak_calls: Dict[str, Tuple[object, str]] = {p: gemm_runner(peak_engine, threads, GEMM_N, p)
                                                     for p in ("fp32", *precisions) if p in GEMM_PRECISIONS}
        for name in models:
            step(f"prepare {name}")
            try:
                entries.extend(_prepare(name, engines, precisions, threads, size, channels_last, skipped))
            except ExportError as e:  # one model the exporter cannot convert does not stop the others
                failed[name] = str(e)
        calls = {**{f"GEMM peak {p}": fn for p, (fn, _) in peak_calls.items()},
                 **{f"{i}": e.fn for i, e in enumerate(entries)}}
        with torch_threads(threads), torch.inference_mode():  # the eager GEMM peak runs on torch's pool
            lat_of = time_interleaved(calls, runs, warmup, rounds, threads, step=step)
        step(None)
    label = ",".join(engines) + ("-cl" if channels_last else "")
    peaks = {}
    for p, (_, method) in peak_calls.items():
        lat = dataclasses.replace(lat_of[f"GEMM peak {p}"], engine=peak_engine)
        peaks[p] = GemmPeak(engine=peak_engine, method=method, threads=threads, gmacps=lat.macps(GEMM_N ** 3),
                            latency=lat, precision=p)
    gemm = peaks["fp32"]
    rows = []
    first: Dict[str, float] = {}
    for i, e in enumerate(entries):
        eng = e.engine + ("-cl" if channels_last and e.engine == "eager" else "")
        lat = dataclasses.replace(lat_of[f"{i}"], engine=eng)
        gmacps = lat.macps(e.macs)
        first.setdefault(e.name, lat.median_ms)
        top1, source = published_top1(e.name)
        rows.append(BenchRow(
            model=e.name, engine=eng, precision=e.precision, family="CPUBone" if _ours(e.name) else "peer",
            params=e.params, macs=e.macs, median_ms=lat.median_ms, p10_ms=lat.p10_ms, p90_ms=lat.p90_ms,
            min_ms=lat.min_ms, gmacps=gmacps, peak_pct=100.0 * gmacps / peaks.get(e.precision, gemm).gmacps,
            ratio=lat.median_ms / first[e.name], top1=top1, top1_source=source, deploy_form=e.deployed, latency=lat,
        ))
    result = BenchResult(machine_info(), label, threads, size, runs, warmup, channels_last, gemm, rounds, rows,
                         failed=failed, precisions=list(precisions), skipped=skipped, peaks=peaks)
    if out_dir is not None:
        from .report import write_bench_report

        try:
            result.files = write_bench_report(result, Path(out_dir))
        except OutputPathError as e:
            raise ResultsNotWritten(f"benchmark measured but not written: {e}", result) from None
    return result
