"""ONNX Runtime (the default engine, the paper's CPU path): fp32, and int8 as static QDQ.

The network is exported with the project's ONNX exporter (``cpubone.deploy.onnx.export_onnx``); int8 is
ONNX Runtime's static quantization (per-channel weights, the stem and classifier kept in float, see
``cpubone.engines.onnx_quantize``). Loading a ``.onnx`` file needs onnxruntime and numpy only.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..preprocess import PreprocessConfig
from .base import (
    Engine,
    EngineError,
    NodeTime,
    Runner,
    calibration_batches,
    check_threads,
)

__all__ = ["OnnxRuntimeEngine", "ort_session", "share_thread_pool"]

_SHARED_POOL: Optional[int] = None  # threads of this process's shared ONNX Runtime pool, once made


def share_thread_pool(threads: int) -> bool:
    """Give every later ONNX Runtime session of this process one shared pool of ``threads`` threads.

    Timing many small sessions at more than one thread (``cpubone design lut``) is repeatable only when
    they share one pool, as the ops of a network do: with a pool per session, each of hundreds of sessions
    has worker threads the OS places anew, and the same unit's median moved by up to 2.4x between two
    table builds on a 2-core AMD EPYC (0.86-1.61x for the middle 80% of units; shared: 0.98-1.04x).
    ONNX Runtime allows one such pool per process, and once it exists every new session must run on it:
    ``ort_session`` then refuses other thread counts (sessions made before keep their own pools).
    Returns False where the process already has a pool of another size (or onnxruntime lacks the call).
    """
    global _SHARED_POOL
    if _SHARED_POOL is not None:
        return _SHARED_POOL == threads
    check_threads(threads)
    try:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)
    except Exception:  # a pool made outside this module, or an onnxruntime without the call
        return False
    _SHARED_POOL = threads
    return True


def ort_session(path: Union[str, os.PathLike], threads: int = 1, enable_profiling: bool = False,
                optimized_model_path: Optional[str] = None, profile_prefix: Optional[str] = None):
    """An ONNX Runtime CPU session with pinned thread counts and all graph optimizations on.

    ``enable_profiling`` needs ``profile_prefix`` (a path prefix for the trace file): ONNX Runtime would
    otherwise write it into the current directory.
    """
    import onnxruntime as ort

    check_threads(threads)
    if enable_profiling and not profile_prefix:
        raise ValueError("profiling needs profile_prefix: where ONNX Runtime writes its trace file")
    so = ort.SessionOptions()
    if _SHARED_POOL is not None:
        if threads != _SHARED_POOL:
            raise EngineError(f"this process runs ONNX Runtime on one shared pool of {_SHARED_POOL} thread(s) "
                              f"(share_thread_pool); a session at {threads} needs a process of its own")
        so.use_per_session_threads = False
    else:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = enable_profiling
    if profile_prefix:
        so.profile_file_prefix = str(profile_prefix)
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for malformed files
        raise EngineError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {str(e).splitlines()[0]})") from e


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    title = "ONNX Runtime"
    extra = "deploy"
    modules = ("onnxruntime", "onnx", "onnxscript")
    load_modules = ("onnxruntime",)
    load_packages = ("onnxruntime",)
    precisions = ("fp32", "int8")
    suffix = ".onnx"
    torch_free = True
    node_profiler = "ONNX Runtime's session profiler (SessionOptions.enable_profiling)"

    def _prepare(self, model, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        from .onnx_export import (  # torch: only where a model is prepared
            add_metadata,
            export_onnx,
        )
        from .onnx_quantize import quantize_onnx

        path = export_onnx(model, workdir / "model.onnx", input_size=input_shape[2:])
        if precision == "int8":
            # quantize_onnx reads the preprocessing from the file; the engine gets preprocessed samples
            add_metadata(path, PreprocessConfig(input_size=input_shape[1:], mean=(0.0,) * input_shape[1],
                                                std=(1.0,) * input_shape[1]).to_metadata())
            path = quantize_onnx(path, workdir / "model.int8.onnx", calib_data=calibration_batches(calib),
                                 max_images=len(calib))
        runner = self._load(path, threads)
        runner.precision = precision
        return runner

    def _load(self, path: Path, threads: int) -> Runner:
        sess = ort_session(path, threads)
        inp = sess.get_inputs()[0]
        meta = sess.get_modelmeta().custom_metadata_map
        precision = "int8" if meta.get("cpubone.int8") == "true" else "fp32"
        shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
        name = inp.name
        run = lambda x: sess.run(None, {name: x})[0]  # noqa: E731
        return Runner(self.name, precision, threads, shape, run, artifact=path, files=[path],
                      info=dict(_session=sess))

    def _profile_nodes(self, runner: Runner, runs: int, warmup: int) -> List[NodeTime]:
        # the trace (megabytes) goes to a private temporary folder, never the current directory, and is
        # removed however the run ends, Ctrl-C included
        with tempfile.TemporaryDirectory(prefix="cpubone-profile-") as tmp:
            sess = ort_session(runner.artifact, runner.threads, enable_profiling=True,
                               profile_prefix=os.path.join(tmp, "ort_trace"))
            x = np.random.default_rng(0).standard_normal(runner.input_shape).astype(np.float32)
            feed = {sess.get_inputs()[0].name: x}
            try:
                for _ in range(warmup + runs):
                    sess.run(None, feed)
            finally:
                trace = Path(sess.end_profiling())  # closes the trace file before the folder goes
                del sess
            events = json.loads(trace.read_text())
        times: Dict[str, List[float]] = defaultdict(list)
        order: Dict[str, str] = {}  # node -> op type, in execution order
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            node = e["name"][: -len("_kernel_time")]
            order.setdefault(node, e.get("args", {}).get("op_name", "?"))
            times[node].append(e["dur"] / 1e3)
        # the profiled runs, not the warm-up
        return [NodeTime(node, op, statistics.median(times[node][-runs:])) for node, op in order.items()]
