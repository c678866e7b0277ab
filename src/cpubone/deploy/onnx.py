"""ONNX export of CPUBone (and any timm model) for ONNX Runtime, the paper's CPU path.

``export_onnx`` writes any module; ``export_model`` is the deployment path behind ``cpubone export``:
build (and load) the model, rewrite it into its inference form, export, store the preprocessing and
class names in the file's metadata, then check ONNX Runtime against PyTorch on random inputs and on
real photos and refuse the file (``ExportVerificationError``) when they disagree.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..engines.base import ExportError  # defined with the engines: analysis catches it without importing deploy
from .preprocess import ImageLike, PreprocessConfig, preprocess

__all__ = ["export_onnx", "export_model", "verify_onnx", "model_metadata", "read_metadata", "sample_photos",
           "photo_inputs", "check_opset", "ExportReport", "ExportError", "ExportVerificationError", "DEFAULT_OPSET",
           "MIN_OPSET", "MAX_OPSET", "METADATA_PREFIX"]

DEFAULT_OPSET = 18
# keys of the preprocessing (PreprocessConfig fields) are stored bare; these carry the rest
METADATA_PREFIX = "cpubone."


# The TorchScript exporter writes opsets up to 20; Lowtention's scaled_dot_product_attention and the
# HardSwish activations need 14.
MIN_OPSET, MAX_OPSET = 14, 20


class ExportVerificationError(ValueError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


def check_opset(opset: int) -> None:
    """Refuse an opset outside ``MIN_OPSET``..``MAX_OPSET`` before any work, naming the range."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter: Python warnings, and the TorchScript graph dump (thousands of lines) that its
    C++ logger writes straight to file descriptors 1 and 2 when a conversion fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        # sys.stdout too: where it is not file descriptor 1 (a notebook, pytest's capture), Python-level
        # progress printers (litert-torch's) would still reach it
        with open(os.devnull, "w") as null, warnings.catch_warnings(), redirect_stdout(null), redirect_stderr(null):
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _reason(e: BaseException) -> str:
    """The first line of an exporter exception, shortened: the rest is often a dump of the graph."""
    lines = str(e).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_size: Tuple[int, int] = (224, 224),
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Optional[Dict[str, str]] = None,
    name: Optional[str] = None,
) -> Path:
    """Export ``model`` (eval mode, batch 1, float32) to ``path`` with input ``input`` and output ``output``.

    Args:
        input_size: (H, W) of the traced input.
        dynamic: make batch, height and width symbolic so any size runs in ONNX Runtime.
        opset: ONNX opset.
        metadata: string key/values stored in the model's ``metadata_props``.
        name: the model's name in error messages (default: its architecture).

    Uses the TorchScript exporter: it traces CPUBone's shape arithmetic into the graph, so a dynamic
    export stays correct at sizes other than the traced one (the inference form's size-dependent pads
    and crops are recorded unconditionally under ``shape_general``). The file is written atomically.
    A model the exporter cannot convert raises ``ExportError`` with the exporter's reason in one line.
    """
    import onnx

    from ..outputs import atomic_write
    from .reparam import shape_general

    check_opset(opset)
    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    was_training = model.training
    model.eval()
    in_chans = getattr(model, "in_chans", 3)
    x = torch.randn(1, in_chans, *input_size)
    dynamic_axes = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}} if dynamic else None

    def write(tmp: Path) -> None:
        try:
            with _quiet_exporter(), torch.no_grad(), shape_general(dynamic):
                torch.onnx.export(
                    model, (x,), str(tmp), input_names=["input"], output_names=["output"], opset_version=opset,
                    dynamic_axes=dynamic_axes, dynamo=False, do_constant_folding=True,
                )
        except OSError:
            raise  # the destination, not the model: atomic_write names the file
        except Exception as e:  # the exporter raises many types (TypeError, RuntimeError, its own errors)
            raise ExportError(f"{name}: ONNX export failed ({_reason(e)})") from e
        if metadata:
            proto = onnx.load(str(tmp))
            for k, v in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(k), str(v)
            onnx.save(proto, str(tmp))

    try:
        return atomic_write(path, write)
    finally:
        model.train(was_training)


# --- metadata -----------------------------------------------------------------------------------
def class_names(model: nn.Module) -> Optional[List[str]]:
    """ImageNet class names for a model with an ImageNet head (from timm's bundled files, offline)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if cfg.get("label_names"):
        return list(cfg["label_names"])
    subset = infer_imagenet_subset(model)
    return ImageNetInfo(subset).label_descriptions() if subset else None


def model_metadata(model: nn.Module, input_size: Tuple[int, int], name: str = "",
                   labels: Optional[Sequence[str]] = None, dynamic: bool = False) -> Dict[str, str]:
    """ONNX metadata: timm's eval preprocessing for the model at ``input_size``, class names, provenance."""
    from timm.data import resolve_data_config

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
    from .. import __version__

    meta[METADATA_PREFIX + "version"] = json.dumps(__version__)
    return meta


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


# --- verification -------------------------------------------------------------------------------
from ..engines.verify import SKIMAGE_PHOTOS, Check, sample_photos  # noqa: E402,F401  (one definition, shared)


def photo_inputs(cfg: PreprocessConfig, photos: Optional[Sequence[Tuple[str, ImageLike]]] = None
                 ) -> List[Tuple[str, np.ndarray]]:
    """Photos as model inputs ``("photo NAME", (1, C, H, W) float32)``: the shared decoder and eval preprocessing.

    ``photos`` are (name, image file / PIL image / array) pairs; default ``sample_photos()``.
    """
    return [(f"photo {name}", preprocess(img, cfg, name)[None])
            for name, img in (photos if photos is not None else sample_photos())]


# one comparison of ONNX Runtime against PyTorch: the engines' record of a check
VerifyResult = Check


@dataclass
class ExportReport:
    """What ``export_model`` wrote and how well ONNX Runtime reproduces PyTorch."""

    path: str
    model: str
    input_size: Tuple[int, int]
    dynamic: bool
    opset: int
    tolerance: float
    checks: List[VerifyResult] = field(default_factory=list)
    int8_path: Optional[str] = None
    int8_checks: List[VerifyResult] = field(default_factory=list)
    metadata_path: Optional[str] = None  # FILE.json beside a format without metadata of its own (TFLite)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=0.0)

    def to_dict(self) -> Dict[str, Any]:
        from dataclasses import asdict

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
) -> List[VerifyResult]:
    """Compare ONNX Runtime (``path``) with ``model`` in PyTorch on random inputs and on real photos.

    Random inputs cover the export size and, for a dynamic export, odd sizes; photos go through the shared
    eval preprocessing (``cfg``). The allowed difference is ``tolerance * max(1, max |logit|)``. Raises
    ``ExportVerificationError`` naming the worst input when it is exceeded.
    """
    from ..engines.onnxruntime import ort_session

    sess = ort_session(path, threads=1)
    model.eval()
    rng = np.random.default_rng(seed)
    inputs: List[Tuple[str, np.ndarray]] = []
    for h, w in _verify_sizes(cfg.input_size[1:], dynamic):
        inputs.append((f"random {h}x{w}", rng.standard_normal((1, cfg.input_size[0], h, w)).astype(np.float32)))
    inputs += photo_inputs(cfg, photos)
    results = []
    for name, x in inputs:
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        out = sess.run(None, {"input": x})[0]
        if out.shape != ref.shape:
            raise ExportVerificationError(f"{path}: ONNX Runtime output shape {out.shape} != PyTorch {ref.shape} on {name}")
        results.append(VerifyResult(name, tuple(x.shape), float(np.abs(out - ref).max()), float(np.abs(ref).max()),
                                    bool((out.argmax(-1) == ref.argmax(-1)).all())))
    bad = [r for r in results if not r.max_abs_diff <= tolerance * max(1.0, r.max_abs_ref)]
    if bad:
        worst = max(bad, key=lambda r: r.max_abs_diff)
        raise ExportVerificationError(
            f"{path}: ONNX Runtime disagrees with PyTorch: max abs difference {worst.max_abs_diff:.3g} on "
            f"{worst.input} (logits up to {worst.max_abs_ref:.3g}; tolerance {tolerance:g} relative). "
            f"{len(bad)} of {len(results)} checks failed; the exported file is not trustworthy."
        )
    return results


# --- the deployment path ------------------------------------------------------------------------
def load_trained(name: Optional[str], weights: Optional[Union[str, os.PathLike]]) -> Tuple[nn.Module, Optional[List[str]]]:
    """A model built by ``name`` (default: the architecture saved with ``weights``) with ``weights``
    loaded, and the class names saved with them (None if none were).

    A ``save_pretrained`` folder or file brings its class count, model arguments and class names, for
    timm models too (timm's factory would build 1000 classes and read no folder).
    """
    from ..models import create_model
    from ..models.checkpoints import WEIGHTS_NAME, read_pretrained_config

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
    from ..models import CPUBone, create_model
    from .reparam import reparameterize

    from ..outputs import check_output_file

    name = model if isinstance(model, str) else getattr(model, "pretrained_cfg", {}).get("architecture", "model")
    check_opset(opset)
    if int8 and calib_dir is None:
        raise ValueError("int8 needs calibration images: pass calib_dir, a folder of images")
    if calib_dir is not None and not Path(calib_dir).is_dir():
        raise FileNotFoundError(f"calibration folder not found: {calib_dir}")
    output = Path(output)
    int8_output = (Path(int8_output) if int8_output else output.with_name(output.stem + ".int8.onnx")) if int8 else None
    check_output_file(output)  # before the model is built and exported: fail in a second, not after minutes
    if int8_output is not None:
        check_output_file(int8_output)
    if isinstance(model, str):
        model, saved_labels = load_trained(model, checkpoint)
        labels = labels if labels is not None else saved_labels
    elif checkpoint is not None:
        from ..models import load_checkpoint

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
    check_output_file(output, need_bytes=need)
    export_onnx(deploy_model, output, input_size, dynamic=dynamic, opset=opset, metadata=meta, name=name)
    cfg = PreprocessConfig.from_metadata(meta)
    report = ExportReport(str(output), name, input_size, dynamic, opset, tolerance)
    if verify:
        try:
            report.checks = verify_onnx(model, output, cfg, dynamic=dynamic, tolerance=tolerance)
        except ExportVerificationError:
            failed = output.with_name(output.name + ".failed")
            os.replace(output, failed)  # never leave an unverified file under the requested name
            raise
    if int8:
        from .quantize import quantize_onnx

        quantize_onnx(output, int8_output, calib_dir, exclude=int8_exclude, max_images=calib_count)
        report.int8_path = str(int8_output)
        report.int8_checks = compare_onnx(output, int8_output, cfg)
    return report


def compare_onnx(reference: Union[str, os.PathLike], candidate: Union[str, os.PathLike], cfg: PreprocessConfig,
                 photos: Optional[Sequence[Tuple[str, ImageLike]]] = None) -> List[VerifyResult]:
    """Two ONNX files on the same real photos: max abs difference and top-1 agreement (no tolerance)."""
    from ..engines.onnxruntime import ort_session

    ref_sess, cand_sess = ort_session(reference), ort_session(candidate)
    results = []
    for name, x in photo_inputs(cfg, photos):
        a = ref_sess.run(None, {"input": x})[0]
        b = cand_sess.run(None, {"input": x})[0]
        results.append(VerifyResult(name, tuple(x.shape), float(np.abs(a - b).max()),
                                    float(np.abs(a).max()), bool((a.argmax(-1) == b.argmax(-1)).all())))
    return results
