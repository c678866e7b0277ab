"""Torch-free image classification with an exported model: its runtime, numpy and Pillow only.

The file carries everything needed (written by ``cpubone export``): the eval preprocessing (input size,
mean, std, crop_pct, interpolation, crop mode) and the class names. This module must never import
torch (a test checks ``sys.modules``), so it is usable in slim deployment images.

    python -m cpubone.deploy.predictor IMAGE... --model FILE [--topk 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .preprocess import ImageLike, PreprocessConfig, preprocess

__all__ = ["Predictor", "Prediction", "predict_files", "main"]


@dataclass
class Prediction:
    """Top-k classes of one image: (class index, label, softmax probability), best first."""

    image: str
    indices: List[int]
    labels: List[str]
    probs: List[float]

    def to_dict(self) -> Dict[str, object]:
        return dict(image=self.image, topk=[dict(index=i, label=l, prob=p)
                                            for i, l, p in zip(self.indices, self.labels, self.probs)])


class Predictor:
    """A classifier from any file ``cpubone export`` / ``cpubone deploy`` writes, preprocessing images as its
    metadata says.

    The runtime is chosen by the file's ending (``.onnx``: ONNX Runtime, ``.xml``: OpenVINO, ``.tflite``:
    LiteRT, ``.ncnn.param``: ncnn, ``.pte``: ExecuTorch, ``.pt2``: AOTInductor); the first four run
    without torch. The metadata is in an ONNX file's ``metadata_props`` or in ``FILE.json`` beside it.

    Args:
        model_path: the model file (fp32 or int8).
        threads: the runtime's intra-op threads.
    """

    def __init__(self, model_path: Union[str, os.PathLike], threads: int = 1) -> None:
        from ..engines import load_artifact

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"{'ONNX model' if path.suffix == '.onnx' else 'model file'} not found: {path}")
        meta = _read_metadata(path)
        self.runner = load_artifact(path, threads)
        try:
            self.config = PreprocessConfig.from_metadata(meta)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        labels = json.loads(meta.get("cpubone.labels", "null"))
        self.labels: Optional[List[str]] = labels
        channels = self.runner.input_shape[1]
        if channels != -1 and channels != self.config.input_size[0]:
            raise ValueError(f"{path}: metadata says {self.config.input_size[0]} input channels, graph has {channels}")
        self.path = path

    def preprocess(self, image: ImageLike, name: str = "image") -> np.ndarray:
        """(channels, height, width) float32 input for one image (path, PIL image or uint8 array)."""
        return preprocess(image, self.config, name)

    def logits(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(N, classes) raw outputs; images run one by one (batch 1, as the model was exported)."""
        outs = [self.runner(self.preprocess(im, _name(im, i))[None]) for i, im in enumerate(images)]
        return np.concatenate(outs, 0)

    def predict(self, images: Sequence[ImageLike], topk: int = 5) -> List[Prediction]:
        """Top-``topk`` classes with softmax probabilities for each image."""
        if topk < 1:
            raise ValueError(f"topk={topk}: must be at least 1")
        logits = self.logits(images)
        z = logits - logits.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        k = min(topk, probs.shape[-1])
        results = []
        for i, p in enumerate(probs):
            idx = np.argsort(-p, kind="stable")[:k]
            labels = [self.labels[j] if self.labels else f"class {j}" for j in idx]
            results.append(Prediction(_name(images[i], i), [int(j) for j in idx], labels, [float(p[j]) for j in idx]))
        return results


def _read_metadata(path: Path) -> Dict[str, str]:
    """The preprocessing / class-name metadata of a model file: ``FILE.json`` beside it, else (ONNX) its
    ``metadata_props``."""
    side = Path(str(path) + ".json")
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{side}: not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{side}: expected a JSON object of metadata")
        return {str(k): str(v) for k, v in meta.items()}
    if path.suffix == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError and others for files that are not ONNX
            raise ValueError(f"{path}: not a loadable ONNX model ({type(e).__name__})") from e
        return {p.key: p.value for p in proto.metadata_props}
    raise ValueError(f"{path}: no metadata (expected {side.name} beside it, as `cpubone deploy` writes)")


def _name(image: ImageLike, i: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image {i}"


def predict_files(images: Sequence[Union[str, os.PathLike]], onnx_path: Union[str, os.PathLike], topk: int = 5,
                  threads: int = 1) -> List[Prediction]:
    """``cpubone predict``: classify image files with an exported model."""
    if not images:
        raise ValueError("no images given")
    return Predictor(onnx_path, threads).predict(list(images), topk)


def format_predictions(preds: Sequence[Prediction], as_json: bool = False) -> str:
    if as_json:
        return json.dumps([p.to_dict() for p in preds], indent=2)
    lines = []
    for p in preds:
        lines.append(p.image)
        for i, label, prob in zip(p.indices, p.labels, p.probs):
            lines.append(f"  {prob:7.2%}  {i:5d}  {label}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", "--onnx", dest="model", required=True, metavar="FILE",
                   help="model written by `cpubone export` or `cpubone deploy` (.onnx, .xml, .tflite, .ncnn.param, "
                        ".pte, .pt2)")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point without torch: ``python -m cpubone.deploy.predictor``."""
    parser = argparse.ArgumentParser(prog="python -m cpubone.deploy.predictor", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        preds = predict_files(args.images, args.model, args.topk, args.threads)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    print(format_predictions(preds, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
