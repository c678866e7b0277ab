"""``cpubone bench``: batch-1 CPU latency, MACs and MACpS of CPUBone against its peers on this machine.

Every model is built with random weights (latency does not depend on them, and nothing is downloaded),
put in its deploy form (timm's ``reparameterize_model``: RepViT / MobileOne / FastViT branches folded,
a no-op for the others), exported once to ONNX (cached by model, size and library versions) and timed
with the project's one harness (:mod:`cpubone.analysis.latency`). MACpS is set against this machine's
fp32 GEMM peak measured in the same engine at the same thread count.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..engines import ExportError, engine_class, get_engine, inference_form, parse_engines, parse_precisions
from ..models import VARIANTS, create_model, resolve_model_name
from ..outputs import OutputPathError, ResultsNotWritten, check_output_dir
from .latency import LatencyResult, check_timing_args, eager_runner, onnx_runner, summarize_times, time_callable, torch_threads
from .machine import GEMM_N, GemmPeak, MachineInfo, gemm_runner, machine_info, usable_threads
from .macs import count_macs, count_params

__all__ = [
    "DEFAULT_MODELS", "PEER_TOP1", "ENGINES", "BenchRow", "BenchResult", "published_top1", "cache_dir",
    "build_model", "onnx_export", "check_args", "run_bench",
]

DEFAULT_MODELS: Tuple[str, ...] = (
    "cpubone_nano", "cpubone_t0", "cpubone_b0", "cpubone_b1",
    "mobilenetv3_large_100", "mobilenetv4_conv_small", "mobilenetv4_conv_medium", "fasternet_t0",
    "efficientvit_b1", "repvit_m1_1", "lowformer_b0",
)
# engines the default bench runs without any extra; every engine of cpubone.engines can be named
ENGINES = ("onnxruntime", "eager")

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


def cache_dir() -> Path:
    """User cache for ONNX exports: $CPUBONE_CACHE_DIR, else $XDG_CACHE_HOME/cpubone, else ~/.cache/cpubone."""
    if os.environ.get("CPUBONE_CACHE_DIR"):
        return Path(os.environ["CPUBONE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpubone"


def check_args(models: Sequence[str], engine: Union[str, Sequence[str]] = "onnxruntime", threads: int = 1,
               size: int = 224, runs: int = 50, warmup: int = 10,
               precision: Union[str, Sequence[str]] = "fp32") -> Tuple[List[str], List[str]]:
    """Reject bad input before any work starts, naming the problem; returns (engines, precisions).

    Every engine must be installed and every precision run by at least one of them.
    """
    engines, precisions = parse_engines(engine), parse_precisions(precision)
    for e in engines:
        engine_class(e).require()
    for p in precisions:
        if not any(p in engine_class(e).precisions for e in engines):
            raise ValueError(f"precision {p!r}: none of the engines {', '.join(engines)} runs it")
    check_timing_args(threads, runs, warmup)
    if size < 32:
        raise ValueError(f"size={size}: input side must be at least 32 pixels (the networks downsample by 32)")
    if not models:
        raise ValueError("no models given")
    for name in models:
        resolve_model_name(name)  # unknown names fail here, before any measuring
    return engines, precisions


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


def _export_key(name: str, size: int) -> str:
    import onnx
    import timm

    from .. import __version__

    resolved = resolve_model_name(name)
    form = "inference-form|" if _ours(name) else ""
    if resolved.source == "config":  # the file's content, not its name, says which network it is
        form += json.dumps(resolved.config, sort_keys=True) + "|"
    key = f"{name}|{form}{size}|torch {torch.__version__}|timm {timm.__version__}|onnx {onnx.__version__}|cpubone {__version__}"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return f"{safe}_{size}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.onnx"


def onnx_export(name: str, model: nn.Module, size: int) -> Path:
    """The cached ONNX export of ``model`` (built by ``build_model(name)``) at ``size`` x ``size``.

    The cache key holds the model name, size and torch / timm / onnx / cpubone versions, so a library
    upgrade re-exports; the seeded weights make the cached file the same network ``build_model`` gives.
    """
    from ..engines.onnxruntime import export_onnx

    path = cache_dir() / "onnx" / _export_key(name, size)
    if not path.exists():
        export_onnx(model, path, input_size=(size, size), metadata={"cpubone_bench_model": name}, name=name)
    return path


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
    peak_pct: float  # achieved MACpS as % of the GEMM peak at the same thread count
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
    peak: GemmPeak
    rounds: int
    rows: List[BenchRow]
    files: Dict[str, str] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)  # model -> why it could not be measured
    precisions: List[str] = field(default_factory=lambda: ["fp32"])
    skipped: List[str] = field(default_factory=list)  # engine x precision that could not be prepared, and why

    def to_dict(self) -> dict:
        return dict(
            machine=self.machine.to_dict(), engine=self.engine, threads=self.threads, batch_size=1,
            size=self.size, runs=self.runs, warmup=self.warmup, rounds=self.rounds, channels_last=self.channels_last,
            precisions=self.precisions, skipped=self.skipped,
            gemm_peak=self.peak.to_dict(), rows=[r.to_dict() for r in self.rows],
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


def _calibration(model: nn.Module, size: int, n: int = 8) -> List["np.ndarray"]:
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
    shape = (1, getattr(model, "in_chans", 3), size, size)
    calib = None
    entries = []
    for engine in engines:
        for precision in precisions:
            if precision not in engine_class(engine).precisions:
                continue
            keep = None
            if engine == "onnxruntime" and precision == "fp32":
                fn = onnx_runner(onnx_export(name, model, size), shape, threads)
            elif engine == "eager" and precision == "fp32":
                fn = eager_runner(model, shape, channels_last)
            else:
                if precision == "int8" and calib is None:
                    calib = _calibration(model, size)
                from ..engines import EngineError

                try:
                    keep = get_engine(engine).prepare(model, shape, precision, threads, calib=calib)
                except EngineError as e:  # e.g. bf16 on a CPU without bf16 instructions
                    skipped.append(f"{name} {engine} {precision}: {e}")
                    continue
                fn = keep.timer()
            entries.append(_Entry(name, params, macs, deployed, fn, engine, precision, keep=keep))
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
    engines, precisions = check_args(models, engine, threads, size, runs, warmup, precision)
    if channels_last and "eager" not in engines:
        raise ValueError("channels_last applies to the eager engine only (the other runtimes pick their own layout)")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need at least 1 round")
    threads = usable_threads(threads)
    if out_dir is not None:
        check_output_dir(out_dir, need_bytes=2 ** 20)  # before the measuring, not after it
    rounds = min(rounds, runs)
    chunks = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
    entries: List[_Entry] = []
    failed: Dict[str, str] = {}
    skipped: List[str] = []
    # the GEMM peak in the first engine that has one (ONNX Runtime's MatMul or torch.matmul)
    peak_engine = next((e for e in engines if e in ENGINES), "onnxruntime")
    with StepProgress(progress, len(models) + rounds) as step:
        peak_fn, peak_method = gemm_runner(peak_engine, threads, GEMM_N)
        peak = _Entry("GEMM peak", 0, GEMM_N ** 3, False, peak_fn)
        for name in models:
            step(f"prepare {name}")
            try:
                entries.extend(_prepare(name, engines, precisions, threads, size, channels_last, skipped))
            except ExportError as e:  # one model the exporter cannot convert does not stop the others
                failed[name] = str(e)
        with torch_threads(threads), torch.inference_mode():
            for r, chunk in enumerate(chunks):
                step(f"timing round {r + 1}/{rounds}")
                for e in [peak] + entries:
                    time_callable(e.fn, chunk, warmup if r == 0 else min(warmup, 2), threads, e.engine, times=e.times)
        step(None)
    label = ",".join(engines) + ("-cl" if channels_last else "")
    peak_lat = summarize_times(peak.times, warmup, threads, peak_engine)
    gemm = GemmPeak(engine=peak_engine, method=peak_method, threads=threads, gmacps=peak_lat.macps(peak.macs),
                    latency=peak_lat)
    rows = []
    first: Dict[str, float] = {}
    for e in entries:
        eng = e.engine + ("-cl" if channels_last and e.engine == "eager" else "")
        lat = summarize_times(e.times, warmup, threads, eng)
        gmacps = lat.macps(e.macs)
        first.setdefault(e.name, lat.median_ms)
        top1, source = published_top1(e.name)
        rows.append(BenchRow(
            model=e.name, engine=eng, precision=e.precision, family="CPUBone" if _ours(e.name) else "peer",
            params=e.params, macs=e.macs, median_ms=lat.median_ms, p10_ms=lat.p10_ms, p90_ms=lat.p90_ms,
            min_ms=lat.min_ms, gmacps=gmacps, peak_pct=100.0 * gmacps / gemm.gmacps,
            ratio=lat.median_ms / first[e.name], top1=top1, top1_source=source, deploy_form=e.deployed, latency=lat,
        ))
    result = BenchResult(machine_info(), label, threads, size, runs, warmup, channels_last, gemm, rounds, rows,
                         failed=failed, precisions=list(precisions), skipped=skipped)
    if out_dir is not None:
        from .report import write_bench_report

        try:
            result.files = write_bench_report(result, Path(out_dir))
        except OutputPathError as e:
            raise ResultsNotWritten(f"benchmark measured but not written: {e}", result) from None
    return result


class StepProgress:
    """A rich progress bar over named steps (nothing when disabled or when there is nothing to do).

    ``with StepProgress(enabled, total) as step: step("label")`` marks the previous step done and shows the
    next one; ``step(None)`` closes the last. Shared by bench, blocks and the design latency table.
    """

    def __init__(self, enabled: bool, total: int, width: int = 28) -> None:
        self.enabled, self.total, self.width = enabled and total > 0, total, width
        self.bar, self.started = None, False

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn(f"{{task.description:<{self.width}}}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total)
        return self.step

    def step(self, label: Optional[str]) -> None:
        if self.bar is None:
            return
        if self.started:
            self.bar.advance(self.task)
        self.started = True
        self.bar.update(self.task, description=(label or "done")[:self.width])

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
