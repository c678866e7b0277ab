"""ncnn (Tencent's mobile/ARM inference library), converted with pnnx: fp32.

``pnnx`` traces the inference form with TorchScript and writes an ncnn graph (``.ncnn.param`` +
``.ncnn.bin``, fp32 weights). ncnn's fp16/bf16 storage and arithmetic are switched off so the result is
comparable with PyTorch; int8 in ncnn needs its offline ``ncnn2table`` / ``ncnn2int8`` tools, not part
of the Python wheels, so it is not offered. Loading needs ncnn and numpy only.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .base import Engine, EngineError, Runner

__all__ = ["NcnnEngine"]


@contextlib.contextmanager
def _quiet_stdout():
    """Send what this process and its children print to /dev/null (file-descriptor level): pnnx's converter
    lists every pass; whether it succeeded is judged by the files it wrote."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def _affine_group_norms(model):
    """A copy of ``model`` whose affine-free GroupNorms carry a unit affine: ncnn's GroupNorm layer always
    has one, and pnnx leaves an affine-free GroupNorm as an unknown layer."""
    import copy

    import torch.nn as nn

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.GroupNorm) and not m.affine:
            norm = nn.GroupNorm(m.num_groups, m.num_channels, eps=m.eps, affine=True)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], norm)
    return model.eval()


class NcnnEngine(Engine):
    name = "ncnn"
    title = "ncnn (pnnx)"
    extra = "ncnn"
    modules = ("ncnn", "pnnx", "torch")
    load_modules = ("ncnn",)
    load_packages = ("ncnn",)
    precisions = ("fp32",)
    suffix = ".ncnn.param"
    torch_free = True

    def _prepare(self, model, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        import pnnx
        import torch

        param, weights = workdir / "model.ncnn.param", workdir / "model.ncnn.bin"
        model = _affine_group_norms(model)
        # pnnx writes its intermediate files next to the TorchScript file; its converter (a subprocess)
        # prints every pass to the terminal
        with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
            warnings.simplefilter("ignore")
            try:
                pnnx.export(model.eval(), str(workdir / "model.pt"), inputs=torch.randn(input_shape),
                            ncnnparam=str(param), ncnnbin=str(weights), pnnxparam=str(workdir / "model.pnnx.param"),
                            pnnxbin=str(workdir / "model.pnnx.bin"), pnnxpy=str(workdir / "model_pnnx.py"),
                            pnnxonnx=str(workdir / "model.pnnx.onnx"), ncnnpy=str(workdir / "model_ncnn.py"),
                            fp16=False)
            except TypeError as e:
                # pnnx ends by importing the PyTorch replica it generated, whose GroupNorm(affine=False) it
                # writes without num_channels; the ncnn graph is written before that and is what we use
                if not param.is_file():
                    raise EngineError(f"pnnx could not convert the model: {e}") from e
        if not param.is_file():
            raise EngineError("pnnx wrote no ncnn graph for this model")
        runner = self._load(param, threads)
        runner.input_shape = input_shape
        return runner

    def _load(self, path: Path, threads: int) -> Runner:
        import ncnn

        weights = Path(str(path)[: -len(".param")] + ".bin")
        if not weights.is_file():
            raise FileNotFoundError(f"ncnn weights not found beside {path}: {weights}")
        net = ncnn.Net()
        net.opt.num_threads = threads
        # full fp32: ncnn stores and computes in fp16 / bf16 by default where the CPU has it
        for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage",
                     "use_int8_inference"):
            setattr(net.opt, flag, False)
        if net.load_param(str(path)) != 0 or net.load_model(str(weights)) != 0:
            raise EngineError(f"{path}: not a loadable ncnn model")
        in_name, out_name = net.input_names()[0], net.output_names()[0]

        def run(x: np.ndarray) -> np.ndarray:
            ex = net.create_extractor()
            ex.input(in_name, ncnn.Mat(np.ascontiguousarray(x[0])))
            ret, out = ex.extract(out_name)
            if ret != 0:
                raise EngineError(f"{path}: ncnn failed to run (code {ret})")
            return np.array(out).reshape(1, -1)

        return Runner(self.name, "fp32", threads, (1, -1, -1, -1), run, artifact=path, files=[path, weights],
                      info=dict(_net=net))
