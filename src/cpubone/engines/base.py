"""The one small interface every CPU runtime is used through.

An ``Engine`` turns a network into a ``Runner``: either from the inference form (a ``torch.nn.Module``
in eval mode, ``Engine.prepare``) or from a file it exported before (``Engine.load``). A runner runs a
float32 batch (N, C, H, W) -> (N, classes) on numpy arrays with a pinned thread count, knows its
precision and describes itself. Nothing here imports torch at module level: ``load`` of the runtimes
that do not need torch (ONNX Runtime, OpenVINO, LiteRT, ncnn) works in a torch-free install.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["PRECISIONS", "Engine", "Runner", "NodeTime", "EngineError", "ExportError", "MissingExtraError",
           "check_threads", "cache_dir", "PREDICTOR_PACKAGES", "install_footprint"]

# what `cpubone predict` itself imports on a device, besides the runtime (the torch-free predictor)
PREDICTOR_PACKAGES = ("numpy", "pillow", "rich")

PRECISIONS = ("fp32", "bf16", "int8")

PathLike = Union[str, os.PathLike]


class EngineError(ValueError):
    """A runtime cannot do what was asked (precision, input, file); the message names the problem."""


class ExportError(EngineError):
    """The exporter could not convert the model; the message names the model and the exporter's reason."""


class MissingExtraError(EngineError):
    """The runtime's Python package is not installed; the message names the extra that installs it."""


def cache_dir() -> Path:
    """User cache for exported artifacts: $CPUBONE_CACHE_DIR, else $XDG_CACHE_HOME/cpubone, else ~/.cache/cpubone."""
    if os.environ.get("CPUBONE_CACHE_DIR"):
        return Path(os.environ["CPUBONE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpubone"


def _versions(modules: Sequence[str]) -> str:
    out = []
    for m in modules:
        try:
            out.append(f"{m} {importlib.metadata.version(m)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{m} ?")
    return ", ".join(out)


def _requirement_names(dist: importlib.metadata.Distribution) -> List[str]:
    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):  # what a plain install pulls in
            out.append(req.name)
    return out


def install_footprint(packages: Sequence[str]) -> Tuple[List[str], Optional[int]]:
    """The distributions ``pip install PACKAGES`` brings (the packages and what they require, as installed here)
    and their size on disk in bytes; None when one of them is not installed here (size unknown)."""
    seen: Dict[str, Optional[importlib.metadata.Distribution]] = {}
    todo = list(packages)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            seen[key] = None
            continue
        seen[key] = dist
        todo += _requirement_names(dist)
    if any(d is None for d in seen.values()):
        return sorted(seen), None
    total = 0
    for dist in seen.values():
        for f in dist.files or []:
            try:
                total += os.stat(dist.locate_file(f)).st_size
            except OSError:
                continue
    return sorted(seen), total


def check_threads(threads: int) -> int:
    if not isinstance(threads, int) or threads < 1:
        raise EngineError(f"threads={threads}: need at least 1 thread")
    return threads


@dataclass
class Runner:
    """A prepared network in one runtime: call it on a float32 (N, C, H, W) array.

    ``run_one`` takes one (1, C, H, W) sample: every runtime here is prepared for batch 1 (the latency
    regime the project measures), so a batch runs sample by sample.

    Attributes:
        engine / precision / threads: what runs it.
        input_shape: the (1, C, H, W) it was prepared for.
        artifact: the file it runs from (None for in-process engines: eager).
        files: every file that makes up the artifact (ncnn: .param + .bin).
        info: engine-specific facts for reports (e.g. ExecuTorch's XNNPACK partition count).
    """

    engine: str
    precision: str
    threads: int
    input_shape: Tuple[int, ...]
    run_one: Callable[[np.ndarray], np.ndarray]
    artifact: Optional[Path] = None
    files: List[Path] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or any(want not in (-1, got) for want, got in zip(self.input_shape[1:], x.shape[1:])):
            raise EngineError(f"{self.engine}: input of shape {tuple(x.shape)}, prepared for "
                              f"(N, {', '.join(map(str, self.input_shape[1:]))})")
        return np.concatenate([np.asarray(self.run_one(x[i:i + 1]), dtype=np.float32).reshape(1, -1)
                               for i in range(x.shape[0])], 0)

    def timer(self, seed: int = 0) -> Callable[[], object]:
        """A zero-argument call on a fixed random sample (prepared once, outside the timed region)."""
        x = np.random.default_rng(seed).standard_normal(self.input_shape).astype(np.float32)
        run = self.run_one
        return lambda: run(x)

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision}"

    def describe(self) -> Dict[str, Any]:
        return dict(engine=self.engine, precision=self.precision, threads=self.threads,
                    input_shape=list(self.input_shape), artifact=str(self.artifact) if self.artifact else None,
                    **{k: v for k, v in self.info.items() if not k.startswith("_")})


@dataclass
class NodeTime:
    """One node of a runtime's executed graph, timed by the runtime's own profiler.

    Attributes:
        node: the runtime's name for it (ONNX Runtime: the ONNX node name, which the exporter writes after
            the module scope; OpenVINO: the friendly name, after the module scope of the PyTorch frontend).
        op: its type in the runtime ("Conv", "FusedConv", "Convolution", "FullyConnected", "Reorder").
        ms: median time over the profiled runs.
        exec_type: the kernel the runtime picked ("brgconv_avx512_1x1_f32", "ref_any_f32"); '' when the
            runtime does not say.
        fused: names of the graph nodes the runtime folded into this one (its own decompositions included),
            in graph order; empty when the runtime does not say.
    """

    node: str
    op: str
    ms: float
    exec_type: str = ""
    fused: Tuple[str, ...] = ()


class Engine:
    """A CPU runtime behind the project's interface (subclasses: one module per runtime).

    Class attributes:
        name: what ``--engine`` calls it.
        title: its name in reports.
        extra: the pip extra that installs it (``pip install 'cpubone[extra]'``).
        load_extra: the extra that is enough to run its files (default: ``extra``).
        modules: import names it needs to prepare a model (from the inference form).
        load_modules: import names it needs to run an exported file (its torch-free subset).
        precisions: what it runs, a subset of ``PRECISIONS``.
        suffix: the artifact's file name ending.
        torch_free: whether ``load`` runs without torch.
        load_packages: the pip distributions that run its file on a device (with ``PREDICTOR_PACKAGES``).
        node_profiler: the runtime's per-node profiler that ``profile_nodes`` reads ('' when it has none
            reachable from Python).
    """

    name = ""
    title = ""
    extra = ""
    load_extra = ""
    modules: Tuple[str, ...] = ()
    load_modules: Tuple[str, ...] = ()
    precisions: Tuple[str, ...] = ("fp32",)
    suffix = ""
    torch_free = False
    load_packages: Tuple[str, ...] = ("torch",)
    node_profiler = ""
    # relative fp32 tolerance vs PyTorch (x max(1, max |logit|)); engines that reorder float sums more
    # freely than ONNX Runtime (Winograd, different GEMM blocking) get a looser one, stated in the docs
    tolerance = 1e-4

    @classmethod
    def device_needs(cls) -> Dict[str, Any]:
        """What a device must install to run this engine's file with ``cpubone predict``: the packages, whether
        torch is among them, and their installed size as measured in this environment (None if unknown)."""
        names, size = install_footprint((*PREDICTOR_PACKAGES, *cls.load_packages))
        return dict(packages=[*PREDICTOR_PACKAGES, *cls.load_packages], torch_free=cls.torch_free,
                    installed_mb=round(size / 2 ** 20, 1) if size is not None else None, distributions=len(names))

    @classmethod
    def missing(cls, for_load: bool = False) -> List[str]:
        """The import names of this runtime that are not installed."""
        mods = cls.load_modules if for_load else cls.modules
        return [m for m in mods if importlib.util.find_spec(m) is None]

    @classmethod
    def available(cls, for_load: bool = False) -> bool:
        return not cls.missing(for_load)

    @classmethod
    def require(cls, for_load: bool = False) -> None:
        """Raise ``MissingExtraError`` (one line naming the extra) when the runtime is not installed."""
        missing = cls.missing(for_load)
        if missing:
            extra = (cls.load_extra or cls.extra) if for_load else cls.extra
            raise MissingExtraError(f"engine {cls.name!r} needs {', '.join(missing)}: "
                                    f"pip install 'cpubone[{extra}]'")

    @classmethod
    def check_precision(cls, precision: str) -> None:
        if precision not in cls.precisions:
            raise EngineError(f"engine {cls.name!r} does not run precision {precision!r} "
                              f"(it runs {', '.join(cls.precisions)})")

    def prepare(self, model: Any, input_shape: Sequence[int], precision: str = "fp32", threads: int = 1,
                calib: Optional[Sequence[np.ndarray]] = None, workdir: Optional[PathLike] = None,
                cache_key: Optional[str] = None) -> Runner:
        """A runner for ``model`` (the inference form, eval mode) at ``input_shape`` (1, C, H, W).

        Args:
            precision: one of ``self.precisions``.
            calib: int8 only: preprocessed (1, C, H, W) float32 samples to calibrate activation ranges on.
            workdir: folder for the artifact (a temporary folder when None: kept alive by the runner).
            cache_key: what identifies ``model``'s network and weights (its name, seeded weights, design
                config); with it, an engine that writes one file keeps it in ``cache_dir()`` under that key,
                the shape, the precision and the library versions, and a later call loads it instead of
                exporting again (an export of B0 takes seconds, a benchmark run prepares dozens).
        """
        self.require()
        self.check_precision(precision)
        check_threads(threads)
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 4 or input_shape[0] != 1:
            raise EngineError(f"input shape {input_shape}: expected (1, C, H, W)")
        if precision == "int8" and not calib:
            raise EngineError(f"engine {self.name!r}: int8 needs calibration samples")
        if cache_key is not None and self.suffix:
            return self._prepare_cached(model, input_shape, precision, threads, calib, cache_key)
        if workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix=f"cpubone-{self.name}-")
            runner = self._prepare(model, input_shape, precision, threads, calib, Path(tmp.name))
            runner.info.setdefault("_tmp", tmp)  # the folder lives as long as the runner
            return runner
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return self._prepare(model, input_shape, precision, threads, calib, workdir)

    def cache_path(self, cache_key: str, input_shape: Sequence[int], precision: str) -> Path:
        """Where ``prepare(..., cache_key=...)`` keeps this engine's artifact."""
        key = (f"{cache_key}|{tuple(int(s) for s in input_shape)}|{precision}|"
               f"{_versions(('torch', 'timm', 'cpubone', *self.modules))}")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in cache_key)[:60]
        return cache_dir() / self.name / f"{safe}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.{precision}{self.suffix}"

    def _prepare_cached(self, model: Any, input_shape: Tuple[int, ...], precision: str, threads: int,
                        calib: Optional[Sequence[np.ndarray]], cache_key: str) -> Runner:
        path = self.cache_path(cache_key, input_shape, precision)
        if path.is_file():
            runner = self._load(path, threads)
            runner.precision, runner.input_shape = precision, input_shape
            runner.info["cached"] = True
            return runner
        runner = self.prepare(model, input_shape, precision, threads, calib)
        if runner.artifact is not None and runner.files == [runner.artifact]:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            os.close(fd)
            try:
                shutil.copyfile(runner.artifact, tmp)
                os.replace(tmp, path)  # a concurrent or killed run never leaves half a file under the key
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return runner

    def load(self, path: PathLike, threads: int = 1) -> Runner:
        """A runner for a file this engine wrote (``runner.artifact``)."""
        self.require(for_load=True)
        check_threads(threads)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{self.title} model not found: {path}")
        return self._load(path, threads)

    def profile_nodes(self, runner: Runner, runs: int = 20, warmup: int = 5) -> List[NodeTime]:
        """Per-node times of ``runner`` (from this engine) from the runtime's own profiler, in execution order.

        Profiles a second instance of the runner's network with the profiler switched on, so the runner
        itself stays as fast as it was; ``warmup`` untimed runs precede the ``runs`` profiled ones.
        """
        if not self.node_profiler:
            raise EngineError(f"engine {self.name!r} has no per-node profiler reachable from Python here")
        if runner.engine != self.name:
            raise EngineError(f"engine {self.name!r} cannot profile a runner of engine {runner.engine!r}")
        if runs < 1 or warmup < 0:
            raise EngineError(f"runs={runs}, warmup={warmup}: need at least 1 profiled run and no negative warm-up")
        return self._profile_nodes(runner, runs, warmup)

    # --- what each runtime implements ---
    def _prepare(self, model: Any, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        raise NotImplementedError

    def _profile_nodes(self, runner: Runner, runs: int, warmup: int) -> List[NodeTime]:
        raise NotImplementedError

    def _load(self, path: Path, threads: int) -> Runner:
        raise EngineError(f"engine {self.name!r} has no file to load; prepare it from the model")


def calibration_batches(calib: Iterable[np.ndarray]) -> List[np.ndarray]:
    """Calibration samples as contiguous float32 (1, C, H, W) arrays."""
    out = []
    for x in calib:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out.append(x[None] if x.ndim == 3 else x)
    return out
