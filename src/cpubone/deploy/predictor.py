"""Image classification with an exported ONNX file (onnxruntime, numpy and Pillow only) or with saved
PyTorch weights, showing the class names stored with the model.

The ONNX file carries everything needed (written by ``cpubone export``): the eval preprocessing (input
size, mean, std, crop_pct, interpolation, crop mode) and the class names. ``Predictor`` and this module
must never import torch (a test checks ``sys.modules``), so they work in slim deployment images;
``TorchPredictor`` imports torch only when it is built. The command line is ``cpubone predict``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..images import IMAGE_EXTENSIONS, list_images
from .preprocess import ImageLike, PreprocessConfig, preprocess

__all__ = ["Predictor", "TorchPredictor", "Prediction", "open_classifier", "expand_images", "predict_files"]

PathLike = Union[str, os.PathLike]
# weights TorchPredictor reads; anything else that is not .onnx is not a model
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class Prediction:
    """Top-k classes of one image: (class index, label, softmax probability), best first; or, for an
    image that could not be classified, ``error`` saying why (and no classes)."""

    image: str
    indices: List[int]
    labels: List[str]
    probs: List[float]
    error: Optional[str] = None

    def to_dict(self) -> Dict[str, object]:
        if self.error is not None:
            return dict(image=self.image, error=self.error)
        return dict(image=self.image, topk=[dict(index=i, label=l, prob=p)
                                            for i, l, p in zip(self.indices, self.labels, self.probs)])


class _Classifier:
    """What both predictors share: preprocessing, top-k with softmax, class names, one image at a time."""

    config: PreprocessConfig
    labels: Optional[List[str]]

    def _run(self, x: np.ndarray) -> np.ndarray:
        """(1, classes) outputs for one preprocessed (1, C, H, W) float32 input."""
        raise NotImplementedError

    def preprocess(self, image: ImageLike, name: str = "image") -> np.ndarray:
        """(channels, height, width) float32 input for one image (path, PIL image or uint8 array)."""
        return preprocess(image, self.config, name)

    def logits(self, images: Sequence[ImageLike]) -> np.ndarray:
        """(N, classes) raw outputs; images run one by one (batch 1, as the model was exported)."""
        outs = [self._run(self.preprocess(im, _name(im, i))[None]) for i, im in enumerate(images)]
        return np.concatenate(outs, 0)

    def predict(self, images: Sequence[ImageLike], topk: int = 5) -> List[Prediction]:
        """Top-``topk`` classes with softmax probabilities for each image; an unreadable image raises."""
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

    def predict_each(self, images: Sequence[ImageLike], topk: int = 5) -> List[Prediction]:
        """Like ``predict``, but an image that cannot be read or converted gets a ``Prediction`` with its
        ``error`` instead of stopping the others."""
        if topk < 1:
            raise ValueError(f"topk={topk}: must be at least 1")
        out = []
        for i, im in enumerate(images):
            try:
                out.append(self.predict([im], topk)[0])
            except (ValueError, OSError) as e:  # the decoder's errors: unreadable, missing, odd shape
                out.append(Prediction(_name(im, i), [], [], [], error=str(e)))
        return out


class Predictor(_Classifier):
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

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def _name(image: ImageLike, i: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image {i}"


class TorchPredictor(_Classifier):
    """The same classifier from PyTorch weights, preprocessed as the exported file would be.

    Args:
        weights: a ``save_pretrained`` folder, or a weights file (.safetensors, .pt, .pth; ours, timm's or
            the authors' layout).
        model: the architecture (CPUBone variant or timm name); default the one saved with the weights.
        threads: torch intra-op threads.
    """

    def __init__(self, weights: PathLike, model: Optional[str] = None, threads: int = 1) -> None:
        import torch

        from .onnx import load_trained, model_metadata

        self.model, labels = load_trained(model, weights)
        self.model.eval()
        name = model or self.model.pretrained_cfg.get("architecture", "")
        input_size = tuple(self.model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
        meta = model_metadata(self.model, input_size, name=name, labels=labels)
        self.config = PreprocessConfig.from_metadata(meta)
        self.labels = json.loads(meta["cpubone.labels"])
        self.threads, self.path = threads, Path(weights)
        self._torch = torch

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return self.model(torch.from_numpy(x)).float().numpy()
        finally:
            torch.set_num_threads(old)


def open_classifier(model: PathLike, threads: int = 1, architecture: Optional[str] = None) -> _Classifier:
    """A ``Predictor`` for an .onnx file (no torch), else a ``TorchPredictor`` for saved weights."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.suffix.lower() == ".onnx":
        if architecture:
            raise ValueError(f"{path}: an ONNX file names its own model; no architecture needed")
        return Predictor(path, threads)
    if path.is_dir() or path.suffix.lower() in WEIGHT_SUFFIXES:
        return TorchPredictor(path, architecture, threads)
    raise ValueError(f"{path}: not a model: expected an .onnx file, a save_pretrained folder or weights "
                     f"({', '.join(WEIGHT_SUFFIXES)})")


def expand_images(inputs: Sequence[PathLike]) -> Tuple[List[Path], List[Prediction]]:
    """Image files for ``inputs`` (files as given; folders: the image files inside them, recursively,
    sorted) and an error entry for each folder without images."""
    files: List[Path] = []
    errors: List[Prediction] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = list_images(path)
            if not found:
                errors.append(Prediction(str(path), [], [], [], error=f"{path}: no image files in this folder "
                                                                      f"({', '.join(sorted(IMAGE_EXTENSIONS))})"))
            files += found
        else:
            files.append(path)
    return files, errors


def predict_files(images: Sequence[PathLike], model: PathLike, topk: int = 5, threads: int = 1,
                  architecture: Optional[str] = None) -> List[Prediction]:
    """``cpubone predict``: classify image files and folders of images with an exported model (.onnx) or
    saved weights. Each image that cannot be classified gets an entry with its ``error``; the others
    their classes."""
    if not images:
        raise ValueError("no images given")
    if topk < 1:
        raise ValueError(f"topk={topk}: must be at least 1")
    classifier = open_classifier(model, threads, architecture)
    files, errors = expand_images(images)
    return classifier.predict_each(files, topk) + errors
