"""int8: ONNX Runtime static quantization (QDQ, per-channel weights) calibrated on real images.

Activations are calibrated on images from any folder, preprocessed by the shared eval preprocessing
(read from the fp32 file's metadata, so calibration sees exactly what deployment feeds). Nodes that
quantize badly can stay in float: ``exclude`` takes node names or the groups below, chosen with the
top-1 agreement figures in ``benchmarks/int8.py`` (docs/deployment.md).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np

from ..images import ImageDecodeError, list_images
from ..outputs import atomic_write
from ..preprocess import PreprocessConfig, preprocess

__all__ = ["quantize_onnx", "exclusion_groups", "EXCLUDE_GROUPS"]

# Named groups of nodes to keep in float32. Default "first,last": on a digits-fine-tuned T0
# (benchmarks/int8.py) keeping them in float raised top-1 agreement with fp32 on shifted+noisy held-out
# images from 85% to 93% and halved the logit error, for ~4% more latency on B0; keeping the attention in
# float changed neither.
#   attention: the Lowtention qkv conv, the q^T k and v a^T matmuls and the softmax between them, so q,
#              k and v are never rounded to 8 bits (the softmax exponentiates rounding errors of q^T k);
#              the depthwise projection and the output conv stay int8;
#   first:     the stem conv (its 3-channel input has a dynamic range unlike every later layer);
#   last:      the classifier after the head conv (pooling, pre-logits Linear + LayerNorm + Hardswish,
#              final Linear): the logits themselves.
EXCLUDE_GROUPS = ("attention", "first", "last")

PathLike = Union[str, os.PathLike]


def exclusion_groups(model_path: PathLike, groups: Iterable[str]) -> List[str]:
    """Node names of the fp32 ONNX graph that make up the named ``groups`` (see ``EXCLUDE_GROUPS``)."""
    import onnx

    groups = [g for g in groups if g]
    unknown = sorted(set(groups) - set(EXCLUDE_GROUPS))
    if unknown:
        raise ValueError(f"unknown int8 exclusion group(s) {unknown}: choose from {list(EXCLUDE_GROUPS)}")
    graph = onnx.load(str(model_path), load_external_data=False).graph
    names: List[str] = []
    convs = [n for n in graph.node if n.op_type == "Conv"]
    for node in graph.node:
        if "attention" in groups and "/attn/" in node.name and not any(
                f"/attn/{conv}/" in node.name for conv in ("proj", "out")):
            names.append(node.name)
        if "last" in groups and node.name.startswith("/head/") and not node.name.startswith("/head/conv/"):
            names.append(node.name)
    if "first" in groups and convs:
        names.append(convs[0].name)
    return names


def _name_nodes(path: Path) -> None:
    """Name unnamed nodes after their first input (graph optimizations inline e.g. HardSwish into unnamed
    HardSigmoid + Mul), so that name-based exclusion groups reach them."""
    import onnx

    proto = onnx.load(str(path))
    seen = {n.name for n in proto.graph.node if n.name}
    changed = False
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            base = f"{node.input[0] if node.input else ''}/{node.op_type}"
            node.name = base if base not in seen else f"{base}_{i}"
            seen.add(node.name)
            changed = True
    if changed:
        onnx.save(proto, str(path))


class _ImageReader:
    """onnxruntime CalibrationDataReader over preprocessed images (duck-typed: get_next / rewind)."""

    def __init__(self, files: Sequence[Path], cfg: PreprocessConfig, input_name: str) -> None:
        self.batches = []
        self.skipped: List[str] = []
        for f in files:
            try:
                self.batches.append({input_name: preprocess(f, cfg)[None]})
            except (ImageDecodeError, FileNotFoundError) as e:  # corrupt images are skipped and counted
                self.skipped.append(str(e))  # the message names the file
        self._it = iter(self.batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.batches)


def quantize_onnx(
    model_path: PathLike,
    output: PathLike,
    calib_dir: Optional[PathLike] = None,
    exclude: Union[str, Sequence[str]] = "first,last",
    max_images: int = 64,
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    skip_optimization: bool = False,
    op_types: Optional[Sequence[str]] = None,
    calib_data: Optional[Sequence[np.ndarray]] = None,
) -> Path:
    """Write a static-QDQ int8 copy of the fp32 ONNX file ``model_path`` to ``output``.

    Args:
        calib_dir: folder of calibration images (any layout, searched recursively; unreadable files are
            skipped and counted).
        calib_data: instead of ``calib_dir``, already preprocessed (1, C, H, W) float32 samples.
        exclude: node names and/or ``EXCLUDE_GROUPS`` names kept in float; a comma-separated string works.
        max_images: calibration images used (the first ones in sorted order).
        per_channel: per-output-channel weight scales (symmetric int8 weights, uint8 activations).
        calibrate_method: "minmax", "entropy" or "percentile" (onnxruntime's calibrators).
        skip_optimization: quantize the graph as exported, without ONNX Runtime's basic optimizations
            (measured slower on B0: the HardSwish stays one float op between every QLinearConv).
        op_types: quantize only these op types (default: all ONNX Runtime can; restricting to Conv/MatMul
            was measured slower on B0, the extra float<->int8 conversions cost more than they save).

    The fp32 file's metadata (preprocessing, labels) is copied into the int8 file.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_path, output = Path(model_path), Path(output)
    if not model_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {model_path}")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise ValueError(f"calibrate_method={calibrate_method!r}: expected one of {sorted(methods)}")
    proto = onnx.load(str(model_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    cfg = PreprocessConfig.from_metadata(meta)
    if calib_data is not None:
        reader = _ImageReader([], cfg, proto.graph.input[0].name)
        reader.batches = [{proto.graph.input[0].name: x} for x in calib_data][:max_images]
        reader.rewind()
        if not reader.batches:
            raise ValueError("no calibration samples given")
    elif calib_dir is None:
        raise ValueError("int8 calibration needs a folder of images or preprocessed samples")
    else:
        files = list_images(calib_dir)[:max_images]
        reader = _ImageReader(files, cfg, proto.graph.input[0].name)
    if not reader.batches:
        raise ValueError(f"no readable calibration images in {calib_dir} "
                         f"({len(files)} image files, {len(reader.skipped)} unreadable)")
    if reader.skipped:
        print(f"int8 calibration: skipped {len(reader.skipped)} unreadable image(s), e.g. {reader.skipped[0]}")
    items = [e.strip() for e in exclude.split(",")] if isinstance(exclude, str) else list(exclude)
    groups = [e for e in items if e in EXCLUDE_GROUPS]
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        # shape inference + ONNX Runtime's basic graph optimizations (constant folding, Conv-Add fusion)
        # so that quantization sees the graph that will run
        quant_pre_process(str(model_path), str(prepped), skip_symbolic_shape=True, skip_optimization=skip_optimization)
        _name_nodes(prepped)
        named = [e for e in items if e and e not in EXCLUDE_GROUPS]
        if named:
            known = {n.name for n in onnx.load(str(prepped), load_external_data=False).graph.node}
            unknown = [e for e in named if e not in known]
            if unknown:
                raise ValueError(f"unknown int8 exclusion(s) {unknown}: neither a group {list(EXCLUDE_GROUPS)} "
                                 f"nor a node name of {model_path}")
        nodes = named + exclusion_groups(prepped, groups)
        q = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepped), str(q), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=nodes,
            calibrate_method=methods[calibrate_method], op_types_to_quantize=list(op_types) if op_types else None,
        )
        qproto = onnx.load(str(q))
        del qproto.metadata_props[:]
        for k, v in dict(meta, **{"cpubone.int8": "true", "cpubone.int8_excluded": ",".join(items)}).items():
            e = qproto.metadata_props.add()
            e.key, e.value = k, v
        atomic_write(output, lambda tmp_out: onnx.save(qproto, str(tmp_out)))
    return output
