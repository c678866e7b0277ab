"""End-to-end batch-1 CPU latency of the detection and segmentation models, CPUBone and peers in one run.

All timings go through the project's latency harness (``cpubone.analysis.latency``); MACs through
``count_macs``. Every backbone gets the same head, FPN width and input size, so the comparison is like for like.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..analysis.latency import measure_eager, measure_onnx, ort_session, torch_threads, time_callable
from ..analysis.macs import count_macs, count_params
from .detection import RetinaNetRaw, create_retinanet
from .presets import DEFAULT_PEERS
from .segmentation import create_semantic_fpn

__all__ = ["machine_name", "bench_detection", "bench_segmentation", "DEFAULT_PEERS"]



def machine_name() -> str:
    """The CPU model (and usable core count) the numbers were measured on."""
    from ..analysis.machine import machine_info

    info = machine_info()
    return f"{info.cpu} ({info.usable_cpus} usable cores)"


def _onnx_ms(model: torch.nn.Module, size: int, threads: int, runs: int, warmup: int, tmp: Path,
             name: str) -> Dict[str, Any]:
    """Export, check ORT against eager on one input, and time in ORT. Failures are reported, not raised."""
    from ..deploy.onnx import export_onnx

    try:
        path = export_onnx(model, tmp / f"{name}.onnx", input_size=(size, size))
        x = torch.rand(1, 3, size, size)
        with torch.inference_mode():
            ref = model(x).numpy()
        got = ort_session(path, threads).run(None, {"input": x.numpy()})[0]
        res = measure_onnx(path, (1, 3, size, size), threads=threads, runs=runs, warmup=warmup)
        return {"ort_ms": res.median_ms, "ort_max_abs_diff": float(np.abs(got - ref).max())}
    except Exception as e:  # an exporter or runtime gap of one peer must not lose the whole table
        return {"ort_ms": None, "ort_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def bench_detection(backbones: Sequence[str] = DEFAULT_PEERS, size: int = 512, threads: int = 1, runs: int = 20,
                    warmup: int = 5, num_classes: int = 80, onnx: bool = True, fpn_channels: int = 256) -> Dict[str, Any]:
    """RetinaNet latency per backbone at ``size`` x ``size``, batch 1.

    Columns: ``e2e_eager_ms`` the whole torchvision RetinaNet (normalise/resize, network, anchor decoding,
    NMS) on one image; ``net_eager_ms`` / ``ort_ms`` the network up to the head outputs (``RetinaNetRaw``) in
    eager PyTorch / ONNX Runtime. Post-processing is data dependent (anchors above the score threshold), so
    ``e2e`` depends on the weights; with random weights few anchors pass the 0.05 threshold.
    """
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
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
                row.update(_onnx_ms(raw, size, threads, runs, warmup, Path(tmp), name.replace("/", "_")))
            rows.append(row)
    return {"task": "RetinaNet (FPN P3-P7)", "size": size, "threads": threads, "runs": runs,
            "machine": machine_name(), "torch": torch.__version__, "rows": rows}


def bench_segmentation(backbones: Sequence[str] = DEFAULT_PEERS, size: int = 512, threads: int = 1, runs: int = 20,
                       warmup: int = 5, num_classes: int = 150, onnx: bool = True, fpn_channels: int = 256,
                       channels: int = 128) -> Dict[str, Any]:
    """Semantic FPN latency per backbone at ``size`` x ``size``, batch 1: image in [0, 1] -> logits at full
    resolution (normalisation and final upsampling included), eager and ONNX Runtime. The argmax is not timed."""
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in backbones:
            seg = create_semantic_fpn(name, num_classes, fpn_channels=fpn_channels, channels=channels).eval()
            row: Dict[str, Any] = {"backbone": name, "params_M": count_params(seg) / 1e6,
                                   "GMACs": count_macs(seg, size).total / 1e9,
                                   "eager_ms": measure_eager(seg, (1, 3, size, size), threads, runs, warmup).median_ms}
            if onnx:
                row.update(_onnx_ms(seg, size, threads, runs, warmup, Path(tmp), name.replace("/", "_")))
            rows.append(row)
    return {"task": "Semantic FPN", "size": size, "threads": threads, "runs": runs, "machine": machine_name(),
            "torch": torch.__version__, "rows": rows}
