"""Numerics of a runner against the PyTorch training form.

fp32 must reproduce the training form within a tolerance (relative to max(1, max |logit|)) on random
inputs and on real photos, or the engine is refused (``EngineVerificationError``). Low precision is
approximate by design and is judged by what a user sees: top-1 agreement with fp32 on real images (and
accuracy on a labelled folder), always on a trained model -- with random weights (and random BatchNorm
statistics) every input gets the same class, and agreement means nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..images import ImageSource
from ..preprocess import PreprocessConfig, preprocess
from .base import EngineError, Runner

__all__ = ["Check", "Agreement", "EngineVerificationError", "SKIMAGE_PHOTOS", "sample_photos",
           "verification_inputs", "photo_inputs", "photo_samples", "check_outputs", "verify_fp32", "judge_fp32", "agreement"]

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


class EngineVerificationError(EngineError):
    """A runtime's fp32 outputs differ from PyTorch's by more than the tolerance."""


@dataclass
class Check:
    """One comparison of a runner with the reference on one input."""

    input: str
    shape: Tuple[int, ...]
    max_abs_diff: float
    max_abs_ref: float
    top1_agree: bool


@dataclass
class Agreement:
    """A (low-precision) runner against the fp32 reference on ``n`` images."""

    n: int
    top1_agreement: float  # fraction of images with the same top-1 class as the reference
    accuracy: Optional[float] = None  # top-1 accuracy (%) on labelled images
    reference_accuracy: Optional[float] = None
    max_abs_diff: float = 0.0

    @property
    def accuracy_drop(self) -> Optional[float]:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return self.reference_accuracy - self.accuracy

    def to_dict(self) -> Dict[str, object]:
        return dict(asdict(self), accuracy_drop=self.accuracy_drop)


def sample_photos(names: Sequence[str] = SKIMAGE_PHOTOS) -> List[Tuple[str, np.ndarray]]:
    """Real photos bundled with scikit-image (no download), as (name, uint8 array)."""
    from skimage import data

    return [(n, getattr(data, n)()) for n in names]


def photo_inputs(cfg: PreprocessConfig, photos: Optional[Sequence[Tuple[str, ImageSource]]] = None
                 ) -> List[Tuple[str, np.ndarray]]:
    """Photos as model inputs ``("photo NAME", (1, C, H, W) float32)``: the shared decoder and eval preprocessing.

    ``photos`` are (name, image file / PIL image / array) pairs; default ``sample_photos()``.
    """
    return [(f"photo {name}", preprocess(img, cfg, name)[None])
            for name, img in (photos if photos is not None else sample_photos())]


def verification_inputs(cfg: PreprocessConfig, photos: Optional[Sequence[Tuple[str, ImageSource]]] = None,
                        seed: int = 0) -> List[Tuple[str, np.ndarray]]:
    """A random (1, C, H, W) input and the photos preprocessed by ``cfg``."""
    c, h, w = cfg.input_size
    inputs = [(f"random {h}x{w}", np.random.default_rng(seed).standard_normal((1, c, h, w)).astype(np.float32))]
    return inputs + photo_inputs(cfg, photos)


def photo_samples(data_config: Dict[str, object], n: int = 8) -> List[np.ndarray]:
    """Up to ``n`` (1, C, H, W) samples for calibrating a timing run: the scikit-image photos and their
    mirror images through the eval preprocessing of timm's ``data_config`` (``resolve_data_config``)."""
    cfg = PreprocessConfig.from_data_config(data_config)
    photos = [preprocess(img, cfg, name)[None] for name, img in sample_photos()]
    return (photos + [p[..., ::-1].copy() for p in photos])[:n]


def check_outputs(run: Callable[[np.ndarray], np.ndarray], reference: Callable[[np.ndarray], np.ndarray],
                  inputs: Sequence[Tuple[str, np.ndarray]]) -> List[Check]:
    checks = []
    for name, x in inputs:
        ref, out = reference(x), run(x)
        if out.shape != ref.shape:
            raise EngineVerificationError(f"output shape {out.shape} != PyTorch {ref.shape} on {name}")
        checks.append(Check(name, tuple(x.shape), float(np.abs(out - ref).max()), float(np.abs(ref).max()),
                            bool((out.argmax(-1) == ref.argmax(-1)).all())))
    return checks


def torch_reference(model) -> Callable[[np.ndarray], np.ndarray]:
    """``model`` (PyTorch, eval mode) as a numpy -> numpy call, outputs as a ``Runner`` gives them: (N, -1).

    A classifier's (N, classes) is unchanged; a dense output (detection anchors, segmentation logits) is
    flattened per sample, the layout every runtime agrees on (ncnn drops the batch axis).
    """
    import torch

    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).float().reshape(len(x), -1).numpy()

    return run


def verify_fp32(runner: Runner, model, inputs: Sequence[Tuple[str, np.ndarray]],
                tolerance: Optional[float] = None) -> List[Check]:
    """``runner`` against ``model`` (the PyTorch training form) on ``inputs``; raises when out of tolerance.

    ``tolerance``: relative to max(1, max |logit|); default the engine's own (``Engine.tolerance``).
    """
    return judge_fp32(runner, check_outputs(runner, torch_reference(model), inputs), tolerance)


def judge_fp32(runner: Runner, checks: List[Check], tolerance: Optional[float] = None) -> List[Check]:
    """Raise ``EngineVerificationError`` when a check of ``runner`` (fp32) is out of tolerance; else ``checks``.

    For callers that compare several runners against one reference computed once (``check_outputs``).
    """
    from . import engine_class

    tol = engine_class(runner.engine).tolerance if tolerance is None else tolerance
    bad = [c for c in checks if not c.max_abs_diff <= tol * max(1.0, c.max_abs_ref)]
    if bad:
        worst = max(bad, key=lambda c: c.max_abs_diff)
        where = f" ({runner.artifact})" if runner.artifact else ""
        raise EngineVerificationError(
            f"{runner.label}{where} disagrees with PyTorch: max abs difference {worst.max_abs_diff:.3g} on "
            f"{worst.input} (outputs up to {worst.max_abs_ref:.3g}; tolerance {tol:g} relative); "
            f"{len(bad)} of {len(checks)} checks failed")
    return checks


def agreement(logits: np.ndarray, reference: np.ndarray, labels: Optional[Sequence[int]] = None) -> Agreement:
    """Top-1 agreement of ``logits`` with ``reference`` (both (N, classes)) and accuracy on ``labels``."""
    if logits.shape != reference.shape:
        raise EngineError(f"logits of shape {logits.shape} vs reference {reference.shape}")
    pred, ref = logits.argmax(-1), reference.argmax(-1)
    acc = ref_acc = None
    if labels is not None:
        y = np.asarray(labels)
        acc, ref_acc = float((pred == y).mean() * 100), float((ref == y).mean() * 100)
    return Agreement(int(len(pred)), float((pred == ref).mean()), acc, ref_acc,
                     float(np.abs(logits - reference).max()) if len(pred) else 0.0)
