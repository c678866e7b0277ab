"""CPU runtimes behind one interface: prepare the inference form (or load an exported file), run a batch.

    from cpubone.engines import get_engine, inference_form
    runner = get_engine("openvino").prepare(inference_form(model), (1, 3, 224, 224), precision="int8",
                                            calib=samples)
    logits = runner(x)                       # float32 (N, C, H, W) -> (N, classes)

Every runtime but eager and compile is an optional extra; ``get_engine`` names the one to install when
it is missing. Every tool that runs a network (``cpubone.analysis``, ``cpubone.deploy``, ``cpubone.design``,
``cpubone.downstream``) runs it through this package; it imports none of them. Importing this package does not import
torch (the torch-free predictor loads artifacts through it).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Type, Union

from .base import (
    PRECISIONS,
    Engine,
    EngineError,
    ExportError,
    MissingExtraError,
    NodeTime,
    Runner,
    cache_dir,
)
from .timing import check_timing_args

__all__ = ["ENGINES", "PRECISIONS", "Engine", "Runner", "NodeTime", "EngineError", "ExportError", "MissingExtraError",
           "get_engine", "engine_names", "register_engine", "available_engines", "engine_for_file", "load_artifact",
           "inference_form", "parse_engines", "parse_precisions", "check_run_args", "cache_dir"]

# name -> (module, class); order = the order reports list them in (ONNX Runtime first: the reference)
ENGINES: Dict[str, Union[Tuple[str, str], Type[Engine]]] = {
    "onnxruntime": (".onnxruntime", "OnnxRuntimeEngine"),
    "openvino": (".openvino", "OpenVINOEngine"),
    "executorch": (".executorch", "ExecuTorchEngine"),
    "litert": (".litert", "LiteRTEngine"),
    "ncnn": (".ncnn", "NcnnEngine"),
    "eager": (".eager", "EagerEngine"),
    "compile": (".compile", "CompileEngine"),
}


def engine_names() -> List[str]:
    return list(ENGINES)


def engine_class(name: str) -> Type[Engine]:
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: expected one of {', '.join(ENGINES)}")
    entry = ENGINES[name]
    if isinstance(entry, type):
        return entry
    module, cls = entry
    return getattr(importlib.import_module(module, __name__), cls)


def register_engine(cls: Type[Engine]) -> Type[Engine]:
    """Add an engine class (e.g. a runtime of your own) under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Engine) and cls.name):
        raise EngineError(f"{cls!r}: an engine is an Engine subclass with a name")
    ENGINES[cls.name] = cls
    return cls


def get_engine(name: str, for_load: bool = False) -> Engine:
    """The engine called ``name``; ``MissingExtraError`` (one line naming the extra) when not installed."""
    cls = engine_class(name)
    cls.require(for_load)
    return cls()


def available_engines(for_load: bool = False) -> List[str]:
    """Names of the engines whose runtime is installed here."""
    return [n for n in ENGINES if engine_class(n).available(for_load)]


def parse_engines(spec: Union[str, List[str]]) -> List[str]:
    """'onnxruntime,openvino' (or a list, or 'all' = every installed one) -> checked engine names."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["all"]:
        return available_engines()
    if not items:
        raise EngineError("no engine given")
    for name in items:
        engine_class(name)
    return list(dict.fromkeys(items))


def parse_precisions(spec: Union[str, List[str]]) -> List[str]:
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise EngineError("no precision given")
    for p in items:
        if p not in PRECISIONS:
            raise EngineError(f"unknown precision {p!r}: expected one of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(items))


def engine_for_file(path: Union[str, os.PathLike]) -> str:
    """The engine that runs an artifact, by its file name ending."""
    name = Path(path).name
    for engine in ENGINES:
        suffix = engine_class(engine).suffix
        if suffix and name.endswith(suffix):
            return engine
    known = ", ".join(f"{engine_class(e).suffix} ({e})" for e in ENGINES if engine_class(e).suffix)
    raise EngineError(f"{path}: unknown model file type; expected one of {known}")


def load_artifact(path: Union[str, os.PathLike], threads: int = 1) -> Runner:
    """A runner for an exported file of any engine (chosen by its suffix)."""
    return get_engine(engine_for_file(path), for_load=True).load(path, threads)


def inference_form(model):
    """The form a model is deployed in: CPUBone's inference form (``cpubone.deploy.reparameterize``), a
    timm model with train-time branches folded (``timm.utils.reparameterize_model``), else the model."""
    from timm.utils import reparameterize_model

    from ..models import CPUBone
    from ..models.reparam import reparameterize

    model.eval()
    if isinstance(model, CPUBone):
        return reparameterize(model)
    # the hooks timm's reparameterize_model calls (RepViT, MobileOne, FastViT and the like)
    if any(hasattr(m, a) for m in model.modules() for a in ("fuse", "reparameterize", "switch_to_deploy")):
        return reparameterize_model(model).eval()
    return model


def check_run_args(models: Sequence[str], engine: Union[str, Sequence[str]] = "onnxruntime", threads: int = 1,
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
    from ..models import (
        resolve_model_name,  # here: importing the engines must not import torch
    )

    for name in models:
        resolve_model_name(name)  # unknown names fail here, before any measuring
    return engines, precisions
