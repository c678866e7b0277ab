"""Image classification with an exported file (its runtime, numpy and Pillow only) or with saved
PyTorch weights, showing the class names stored with the model.

An exported file carries everything needed (written by ``cpubone export`` / ``cpubone deploy``; ONNX in
its metadata, the other runtimes in ``FILE.json`` beside it): the eval preprocessing (input size, mean,
std, crop_pct, interpolation, crop mode) and the class names. ``Predictor`` and this module
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
from ..preprocess import ImageLike, PreprocessConfig, preprocess

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
    """A classifier from any file ``cpubone export`` / ``cpubone deploy`` writes, preprocessing images as its
    metadata says.

    The runtime is chosen by the file's ending (``.onnx``: ONNX Runtime, ``.xml``: OpenVINO, ``.tflite``:
    LiteRT, ``.ncnn.param``: ncnn, ``.pte``: ExecuTorch, ``.pt2``: AOTInductor); the first four run
    without torch. The metadata is in ``FILE.json`` beside the file (``cpubone deploy``) or, for ONNX, in
    its ``metadata_props`` (``cpubone export``).

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

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.runner(x)


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
            raise ValueError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {e})") from e
        return {p.key: p.value for p in proto.metadata_props}
    raise ValueError(f"{path}: no metadata (expected {side.name} beside it, as `cpubone deploy` writes)")


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

        from .export import load_trained, model_metadata

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


def _artifact_suffixes() -> Tuple[str, ...]:
    from ..engines import engine_class, engine_names

    return tuple(s for s in (engine_class(e).suffix for e in engine_names()) if s)


def open_classifier(model: PathLike, threads: int = 1, architecture: Optional[str] = None) -> _Classifier:
    """A ``Predictor`` for an exported file (.onnx, .xml, .tflite, .ncnn.param: no torch; .pte, .pt2), else a
    ``TorchPredictor`` for saved weights."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.name.lower().endswith(_artifact_suffixes()):
        if architecture:
            raise ValueError(f"{path}: an exported file names its own model; no architecture needed")
        return Predictor(path, threads)
    if path.is_dir() or path.suffix.lower() in WEIGHT_SUFFIXES:
        return TorchPredictor(path, architecture, threads)
    raise ValueError(f"{path}: not a model: expected an exported file ({', '.join(_artifact_suffixes())}), "
                     f"a save_pretrained folder or weights ({', '.join(WEIGHT_SUFFIXES)})")


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
