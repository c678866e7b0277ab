"""OpenVINO (CPU plugin): f32, bf16 (the plugin's inference-precision hint) and int8 (NNCF post-training).

The inference form is converted from PyTorch directly (``openvino.convert_model`` with an example input)
and saved as OpenVINO IR (``.xml`` + ``.bin``, weights kept in fp32). The precision is stored in the IR's
``rt_info`` so a loaded file runs as it was verified. Loading an IR needs openvino and numpy only.

Per-node profile: the IR compiled a second time with ``PERF_COUNT`` on; each infer request's
``get_profiling_info()`` gives every node of the plugin's executable graph with its real time and the
kernel the plugin picked (``exec_type``: ``brgconv_avx512_1x1_f32``, ``jit_avx512_f32``, ``ref_any_f32``).
The PyTorch frontend names nodes after the module scope (``__module.stages.2.blocks.0.attn.qkv/
aten::_convolution/Convolution``); the plugin keeps those names, and the runtime model
(``get_runtime_model()``) lists, per executed node, the original layers it fused or decomposed into it
(``originalLayersNames``: a GroupNorm becomes ``MVN_123`` + ``Multiply`` + the norm's own ``Add``).
"""
from __future__ import annotations

import statistics
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import Engine, EngineError, NodeTime, Runner, calibration_batches

__all__ = ["OpenVINOEngine"]

_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVINOEngine(Engine):
    name = "openvino"
    title = "OpenVINO"
    extra = "openvino"
    modules = ("openvino", "nncf")
    load_modules = ("openvino",)
    load_packages = ("openvino",)
    precisions = ("fp32", "bf16", "int8")
    suffix = ".xml"
    torch_free = True
    node_profiler = "OpenVINO's per-node performance counters (PERF_COUNT, get_profiling_info)"

    def _prepare(self, model, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        import openvino as ov
        import torch

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ov_model = ov.convert_model(model.eval(), example_input=torch.randn(input_shape),
                                        input=[list(input_shape)])
        if precision == "int8":
            import nncf

            data = calibration_batches(calib)
            ov_model = nncf.quantize(ov_model, nncf.Dataset(data), subset_size=len(data))
        ov_model.set_rt_info(precision, ["cpubone", "precision"])
        path = workdir / "model.xml"
        ov.save_model(ov_model, str(path), compress_to_fp16=False)
        return self._load(path, threads)

    def _load(self, path: Path, threads: int) -> Runner:
        compiled, precision, ov_model = _compile(path, threads)
        request = compiled.create_infer_request()
        shape = tuple(int(d) for d in ov_model.input(0).get_partial_shape().to_shape())

        def run(x: np.ndarray) -> np.ndarray:
            request.infer({0: x}, share_inputs=True)
            return request.get_output_tensor(0).data.copy()

        return Runner(self.name, precision, threads, shape, run, artifact=path, files=[path, path.with_suffix(".bin")],
                      info=dict(inference_precision=compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                                _compiled=compiled))

    def _profile_nodes(self, runner: Runner, runs: int, warmup: int) -> List[NodeTime]:
        compiled, _, _ = _compile(runner.artifact, runner.threads, perf_count=True)
        request = compiled.create_infer_request()
        x = np.random.default_rng(0).standard_normal(runner.input_shape).astype(np.float32)
        times: Dict[str, List[float]] = defaultdict(list)
        kind: Dict[str, Tuple[str, str]] = {}  # node -> (type, exec type), in execution order
        for i in range(warmup + runs):
            request.infer({0: x}, share_inputs=True)
            if i < warmup:
                continue
            for p in request.get_profiling_info():
                # NOT_RUN: folded into another node or a no-op (Reshape, Parameter); OPTIMIZED_OUT: removed
                if p.status == p.Status.EXECUTED:
                    kind.setdefault(p.node_name, (p.node_type, p.exec_type))
                    times[p.node_name].append(p.real_time.total_seconds() * 1e3)
        fused = {}
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            names = rt["originalLayersNames"].astype(str) if "originalLayersNames" in rt else ""
            fused[op.get_friendly_name()] = tuple(n for n in names.split(",") if n)
        return [NodeTime(node, op, statistics.median(times[node]), exec_type, fused.get(node, ()))
                for node, (op, exec_type) in kind.items()]


def _compile(path: Path, threads: int, perf_count: bool = False):
    """The IR at ``path`` compiled for the CPU plugin at its stored precision: (compiled, precision, model)."""
    import openvino as ov

    core = ov.Core()
    try:
        ov_model = core.read_model(str(path))
    except RuntimeError as e:
        raise EngineError(f"{path}: not a readable OpenVINO IR ({str(e).splitlines()[0]})") from e
    precision = "fp32"
    if ov_model.has_rt_info(["cpubone", "precision"]):
        precision = ov_model.get_rt_info(["cpubone", "precision"]).astype(str)
    if precision == "bf16" and not _cpu_has_bf16(core):
        raise EngineError("OpenVINO bf16: this CPU has no bf16 instructions (AVX512-BF16 / AMX), the plugin "
                          "would run f32")
    compiled = core.compile_model(ov_model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": _HINT.get(precision, "f32"), "ENABLE_CPU_PINNING": False,
        "PERF_COUNT": perf_count,
    })
    return compiled, precision, ov_model


def _cpu_has_bf16(core) -> bool:
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in [str(c).upper() for c in caps]
