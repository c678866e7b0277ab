"""LiteRT (formerly TensorFlow Lite) interpreter with XNNPACK: fp32 and full-integer int8 ``.tflite`` files.

Running a ``.tflite`` needs ``ai-edge-litert`` and numpy only (extra ``[litert]``). Converting the
inference form needs ``litert-torch`` (extra ``[mobile]``), which pins an older typing_extensions and
pulls in jax and transformers, so it lives in its own environment (``make mobile``, docs/deployment.md);
this engine then converts through ``cpubone.engines.litert_export.export_tflite`` and, for int8, quantizes the
float file with ai-edge-quantizer (installed with litert-torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .base import Engine, EngineError, Runner, calibration_batches

__all__ = ["LiteRTEngine"]


class LiteRTEngine(Engine):
    name = "litert"
    title = "LiteRT (XNNPACK)"
    extra = "mobile"
    load_extra = "litert"
    modules = ("ai_edge_litert", "litert_torch")
    load_modules = ("ai_edge_litert",)
    load_packages = ("ai-edge-litert",)
    precisions = ("fp32", "int8")
    suffix = ".tflite"
    torch_free = True

    def _prepare(self, model, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        from ..engines.litert_export import export_tflite, quantize_tflite

        path = export_tflite(model, workdir / "model.tflite", tuple(input_shape[2:]))
        if precision == "int8":
            path = quantize_tflite(path, workdir / "model.int8.tflite", calibration_batches(calib))
        return self._load(path, threads)

    def _load(self, path: Path, threads: int) -> Runner:
        from ai_edge_litert.interpreter import Interpreter

        try:
            it = Interpreter(model_path=str(path), num_threads=threads)
            it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"{path}: not a loadable .tflite model ({str(e).splitlines()[0]})") from e
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        shape = tuple(int(d) for d in inp["shape"])
        # a full-integer file takes and gives int8 tensors: quantize the input, dequantize the logits
        quant_in = _affine(inp) if inp["dtype"] != np.float32 else None
        quant_out = _affine(out) if out["dtype"] != np.float32 else None
        precision = "int8" if quant_in or quant_out else "fp32"

        def run(x: np.ndarray) -> np.ndarray:
            if quant_in:
                scale, zero, info = quant_in
                x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(inp["dtype"])
            it.set_tensor(inp["index"], x)
            it.invoke()
            y = it.get_tensor(out["index"])
            if quant_out:
                scale, zero, _ = quant_out
                y = (y.astype(np.float32) - zero) * scale
            return y

        return Runner(self.name, precision, threads, shape, run, artifact=path, files=[path], info=dict(_it=it))


def _affine(detail) -> Tuple[float, int, np.iinfo]:
    """(scale, zero point, integer range) of a quantized tensor of the interpreter."""
    scale, zero = detail["quantization"]
    if not scale:
        raise EngineError(f"tensor {detail['name']!r} is {np.dtype(detail['dtype']).name} without a quantization scale")
    return float(scale), int(zero), np.iinfo(detail["dtype"])
