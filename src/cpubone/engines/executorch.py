"""ExecuTorch with the XNNPACK delegate: fp32, and int8 via the PT2E XNNPACK quantizer (per-channel).

The inference form is captured with ``torch.export``, (for int8) quantized with PT2E -- calibrated on the
given samples -- and lowered with ``to_edge_transform_and_lower`` and the XNNPACK partitioner into a
``.pte`` program. Ops XNNPACK does not take stay in ExecuTorch's portable kernels; each run of delegated
ops between them is one XNNPACK partition, and every boundary costs a hand-over, so the runner reports
how many there are (``info["partitions"]``, and the portable ops left in ``info["portable_ops"]``).
``xnnpack_form`` rewrites the ops XNNPACK has no kernel for (GroupNorm, Lowtention's nearest upsample, the
head's LayerNorm) into ones it has, so CPUBone lowers into a single partition, and the no-op broadcasts
of the attention matmuls are removed before lowering.
Running a ``.pte`` needs torch (ExecuTorch's Python runtime takes torch tensors).
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .base import Engine, EngineError, Runner, calibration_batches
from .eager import torch_runner

__all__ = ["ExecuTorchEngine", "lowering_summary"]


def lowering_summary(edge_program) -> Dict[str, object]:
    """XNNPACK partitions and the ops left outside them in a lowered edge program."""
    delegates, portable = 0, Counter()
    for node in edge_program.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(getattr(node.target, "__name__", node.target))
        if "executorch_call_delegate" in target:
            delegates += 1
        elif not target.startswith(("getitem", "operator.")) and "getitem" not in target:
            portable[target.split("::")[-1].replace("aten.", "")] += 1
    return dict(partitions=delegates, portable_ops=dict(portable))


class ExecuTorchEngine(Engine):
    name = "executorch"
    title = "ExecuTorch (XNNPACK)"
    extra = "executorch"
    modules = ("executorch", "torch")
    load_modules = ("executorch", "torch")
    load_packages = ("executorch", "torch")
    precisions = ("fp32", "int8")
    suffix = ".pte"

    def _prepare(self, model, input_shape: Tuple[int, ...], precision: str, threads: int,
                 calib: Optional[Sequence[np.ndarray]], workdir: Path) -> Runner:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower

        from .xnnpack_form import xnnpack_form

        x = torch.randn(input_shape)
        model = model.eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            model = xnnpack_form(model)  # GroupNorm, nearest upsample and LayerNorm in XNNPACK's ops
            if precision == "int8":
                model = _quantize_pt2e(model, x, calibration_batches(calib))
            ep = _drop_noop_expands(torch.export.export(model, (x,)))
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
            summary = lowering_summary(edge.exported_program())
            program = edge.to_executorch()
        path = workdir / ("model.int8.pte" if precision == "int8" else "model.pte")
        path.write_bytes(program.buffer)
        runner = self._load(path, threads)
        runner.precision, runner.input_shape = precision, input_shape
        runner.info.update(summary)
        return runner

    def _load(self, path: Path, threads: int) -> Runner:
        from executorch.runtime import Runtime

        _set_threadpool(threads)
        try:
            program = Runtime.get().load_program(path)
            method = program.load_method("forward")  # the program must outlive its method
        except (RuntimeError, ValueError) as e:
            raise EngineError(f"{path}: not a loadable ExecuTorch program ({str(e).splitlines()[0]})") from e
        def fn(t):
            return method.execute([t])[0]

        precision = "int8" if path.name.endswith(".int8.pte") else "fp32"
        return Runner(self.name, precision, threads, (1, -1, -1, -1), torch_runner(fn, threads),
                      artifact=path, files=[path], info=dict(_program=program, _method=method))


def _drop_noop_expands(ep):
    """Lower ``matmul`` to ``bmm`` here and drop the ``expand`` it leaves when nothing is broadcast.

    Lowering decomposes the attention's 4-D ``matmul`` into expand + bmm; the expand is a no-op at batch 1
    but stays in ExecuTorch's portable kernels as a copy, splitting the XNNPACK partition around every
    attention matmul (cpubone_nano: 16 partitions before, 10 after).
    """
    import torch

    table = torch.export.default_decompositions()
    ep = ep.run_decompositions({k: table[k] for k in table if k == torch.ops.aten.matmul.default})
    for node in list(ep.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.expand.default:
            src = node.args[0]
            if tuple(src.meta["val"].shape) == tuple(node.meta["val"].shape):
                node.replace_all_uses_with(src)
                ep.graph.erase_node(node)
    return ep


_LOADED_AT: Optional[int] = None


def _set_threadpool(threads: int) -> None:
    """Size ExecuTorch's process-wide thread pool before a method is loaded.

    The XNNPACK runtime of a loaded method keeps a pointer to the pool, so resizing it afterwards leaves
    earlier methods with a dangling pool (a crash): one thread count per process.
    """
    global _LOADED_AT
    from executorch.extension.pybindings.portable_lib import (
        _threadpool_get_thread_count,
        _unsafe_reset_threadpool,
    )

    if _threadpool_get_thread_count() != threads:
        if _LOADED_AT is not None:
            raise EngineError(f"ExecuTorch runs at one thread count per process: already loaded at {_LOADED_AT} "
                              f"thread(s), asked for {threads}")
        _unsafe_reset_threadpool(threads)
    _LOADED_AT = threads


def _quantize_pt2e(model, x, calib):
    """Static int8 (symmetric per-channel weights) with the XNNPACK quantizer, calibrated on ``calib``."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    captured = torch.export.export(model, (x,)).module()
    prepared = prepare_pt2e(captured, quantizer)
    for sample in calib:
        prepared(torch.from_numpy(sample))
    return convert_pt2e(prepared)
