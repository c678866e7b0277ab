"""LiteRT (formerly TensorFlow Lite) interpreter with XNNPACK: fp32 ``.tflite`` files.

Running a ``.tflite`` needs ``ai-edge-litert`` and numpy only (extra ``[litert]``). Converting the
inference form needs ``litert-torch`` (extra ``[mobile]``), which pins an older typing_extensions and
pulls in jax and transformers, so it lives in its own environment (docs/deployment.md); this engine then
converts through ``cpubone.deploy.tflite.export_tflite``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .base import Engine, EngineError, Runner

__all__ = ["LiteRTEngine"]


class LiteRTEngine(Engine):
    name = "litert"
    title = "LiteRT (XNNPACK)"
    extra = "mobile"
    load_extra = "litert"
    modules = ("ai_edge_litert", "litert_torch")
    load_modules = ("ai_edge_litert",)
    precisions = ("fp32",)
    suffix = ".tflite"
    torch_free = True

    def _prepare(self, model, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        from ..deploy.tflite import export_tflite

        path = export_tflite(model, workdir / "model.tflite", tuple(input_shape[2:]))
        return self._load(path, threads)

    def _load(self, path: Path, threads: int) -> Runner:
        from ai_edge_litert.interpreter import Interpreter

        try:
            it = Interpreter(model_path=str(path), num_threads=threads)
            it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"{path}: not a loadable .tflite model ({str(e).splitlines()[0]})") from e
        inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        shape = tuple(int(d) for d in it.get_input_details()[0]["shape"])

        def run(x: np.ndarray) -> np.ndarray:
            it.set_tensor(inp, x)
            it.invoke()
            return it.get_tensor(out)

        return Runner(self.name, "fp32", threads, shape, run, artifact=path, files=[path], info=dict(_it=it))
