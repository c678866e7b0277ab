"""What machine a measurement ran on, and the fp32 GEMM peak it reaches at a given thread count.

Latency figures are only comparable on one machine, so every report names the CPU, the ISA the
kernels can use and the library versions. The GEMM peak is the ceiling a conv network can approach
on that CPU (convs run as GEMMs); "% of peak" says how well a model uses the hardware, the paper's
MACpS argument in one number.
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .eager import torch_threads
from .onnxruntime import ort_session
from .timing import LatencyResult, time_callable

__all__ = ["MachineInfo", "GemmPeak", "machine_info", "isa_features", "usable_threads", "gemm_runner", "gemm_peak",
           "GEMM_N"]

# 512x512x512: large enough for the kernel's steady state, small enough to stay cache-resident
# (the regime of the convs of a small backbone at batch 1).
GEMM_N = 512
# the engines gemm_runner measures the fp32 GEMM peak in
GEMM_ENGINES = ("onnxruntime", "eager")

# /proc/cpuinfo flag -> the name we report; order = from basic to advanced.
_X86_FLAGS = [("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx_vnni", "AVX-VNNI"),
              ("avx512_vnni", "AVX512-VNNI"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")]
_ARM_FLAGS = [("asimd", "NEON"), ("asimddp", "DOTPROD"), ("i8mm", "I8MM"), ("sve", "SVE"), ("sve2", "SVE2")]


@dataclass
class MachineInfo:
    """The CPU and software a measurement ran on."""

    cpu: str
    arch: str
    logical_cpus: int
    usable_cpus: int
    isa: List[str] = field(default_factory=list)
    os: str = ""
    python: str = ""
    versions: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def header(self, threads: int) -> str:
        """One line naming the machine, e.g. for report titles."""
        vers = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        return (f"{self.cpu} ({self.arch}; {threads} of {self.usable_cpus} usable cores; ISA: "
                f"{'/'.join(self.isa) or 'unknown'}); {vers}")


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _cpu_name(cpuinfo: str) -> str:
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in cpuinfo.splitlines():
            if line.split(":")[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def isa_features(cpuinfo: Optional[str] = None, arch: Optional[str] = None) -> List[str]:
    """SIMD extensions the CPU reports (AVX2 / AVX-512 / VNNI / AMX on x86, NEON / SVE on ARM).

    Read from the ``flags`` / ``Features`` lines of /proc/cpuinfo; on Apple silicon (no
    /proc/cpuinfo) NEON is implied by the architecture.
    """
    cpuinfo = _read_cpuinfo() if cpuinfo is None else cpuinfo
    arch = (arch or platform.machine()).lower()
    flags: set = set()
    for line in cpuinfo.splitlines():
        key = line.split(":")[0].strip().lower()
        if key in ("flags", "features") and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    table = _ARM_FLAGS if arch.startswith(("arm", "aarch")) else _X86_FLAGS
    found = [name for flag, name in table if flag in flags]
    if not found and arch in ("arm64", "aarch64"):
        found = ["NEON"]  # mandatory in ARMv8-A
    return found


def _versions() -> Dict[str, str]:
    import torch

    from .. import __version__

    vers = {"cpubone": __version__, "torch": torch.__version__.split("+")[0]}
    for mod in ("timm", "onnxruntime", "onnx"):
        try:
            vers[mod] = __import__(mod).__version__
        except ImportError:
            pass
    # the other runtimes of cpubone.engines, when installed (from the package metadata: importing
    # ExecuTorch or OpenVINO just to name their version would take seconds)
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("openvino", "nncf", "executorch", "ai-edge-litert", "ncnn", "pnnx"):
        try:
            vers[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return vers


@lru_cache(maxsize=1)
def machine_info() -> MachineInfo:
    """CPU model, architecture, usable cores, ISA and library versions of this machine."""
    cpuinfo = _read_cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        usable = os.cpu_count() or 1
    return MachineInfo(
        cpu=_cpu_name(cpuinfo), arch=platform.machine(), logical_cpus=os.cpu_count() or 1, usable_cpus=usable,
        isa=isa_features(cpuinfo), os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(), versions=_versions(),
    )


def usable_threads(threads: int) -> int:
    """``threads``, or the cores this process may use when more are asked for (with a warning).

    More threads than cores only time the operating system's scheduler: the run goes on with what the
    machine has, and says so.
    """
    usable = machine_info().usable_cpus
    if threads > usable:
        warnings.warn(f"threads={threads}: only {usable} core(s) usable on this machine; timing with {usable}",
                      RuntimeWarning, stacklevel=2)
        return usable
    return threads


@dataclass
class GemmPeak:
    """GEMM throughput of this machine in one precision: the MACpS ceiling for models of that precision."""

    engine: str
    method: str
    threads: int
    gmacps: float
    latency: LatencyResult
    precision: str = "fp32"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency"] = self.latency.to_dict()
        return d


def _ort_matmul_file(path: Path, n: int) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm_peak",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 9)
    onnx.save(model, str(path))


def _ort_int8_matmul_file(path: Path, n: int) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).integers(-127, 128, (n, n), dtype=np.int8), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["C"])], "gemm_peak_int8",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.INT32, [n, n])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 9)
    onnx.save(model, str(path))


# the precisions a GEMM peak is measured in, each in the runtime whose kernels its model rows use most
GEMM_PRECISIONS = ("fp32", "int8", "bf16")


def gemm_runner(engine: str = "onnxruntime", threads: int = 1, n: int = GEMM_N,
                precision: str = "fp32") -> Tuple[Callable[[], object], str]:
    """A zero-argument ``n x n x n`` matmul in ``engine`` and ``precision``, and a line naming it.

    fp32 -- ONNX Runtime: a one-node ``MatMul`` graph (weights as an initializer, like a conv's) in a session
    with ``threads`` intra-op threads; eager: ``torch.matmul`` of two ``n x n`` tensors (call it inside
    ``torch_threads(threads)``). int8: ONNX Runtime's ``MatMulInteger`` (uint8 x int8 -> int32, the
    product its quantized convs run; MLAS uses VNNI / AMX / dot-product instructions where the CPU has
    them), whatever ``engine`` is. bf16: ``torch.matmul`` in bfloat16 (oneDNN's AVX512-BF16 / AMX kernels).
    """
    import numpy as np

    if precision == "int8":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "matmul_int8.onnx"
            _ort_int8_matmul_file(path, n)
            sess = ort_session(path, threads)
        feed = {"A": np.random.default_rng(1).integers(0, 256, (n, n), dtype=np.uint8)}
        return (lambda: sess.run(None, feed)), f"ONNX Runtime MatMulInteger {n}x{n}x{n} u8s8 int8"
    if precision == "bf16":
        import torch

        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g).to(torch.bfloat16) for _ in range(2))
        return (lambda: torch.matmul(a, b)), f"torch.matmul {n}x{n}x{n} bf16"
    if precision != "fp32":
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(GEMM_PRECISIONS)}")
    if engine == "onnxruntime":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "matmul.onnx"
            _ort_matmul_file(path, n)
            sess = ort_session(path, threads)
        feed = {"A": np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)}
        return (lambda: sess.run(None, feed)), f"ONNX Runtime MatMul {n}x{n}x{n} fp32"
    if engine.startswith("eager"):
        import torch

        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        return (lambda: torch.matmul(a, b)), f"torch.matmul {n}x{n}x{n} fp32"
    raise ValueError(f"engine={engine!r}: expected one of {', '.join(GEMM_ENGINES)}")


@lru_cache(maxsize=None)
def gemm_peak(engine: str = "onnxruntime", threads: int = 1, n: int = GEMM_N, runs: int = 30,
              warmup: int = 5) -> GemmPeak:
    """Measure fp32 ``n x n x n`` matrix multiply throughput in ``engine`` at ``threads`` threads.

    The same engine and thread count as the model it is compared with, so a model's "% of peak" is
    like for like.
    """
    fn, method = gemm_runner(engine, threads, n)
    if engine == "onnxruntime":
        lat = time_callable(fn, runs, warmup, threads, "onnxruntime")
    else:
        import torch

        with torch_threads(threads), torch.inference_mode():
            lat = time_callable(fn, runs, warmup, threads, "eager")
    return GemmPeak(engine=engine, method=method, threads=threads, gmacps=lat.macps(n ** 3), latency=lat)
