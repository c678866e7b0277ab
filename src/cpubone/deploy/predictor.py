"""Torch-free image classification with an exported ONNX file: onnxruntime, numpy and Pillow only.

The file carries everything needed (written by ``cpubone export``): the eval preprocessing (input size,
mean, std, crop_pct, interpolation, crop mode) and the class names. This module must never import
torch (a test checks ``sys.modules``), so it is usable in slim deployment images.

    python -m cpubone.deploy.predictor IMAGE... --onnx FILE [--topk 5] [--json]
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
    """An ONNX Runtime classifier that preprocesses images as the model's metadata says.

    Args:
        onnx_path: a file written by ``cpubone export`` (fp32 or int8).
        threads: ONNX Runtime intra-op threads.
    """

    def __init__(self, onnx_path: Union[str, os.PathLike], threads: int = 1) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for malformed files
            raise ValueError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {e})") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.config = PreprocessConfig.from_metadata(meta)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        labels = json.loads(meta.get("cpubone.labels", "null"))
        self.labels: Optional[List[str]] = labels
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        channels = inp.shape[1]
        if isinstance(channels, int) and channels != self.config.input_size[0]:
            raise ValueError(f"{path}: metadata says {self.config.input_size[0]} input channels, graph has {channels}")
        self.path = path

    def preprocess(self, image: ImageLike, name: str = "image") -> np.ndarray:
        """(channels, height, width) float32 input for one image (path, PIL image or uint8 array)."""
        return preprocess(image, self.config, name)

    def logits(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(N, classes) raw outputs; images run one by one (batch 1, as the model was exported)."""
        outs = [self.session.run(None, {self.input_name: self.preprocess(im, _name(im, i))[None]})[0]
                for i, im in enumerate(images)]
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
    p.add_argument("--onnx", required=True, metavar="FILE", help="model written by `cpubone export`")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point without torch: ``python -m cpubone.deploy.predictor``."""
    parser = argparse.ArgumentParser(prog="python -m cpubone.deploy.predictor", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        preds = predict_files(args.images, args.onnx, args.topk, args.threads)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    print(format_predictions(preds, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
