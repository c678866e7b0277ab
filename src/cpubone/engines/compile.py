"""torch.compile ahead of time: AOTInductor packages the inference form into a ``.pt2`` file.

The weights are constants of the compiled graph (what ``torch.compile``'s freezing does in-process), so
Inductor folds them into its kernels; the package is loaded with ``torch._inductor.aoti_load_package``.
Needs a C++ compiler at prepare time and torch at run time.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .base import Engine, EngineError, Runner
from .eager import torch_runner

__all__ = ["CompileEngine"]


class CompileEngine(Engine):
    name = "compile"
    title = "torch.compile (AOTInductor)"
    extra = "all"
    modules = ("torch",)
    load_modules = ("torch",)
    precisions = ("fp32",)
    suffix = ".pt2"

    def _prepare(self, model, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        import torch

        path = workdir / "model.pt2"
        x = torch.randn(input_shape)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model.eval(), (x,))
            try:
                torch._inductor.aoti_compile_and_package(
                    ep, package_path=str(path), inductor_configs={"freezing": True})
            except Exception as e:  # Inductor raises many types (compiler missing, lowering errors)
                raise EngineError(f"AOTInductor could not compile the model: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
        runner = self._load(path, threads)
        runner.input_shape = input_shape
        return runner

    def _load(self, path: Path, threads: int) -> Runner:
        import torch

        try:
            fn = torch._inductor.aoti_load_package(str(path))
        except Exception as e:  # a file that is not an AOTInductor package
            raise EngineError(f"{path}: not an AOTInductor package ({type(e).__name__})") from e
        # the package keeps no example input: the shape is checked by the compiled graph itself
        return Runner(self.name, "fp32", threads, (1, -1, -1, -1), torch_runner(fn, threads), artifact=path, files=[path],
                      info=dict(_fn=fn))
