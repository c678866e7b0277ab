"""End-to-end batch-1 CPU latency of the detection and segmentation models, CPUBone and peers in one run.

All timings go through the project's latency harness (``cpubone.engines.timing``); MACs through
``count_macs``. Every backbone gets the same head, FPN width and input size, so the comparison is like for like.
``bench_engines`` runs the networks in every CPU runtime of ``cpubone.engines`` (verified against PyTorch).
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..engines import (
    EngineError,
    check_run_args,
    engine_class,
    get_engine,
    inference_form,
)
from ..engines.eager import measure_eager, torch_threads
from ..engines.machine import machine_info, usable_threads
from ..engines.timing import time_callable, time_interleaved
from ..engines.verify import (
    SKIMAGE_PHOTOS,
    check_outputs,
    judge_fp32,
    photo_samples,
    sample_photos,
    torch_reference,
    verification_inputs,
)
from ..models import resolve_model_name
from ..models.macs import count_macs, count_params
from ..models.reparam import reparameterize_blocks
from ..preprocess import PreprocessConfig
from ..progress import StepProgress
from .detection import RetinaNetRaw, create_retinanet
from .presets import DEFAULT_PEERS
from .segmentation import create_semantic_fpn

__all__ = ["machine_name", "bench_detection", "bench_segmentation", "DEFAULT_PEERS", "TASKS", "build_network",
           "inference_network", "EngineRow", "EngineSkip", "DownstreamEnginesResult", "bench_engines"]


def machine_name() -> str:
    """The CPU model (and usable core count) the numbers were measured on."""
    info = machine_info()
    return f"{info.cpu} ({info.usable_cpus} usable cores)"


def _onnx_ms(model: torch.nn.Module, size: int, threads: int, runs: int, warmup: int) -> Dict[str, Any]:
    """Prepare in ONNX Runtime (``cpubone.engines``), check against eager on one input, and time. Failures are
    reported, not raised."""
    try:
        runner = get_engine("onnxruntime").prepare(model, (1, 3, size, size), "fp32", threads)
        x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        check = check_outputs(runner, torch_reference(model), [("random", x)])[0]
        res = time_callable(runner.timer(), runs, warmup, threads, "onnxruntime")
        return {"ort_ms": res.median_ms, "ort_max_abs_diff": check.max_abs_diff}
    except Exception as e:  # an exporter or runtime gap of one peer must not lose the whole table
        return {"ort_ms": None, "ort_error": _one_line(e)}


def bench_detection(backbones: Sequence[str] = DEFAULT_PEERS, size: int = 512, threads: int = 1, runs: int = 20,
                    warmup: int = 5, num_classes: int = 80, onnx: bool = True, fpn_channels: int = 256) -> Dict[str, Any]:
    """RetinaNet latency per backbone at ``size`` x ``size``, batch 1.

    Columns: ``e2e_eager_ms`` the whole torchvision RetinaNet (normalise/resize, network, anchor decoding,
    NMS) on one image; ``net_eager_ms`` / ``ort_ms`` the network up to the head outputs (``RetinaNetRaw``) in
    eager PyTorch / ONNX Runtime. Post-processing is data dependent (anchors above the score threshold), so
    ``e2e`` depends on the weights; with random weights few anchors pass the 0.05 threshold.
    """
    rows: List[Dict[str, Any]] = []
    for name in backbones:
        det = create_retinanet(name, num_classes, fpn_channels=fpn_channels, min_size=size, max_size=size).eval()
        raw = RetinaNetRaw(det).eval()
        row: Dict[str, Any] = {"backbone": name, "params_M": count_params(det) / 1e6,
                               "GMACs": count_macs(raw, size).total / 1e9}
        img = [torch.rand(3, size, size)]
        with torch_threads(threads), torch.inference_mode():
            row["e2e_eager_ms"] = time_callable(lambda: det(img), runs, warmup, threads, "eager").median_ms
        row["net_eager_ms"] = measure_eager(raw, (1, 3, size, size), threads, runs, warmup).median_ms
        if onnx:
            row.update(_onnx_ms(raw, size, threads, runs, warmup))
        rows.append(row)
    return {"task": "RetinaNet (FPN P3-P7)", "size": size, "threads": threads, "runs": runs,
            "machine": machine_name(), "torch": torch.__version__, "rows": rows}


def bench_segmentation(backbones: Sequence[str] = DEFAULT_PEERS, size: int = 512, threads: int = 1, runs: int = 20,
                       warmup: int = 5, num_classes: int = 150, onnx: bool = True, fpn_channels: int = 256,
                       channels: int = 128) -> Dict[str, Any]:
    """Semantic FPN latency per backbone at ``size`` x ``size``, batch 1: image in [0, 1] -> logits at full
    resolution (normalisation and final upsampling included), eager and ONNX Runtime. The argmax is not timed."""
    rows: List[Dict[str, Any]] = []
    for name in backbones:
        seg = create_semantic_fpn(name, num_classes, fpn_channels=fpn_channels, channels=channels).eval()
        row: Dict[str, Any] = {"backbone": name, "params_M": count_params(seg) / 1e6,
                               "GMACs": count_macs(seg, size).total / 1e9,
                               "eager_ms": measure_eager(seg, (1, 3, size, size), threads, runs, warmup).median_ms}
        if onnx:
            row.update(_onnx_ms(seg, size, threads, runs, warmup))
        rows.append(row)
    return {"task": "Semantic FPN", "size": size, "threads": threads, "runs": runs, "machine": machine_name(),
            "torch": torch.__version__, "rows": rows}


# --- the networks in every CPU runtime -------------------------------------------------------------

# what each task times: the part of the model a runtime can take (fixed shapes, no data-dependent ops)
TASKS: Dict[str, str] = {
    "detect": "RetinaNet (FPN P3-P7): normalised image -> class logits and box deltas of every anchor",
    "segment": "Semantic FPN: image in [0, 1] -> class logits at full resolution",
}


def build_network(task: str, backbone: str, size: int, num_classes: Optional[int] = None, fpn_channels: int = 256,
                  channels: int = 128, seed: int = 0) -> Tuple[torch.nn.Module, Any]:
    """The network of ``task`` on ``backbone`` (seeded random weights, training form, eval mode) and the
    ``PreprocessConfig`` of its input at ``size`` x ``size``.

    detect: ``RetinaNetRaw`` (anchor decoding, score threshold and NMS have data-dependent shapes and stay in
    PyTorch), fed images normalised by the backbone's mean and std, as torchvision's transform does.
    segment: the whole Semantic FPN, which normalises inside, fed images in [0, 1].
    ``channels``: the Semantic FPN head width; ``num_classes``: 80 (COCO) / 150 (ADE20K) when None.
    """
    torch.manual_seed(seed)
    if task == "detect":
        det = create_retinanet(backbone, num_classes or 80, fpn_channels=fpn_channels, min_size=size,
                               max_size=size).eval()
        net: torch.nn.Module = RetinaNetRaw(det).eval()
        mean, std = tuple(det.transform.image_mean), tuple(det.transform.image_std)
    elif task == "segment":
        net = create_semantic_fpn(backbone, num_classes or 150, fpn_channels=fpn_channels, channels=channels).eval()
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    # a photo as a square tile: shorter side resized to the input side (bilinear, as torchvision's
    # detection transform resizes), the middle cropped
    return net, PreprocessConfig(input_size=(3, size, size), mean=mean, std=std, crop_pct=1.0,
                                 interpolation="bilinear")


def inference_network(net: torch.nn.Module, backbone: str) -> torch.nn.Module:
    """A copy of ``net`` in the form it is deployed in: a CPUBone backbone in its inference form
    (``cpubone.models.reparam.reparameterize_blocks``), a peer with its train-time branches folded
    (``cpubone.engines.inference_form``, a no-op for most). The FPN and heads are plain convs either way."""
    net = copy.deepcopy(net).eval()
    if resolve_model_name(backbone).source in ("cpubone", "config"):
        return reparameterize_blocks(net)
    return inference_form(net)


@dataclass
class EngineRow:
    """One network timed in one engine x precision."""

    task: str
    backbone: str
    engine: str
    precision: str
    gmacs: float  # of the network at the input size
    median_ms: float
    p10_ms: float
    p90_ms: float
    ratio: float  # median / that of ``ratio_to``, the first engine x precision of the same network timed
    ratio_to: str
    max_abs_diff: float  # worst over the check inputs, against eager PyTorch fp32 (the training form)
    rel_diff: float  # the worst max |out - ref| / max(1, max |ref|) over the check inputs
    verified: bool  # fp32 within the engine's tolerance; low precision is reported, not judged (random weights)
    info: Dict[str, Any] = field(default_factory=dict)  # what the runtime says about itself (partitions...)


@dataclass
class EngineSkip:
    """An engine x precision that was not timed for a network, and why (one line)."""

    task: str
    backbone: str
    engine: str
    precision: str
    status: str  # "failed": could not be prepared or run; "refused": fp32 out of tolerance
    reason: str
    rel_diff: Optional[float] = None


@dataclass
class DownstreamEnginesResult:
    """``bench_engines``: the machine, the settings, one row per network x engine x precision timed."""

    machine: Any  # cpubone.engines.machine.MachineInfo
    tasks: List[str]
    engines: List[str]
    precisions: List[str]
    size: int
    threads: int
    runs: int
    warmup: int
    rounds: int
    rows: List[EngineRow]
    skipped: List[EngineSkip]

    def table(self, task: str) -> List[Dict[str, Any]]:
        """The rows of ``task`` for display: one per network x engine x precision timed."""
        return [{"backbone": r.backbone, "GMACs": r.gmacs, "engine": r.engine, "precision": r.precision,
                 "median ms": r.median_ms, "p10-p90 ms": f"{r.p10_ms:.1f}-{r.p90_ms:.1f}", "x first": f"{r.ratio:.2f}",
                 "diff vs PyTorch": f"{r.rel_diff:.1e}", "fp32 check": "ok" if r.verified else "not judged"}
                for r in self.rows if r.task == task]

    def title(self, task: str) -> str:
        return (f"{TASKS[task]}; {self.size}x{self.size}, batch 1, {self.threads} thread(s), median of {self.runs} "
                f"runs in {self.rounds} interleaved rounds; x first = ratio to the network's first engine x precision")

    def not_timed(self, task: str) -> List[str]:
        """One line per engine x precision of ``task`` that was not timed, with the reason."""
        return [f"not timed: {s.backbone} {s.engine} {s.precision} ({s.status}): {s.reason}"
                for s in self.skipped if s.task == task]

    def to_dict(self) -> Dict[str, Any]:
        return dict(machine=self.machine.to_dict(), tasks={t: TASKS[t] for t in self.tasks}, engines=self.engines,
                    precisions=self.precisions, size=self.size, threads=self.threads, batch_size=1, runs=self.runs,
                    warmup=self.warmup, rounds=self.rounds, rows=[asdict(r) for r in self.rows],
                    skipped=[asdict(s) for s in self.skipped])


@dataclass
class _Entry:
    backbone: str
    engine: str
    precision: str
    gmacs: float
    runner: Any
    max_abs_diff: float
    rel_diff: float
    verified: bool

    @property
    def key(self) -> str:
        return f"{self.backbone} {self.engine} {self.precision}"


def _one_line(e: BaseException) -> str:
    """An error as one line: our own messages as they are, others prefixed with their type; the temporary
    folder an engine wrote its file to is left out (it is gone when the report is read)."""
    lines = str(e).strip().splitlines()
    msg = re.sub(r"\S*cpubone-\w+-\w+[/\\]", "", lines[0]) if lines else ""
    return (msg if isinstance(e, EngineError) and msg else f"{type(e).__name__}: {msg}")[:300]


def _prepare_network(task: str, backbone: str, engines: Sequence[str], precisions: Sequence[str], size: int,
                     threads: int, net_kwargs: Dict[str, Any], photos: int, skipped: List[EngineSkip]) -> List[_Entry]:
    """Build ``backbone``'s network of ``task``, prepare it in every engine x precision and check each against
    eager PyTorch; what cannot be prepared, run or verified goes to ``skipped``."""
    def skip(engine: str, precision: str, status: str, reason: str, rel: Optional[float] = None) -> None:
        skipped.append(EngineSkip(task, backbone, engine, precision, status, reason, rel))

    try:
        net, cfg = build_network(task, backbone, size, **net_kwargs)
    except ValueError as e:  # e.g. a backbone without the feature strides the task needs
        skip("all", "all", "failed", _one_line(e))
        return []
    form = inference_network(net, backbone)
    gmacs = count_macs(net, size).total / 1e9
    # a random input and real photos; the reference (the training form, eager fp32) is computed once
    inputs = verification_inputs(cfg, sample_photos(SKIMAGE_PHOTOS[:photos]))
    with torch_threads(threads):
        reference = torch_reference(net)
        ref_out = {id(x): reference(x) for _, x in inputs}
    # int8 calibration: the photos and their mirror images, preprocessed like the network's input
    calib = photo_samples(asdict(cfg)) if "int8" in precisions else None
    shape = (1, *cfg.input_size)
    entries = []
    for engine in engines:
        for precision in precisions:
            if precision not in engine_class(engine).precisions:
                continue
            try:
                runner = get_engine(engine).prepare(form, shape, precision, threads, calib=calib)
                checks = check_outputs(runner, lambda x: ref_out[id(x)], inputs)
            except Exception as e:  # converters and runtimes raise their own types; one gap must not stop the rest
                skip(engine, precision, "failed", _one_line(e))
                continue
            worst = max(checks, key=lambda c: c.max_abs_diff / max(1.0, c.max_abs_ref))
            rel = worst.max_abs_diff / max(1.0, worst.max_abs_ref)
            if precision == "fp32":
                try:
                    judge_fp32(runner, checks)
                except EngineError:
                    tol = engine_class(engine).tolerance
                    skip(engine, precision, "refused", f"fp32 differs from PyTorch by {rel:.3g} x max(1, |output|) "
                                                       f"on {worst.input}, over the tolerance {tol:g}", rel)
                    continue
            entries.append(_Entry(backbone, engine, precision, gmacs, runner,
                                  max(c.max_abs_diff for c in checks), rel, precision == "fp32"))
    return entries


def bench_engines(
    backbones: Sequence[str] = ("cpubone_b0", "mobilenetv3_large_100"),
    tasks: Sequence[str] = ("detect", "segment"),
    engines: Union[str, Sequence[str]] = "onnxruntime,eager",
    precisions: Union[str, Sequence[str]] = "fp32",
    size: int = 512,
    threads: int = 1,
    runs: int = 20,
    warmup: int = 5,
    rounds: int = 5,
    fpn_channels: int = 256,
    channels: int = 128,
    detect_classes: int = 80,
    segment_classes: int = 150,
    photos: int = 3,
    progress: bool = False,
) -> DownstreamEnginesResult:
    """Batch-1 latency of the detection and/or segmentation network of each backbone in every engine x precision.

    Each network (``build_network``, seeded random weights) is put in its deploy form (``inference_network``)
    and prepared in every engine of ``cpubone.engines`` for every precision it runs (int8 calibrated on
    scikit-image photos preprocessed like the network's input). Every runner is checked against eager PyTorch
    fp32 (the training form) on a random input and ``photos`` photos: an fp32 runner out of its engine's
    tolerance is refused, not timed; low precision is reported as a difference only -- with random weights it
    says nothing about quality. An engine that cannot convert or run a network is recorded in ``skipped`` with
    a one-line reason and the others are measured. All runners of a task are timed in the same ``rounds``
    interleaved rounds (``cpubone.engines.timing.time_interleaved``); each row's ``ratio`` is its median over
    the first engine x precision timed for the same network.

    ExecuTorch keeps one thread count per process: a second run at another ``threads`` fails there (recorded).
    """

    backbones = list(dict.fromkeys(backbones))
    engine_list, precision_list = check_run_args(backbones, engines, threads, size, runs, warmup, precisions)
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("no task given: expected detect and/or segment")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}: expected one of {', '.join(TASKS)}")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need at least 1 round")
    if not 0 <= photos <= 5:
        raise ValueError(f"photos={photos}: between 0 and 5 scikit-image photos")
    threads = usable_threads(threads)
    rows: List[EngineRow] = []
    skipped: List[EngineSkip] = []
    for task in tasks:
        kwargs = dict(num_classes=detect_classes if task == "detect" else segment_classes,
                      fpn_channels=fpn_channels, channels=channels)
        entries: List[_Entry] = []
        with StepProgress(progress, len(backbones) + min(rounds, runs)) as step:
            for backbone in backbones:
                step(f"prepare {task} {backbone}")
                entries += _prepare_network(task, backbone, engine_list, precision_list, size, threads, kwargs,
                                            photos, skipped)
            with torch_threads(threads):
                lat = time_interleaved({e.key: e.runner.timer() for e in entries}, runs, warmup, rounds, threads, step)
            step(None)
        first: Dict[str, Tuple[str, float]] = {}
        for e in entries:
            res = lat[e.key]
            label, ref_ms = first.setdefault(e.backbone, (f"{e.engine} {e.precision}", res.median_ms))
            info = {k: v for k, v in e.runner.info.items() if not k.startswith("_")}
            rows.append(EngineRow(task, e.backbone, e.engine, e.precision, e.gmacs, res.median_ms, res.p10_ms,
                                  res.p90_ms, res.median_ms / ref_ms, label, e.max_abs_diff, e.rel_diff, e.verified,
                                  info))
        del entries  # the runners of one task are released before the next is prepared
    return DownstreamEnginesResult(machine_info(), tasks, engine_list, precision_list, size, threads, runs, warmup,
                                   min(rounds, runs), rows, skipped)
