"""``cpubone export``: a model's inference form as a verified file, with its preprocessing and class names.

``export_model`` builds (and loads) the model, rewrites it into its inference form, exports it through the
ONNX Runtime engine's exporter (``cpubone.engines.onnx_export``), stores the preprocessing and class names
in the file's metadata, then checks ONNX Runtime against PyTorch on random inputs and on real photos with
the engines' one verifier (``cpubone.engines.verify``) and refuses the file (``ExportVerificationError``)
when they disagree. ``export_tflite_model`` is the same path for LiteRT.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch.nn as nn
from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config

from .. import __version__
from ..engines import get_engine
from ..engines.litert_export import export_tflite, require_converter
from ..engines.onnx_export import DEFAULT_OPSET, check_opset, export_onnx
from ..engines.onnx_quantize import quantize_onnx
from ..engines.verify import (
    Check,
    EngineVerificationError,
    check_outputs,
    judge_fp32,
    photo_inputs,
    torch_reference,
    verification_inputs,
    verify_fp32,
)
from ..images import ImageSource as ImageLike
from ..models import CPUBone, create_model, load_checkpoint
from ..models.checkpoints import WEIGHTS_NAME, read_pretrained_config
from ..models.reparam import reparameterize
from ..outputs import atomic_write_text, check_output_file
from ..preprocess import PreprocessConfig

__all__ = ["export_model", "export_tflite_model", "verify_onnx", "model_metadata", "load_trained", "class_names",
           "ExportReport", "ExportVerificationError", "METADATA_PREFIX"]

# keys of the preprocessing (PreprocessConfig fields) are stored bare; these carry the rest
METADATA_PREFIX = "cpubone."


class ExportVerificationError(EngineVerificationError):
    """The exported file's outputs differ from PyTorch's by more than the tolerance; the file was set aside."""


# --- metadata -----------------------------------------------------------------------------------
def class_names(model: nn.Module) -> Optional[List[str]]:
    """ImageNet class names for a model with an ImageNet head (from timm's bundled files, offline)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if cfg.get("label_names"):
        return list(cfg["label_names"])
    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset).label_descriptions() if subset else None


def model_metadata(model: nn.Module, input_size: Tuple[int, int], name: str = "",
                   labels: Optional[Sequence[str]] = None, dynamic: bool = False) -> Dict[str, str]:
    """ONNX metadata: timm's eval preprocessing for the model at ``input_size``, class names, provenance."""
    data_cfg = resolve_data_config(model=model)
    chans = getattr(model, "in_chans", data_cfg["input_size"][0])
    data_cfg["input_size"] = (chans, *input_size)
    for key in ("mean", "std"):
        v = tuple(data_cfg[key])
        if len(v) != chans:
            # RGB statistics for a model of another channel count: grayscale gets their average (the
            # image is converted to L), other counts reuse them cyclically
            data_cfg[key] = (sum(v) / len(v),) if chans == 1 else tuple(v[i % len(v)] for i in range(chans))
    meta = PreprocessConfig.from_data_config(data_cfg).to_metadata()
    labels = list(labels) if labels is not None else class_names(model)
    num_classes = getattr(model, "num_classes", None)
    if labels is not None and num_classes and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} class names for a model with {num_classes} classes")
    meta.update({
        METADATA_PREFIX + "model": json.dumps(name or getattr(model, "pretrained_cfg", {}).get("architecture", "")),
        METADATA_PREFIX + "num_classes": json.dumps(num_classes),
        METADATA_PREFIX + "dynamic": json.dumps(dynamic),
        METADATA_PREFIX + "labels": json.dumps(labels),
    })
    meta[METADATA_PREFIX + "version"] = json.dumps(__version__)
    return meta


# --- verification -------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What ``export_model`` wrote and how well ONNX Runtime reproduces PyTorch."""

    path: str
    model: str
    input_size: Tuple[int, int]
    dynamic: bool
    opset: int
    tolerance: float
    checks: List[Check] = field(default_factory=list)
    int8_path: Optional[str] = None
    int8_checks: List[Check] = field(default_factory=list)
    metadata_path: Optional[str] = None  # FILE.json beside a format without metadata of its own (TFLite)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=0.0)

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), max_abs_diff=self.max_abs_diff)


def _verify_sizes(input_size: Tuple[int, int], dynamic: bool) -> List[Tuple[int, int]]:
    if not dynamic:
        return [tuple(input_size)]
    h, w = input_size
    # odd sizes exercise the Lowtention pad/crop and the 2x2 "same" pads at sizes the trace never saw
    return [tuple(input_size), (h + 17 | 1, w + 5 | 1), (max(33, h // 2 + 1), max(47, w // 3 | 1))]


def verify_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    cfg: PreprocessConfig,
    dynamic: bool = False,
    tolerance: float = 1e-4,
    photos: Optional[Sequence[Tuple[str, ImageLike]]] = None,
    seed: int = 0,
) -> List[Check]:
    """Compare ONNX Runtime (``path``) with ``model`` in PyTorch on random inputs and on real photos.

    Random inputs cover the export size and, for a dynamic export, odd sizes; photos go through the shared
    eval preprocessing (``cfg``). The allowed difference is ``tolerance * max(1, max |logit|)``. Raises
    ``ExportVerificationError`` naming the file and the worst input when it is exceeded.
    """
    runner = get_engine("onnxruntime", for_load=True).load(path)
    rng = np.random.default_rng(seed)
    inputs: List[Tuple[str, np.ndarray]] = [
        (f"random {h}x{w}", rng.standard_normal((1, cfg.input_size[0], h, w)).astype(np.float32))
        for h, w in _verify_sizes(cfg.input_size[1:], dynamic)]
    inputs += photo_inputs(cfg, photos)
    try:
        return judge_fp32(runner, check_outputs(runner, torch_reference(model), inputs), tolerance)
    except EngineVerificationError as e:
        raise ExportVerificationError(f"{e}; the exported file is not trustworthy") from None


# --- the deployment path ------------------------------------------------------------------------
def load_trained(name: Optional[str], weights: Optional[Union[str, os.PathLike]]) -> Tuple[nn.Module, Optional[List[str]]]:
    """A model built by ``name`` (default: the architecture saved with ``weights``) with ``weights``
    loaded, and the class names saved with them (None if none were).

    A ``save_pretrained`` folder or file brings its class count, model arguments and class names, for
    timm models too (timm's factory would build 1000 classes and read no folder).
    """
    saved: Dict[str, Any] = {}
    source = weights
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"weights not found: {path}")
        saved = read_pretrained_config(path) or {}
        source = path / WEIGHTS_NAME if path.is_dir() and (path / WEIGHTS_NAME).is_file() else path
    name = name or saved.get("model_name") or saved.get("architecture")
    if not name:
        raise ValueError(f"{weights}: no saved config names the architecture; give the model name")
    kwargs = dict(saved.get("model_kwargs") or {})
    if saved.get("num_classes"):
        kwargs["num_classes"] = saved["num_classes"]
    model = create_model(name, pretrained=source if source is not None else False, **kwargs)
    labels = (saved.get("pretrained_cfg") or {}).get("label_names") or \
        (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return model, (list(labels) if labels else None)


def export_model(
    model: Union[str, nn.Module],
    output: Union[str, os.PathLike],
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    input_size: Optional[Tuple[int, int]] = None,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    tolerance: float = 1e-4,
    labels: Optional[Sequence[str]] = None,
    int8: bool = False,
    calib_dir: Optional[Union[str, os.PathLike]] = None,
    int8_output: Optional[Union[str, os.PathLike]] = None,
    int8_exclude: Union[str, Sequence[str]] = "first,last",
    calib_count: int = 64,
    verify: bool = True,
) -> ExportReport:
    """Export a model's inference form to ONNX, with metadata, verified against PyTorch.

    Args:
        model: a model name for ``create_model`` (CPUBone variant or timm name) or a built model.
        output: the .onnx file to write.
        checkpoint: weights to load (any layout ``load_checkpoint`` reads); None keeps the model's own.
        input_size: (H, W) to export at; default the model's ``pretrained_cfg['input_size']``.
        dynamic: symbolic batch, height and width; verified at odd sizes too.
        opset: ONNX opset.
        tolerance: allowed ONNX Runtime vs PyTorch difference, relative to max(1, max |logit|).
        labels: class names to store (default: ImageNet names for 1000-class heads).
        int8 / calib_dir / int8_output / int8_exclude / calib_count: also write a static-QDQ int8 model
            calibrated on up to ``calib_count`` images from ``calib_dir`` (see ``quantize_onnx``).
        verify: compare ONNX Runtime with PyTorch (random inputs and real photos).
    """
    name = model if isinstance(model, str) else getattr(model, "pretrained_cfg", {}).get("architecture", "model")
    check_opset(opset)
    if int8 and calib_dir is None:
        raise ValueError("int8 needs calibration images: pass calib_dir, a folder of images")
    if calib_dir is not None and not Path(calib_dir).is_dir():
        raise FileNotFoundError(f"calibration folder not found: {calib_dir}")
    output = Path(output)
    int8_output = (Path(int8_output) if int8_output else output.with_name(output.stem + ".int8.onnx")) if int8 else None
    inputs = [checkpoint, calib_dir]  # an output that is an input would destroy it
    check_output_file(output, inputs=inputs)  # before the model is built and exported: fail in a second, not after minutes
    if int8_output is not None:
        check_output_file(int8_output, inputs=[output, *inputs])
    if isinstance(model, str):
        model, saved_labels = load_trained(model, checkpoint)
        labels = labels if labels is not None else saved_labels
    elif checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.eval()
    if input_size is None:
        input_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:])
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f"input size {input_size}: expected two positive integers H W")
    if isinstance(model, CPUBone):
        deploy_model = reparameterize(model)
    else:
        deploy_model = model  # a timm peer: exported as it is
    meta = model_metadata(model, input_size, name=name, labels=labels, dynamic=dynamic)
    # float32 weights, plus about a quarter more for the int8 copy
    need = 4 * sum(p.numel() for p in deploy_model.parameters()) * (5 if int8 else 4) // 4 + 2 ** 20
    check_output_file(output, need_bytes=need, inputs=inputs)
    export_onnx(deploy_model, output, input_size, dynamic=dynamic, opset=opset, metadata=meta, name=name)
    cfg = PreprocessConfig.from_metadata(meta)
    report = ExportReport(str(output), name, input_size, dynamic, opset, tolerance)
    if verify:
        try:
            report.checks = verify_onnx(model, output, cfg, dynamic=dynamic, tolerance=tolerance)
        except ExportVerificationError:
            failed = check_output_file(output.with_name(output.name + ".failed"), inputs=inputs)
            os.replace(output, failed)  # never leave an unverified file under the requested name
            raise
    if int8:
        quantize_onnx(output, int8_output, calib_dir, exclude=int8_exclude, max_images=calib_count)
        report.int8_path = str(int8_output)
        report.int8_checks = compare_onnx(output, int8_output, cfg)
    return report


def compare_onnx(reference: Union[str, os.PathLike], candidate: Union[str, os.PathLike], cfg: PreprocessConfig,
                 photos: Optional[Sequence[Tuple[str, ImageLike]]] = None) -> List[Check]:
    """Two ONNX files on the same real photos: max abs difference and top-1 agreement (no tolerance)."""
    engine = get_engine("onnxruntime", for_load=True)
    return check_outputs(engine.load(candidate), engine.load(reference), photo_inputs(cfg, photos))


def export_tflite_model(model: Union[str, nn.Module], output: Union[str, os.PathLike],
                        checkpoint: Optional[Union[str, os.PathLike]] = None,
                        input_size: Optional[Tuple[int, int]] = None, tolerance: float = 1e-4) -> ExportReport:
    """``cpubone export --format tflite``: inference form -> .tflite, verified against PyTorch.

    TFLite files have no free-form metadata like ONNX's ``metadata_props``, so the preprocessing and class
    names go beside the file as ``FILE.tflite.json`` (what ``cpubone deploy`` writes too), where
    ``cpubone predict FILE.tflite`` reads them.
    """
    name = model if isinstance(model, str) else type(model).__name__
    require_converter()
    check_output_file(output, inputs=[checkpoint])  # before the conversion, which takes minutes
    if isinstance(model, str):
        model = create_model(model, pretrained=checkpoint if checkpoint is not None else False)
    model.eval()
    if input_size is None:
        input_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:])
    deploy_model = reparameterize(model) if isinstance(model, CPUBone) else model
    meta = model_metadata(model, tuple(input_size), name=name)
    output = export_tflite(deploy_model, output, input_size, name=name)
    runner = get_engine("litert", for_load=True).load(output)
    report = ExportReport(str(output), name, tuple(input_size), False, 0, tolerance)
    try:
        report.checks = verify_fp32(runner, model, verification_inputs(PreprocessConfig.from_metadata(meta)), tolerance)
    except EngineVerificationError as e:
        # no unverified file under the asked name
        os.replace(output, check_output_file(output.with_name(output.name + ".failed"), inputs=[checkpoint]))
        raise ExportVerificationError(str(e)) from None
    meta.update({"cpubone.engine": json.dumps("litert"), "cpubone.precision": json.dumps("fp32")})
    report.metadata_path = str(atomic_write_text(str(output) + ".json", json.dumps(meta, indent=2)))
    return report
