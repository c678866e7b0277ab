"""Eval-time image preprocessing with numpy and Pillow only: the one definition shared by export
verification, int8 calibration and the torch-free predictor.

Pixels come from the one image decoder, ``cpubone.images.decode_image`` (the same one training reads
with: 16-bit and float images rescaled, transparency on white, EXIF orientation applied). The rest
reproduces timm's eval transform (``timm.data.create_transform(**resolve_data_config(model=m))``):
resize (Pillow, the model's interpolation) so that the crop is ``crop_pct`` of the resized image, center
crop, scale to [0, 1], normalize by mean and std. Pillow does the resizing in both, so the results agree
to float32 rounding. No torch import here: this module is used where torch is not installed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import numpy as np
from PIL import Image

from .images import ImageDecodeError, decode_image, list_images
from .images import ImageSource as ImageLike

__all__ = ["PreprocessConfig", "to_model_mode", "preprocess", "preprocess_batch", "calibration_samples"]

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass
class PreprocessConfig:
    """What a model expects: timm's data config (``resolve_data_config``) in plain Python types.

    Args:
        input_size: (channels, height, width) of the network input.
        mean / std: per-channel normalization of the [0, 1] image.
        crop_pct: fraction of the resized image kept by the center crop (0.95 for CPUBone).
        interpolation: Pillow resampling filter used for the resize ("bicubic" for CPUBone).
        crop_mode: "center" (keep aspect ratio, crop the middle) or "squash" (resize each side).
    """

    input_size: Tuple[int, int, int] = (3, 224, 224)
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.95
    interpolation: str = "bicubic"
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        self.input_size = tuple(int(v) for v in self.input_size)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.crop_pct = float(self.crop_pct)
        if len(self.input_size) != 3:
            raise ValueError(f"input_size={self.input_size}: expected (channels, height, width)")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation={self.interpolation!r}: expected one of {sorted(_INTERPOLATION)}")
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode={self.crop_mode!r}: expected 'center' or 'squash'")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct={self.crop_pct}: must be in (0, 1]")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise ValueError(f"mean {self.mean} / std {self.std} do not match {self.input_size[0]} input channels")

    @classmethod
    def from_data_config(cls, cfg: Mapping[str, Any]) -> "PreprocessConfig":
        """From timm's ``resolve_data_config`` dict (or a model's ``pretrained_cfg``)."""
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()
                      if k in keys and v is not None})

    def to_metadata(self) -> Dict[str, str]:
        """String key/values for ONNX ``metadata_props`` (each value JSON-encoded)."""
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "PreprocessConfig":
        """Inverse of ``to_metadata``; raises ValueError naming a missing or malformed key."""
        values: Dict[str, Any] = {}
        for key in cls.__dataclass_fields__:
            if key not in meta:
                raise ValueError(f"model metadata has no {key!r} entry (export it with `cpubone export`)")
            try:
                values[key] = json.loads(meta[key])
            except json.JSONDecodeError as e:
                raise ValueError(f"model metadata entry {key!r} is not JSON: {meta[key]!r}") from e
        return cls(**values)

    @property
    def resize_size(self) -> Tuple[int, int]:
        """(height, width) the image is resized towards before the crop (timm's ``scale_size``)."""
        return tuple(math.floor(s / self.crop_pct) for s in self.input_size[1:])


def to_model_mode(image: ImageLike, channels: int, name: str = "image") -> Image.Image:
    """The image decoded by ``cpubone.images.decode_image`` in the model's channel count (RGB for 3, L for 1)."""
    if channels not in (1, 3):
        raise ValueError(f"model expects {channels} input channels: only 1 (grayscale) or 3 (RGB) images are supported")
    rgb = decode_image(image, name)
    # equal R, G, B (a decoded grayscale image) give back exactly that gray: Pillow's luma weights sum to 1
    return rgb if channels == 3 else rgb.convert("L")


def _resize_size(width: int, height: int, cfg: PreprocessConfig) -> Tuple[int, int]:
    """(width, height) after timm's eval resize."""
    th, tw = cfg.resize_size
    if cfg.crop_mode == "squash":
        return tw, th
    if th == tw:
        # torchvision Resize(int): the shorter side becomes the size, the longer one is truncated
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(th * long / short)
        return (th, new_long) if width <= height else (new_long, th)
    # timm's ResizeKeepRatio (longest=0): scale by the smaller of the two side ratios
    ratio = min(height / th, width / tw)
    return round(width / ratio), round(height / ratio)


def _center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    w, h = img.size
    if w < width or h < height:
        # torchvision pads with zeros (centered) when the crop is larger than the image
        pad_l, pad_t = (width - w) // 2 if w < width else 0, (height - h) // 2 if h < height else 0
        canvas = Image.new(img.mode, (max(w, width), max(h, height)), 0)
        canvas.paste(img, (pad_l, pad_t))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return img.crop((left, top, left + width, top + height))


def preprocess(image: ImageLike, cfg: PreprocessConfig, name: str = "image") -> np.ndarray:
    """One image -> float32 array (channels, height, width), as timm's eval transform would make it."""
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
    channels, height, width = cfg.input_size
    img = to_model_mode(image, channels, name)
    new_w, new_h = _resize_size(img.width, img.height, cfg)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), _INTERPOLATION[cfg.interpolation])
    img = _center_crop(img, height, width)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    x = arr.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images: Iterable[ImageLike], cfg: PreprocessConfig) -> np.ndarray:
    """Several images -> float32 array (N, channels, height, width)."""
    return np.stack([preprocess(im, cfg) for im in images])


def calibration_samples(folder: "os.PathLike[str] | str", cfg: PreprocessConfig, limit: int = 64) -> List[np.ndarray]:
    """Up to ``limit`` images of ``folder`` (recursively, sorted) as (1, C, H, W) float32 model inputs: what
    int8 calibration sees, as deployment will feed it. Unreadable images are skipped; none readable is an error."""
    if limit < 1:
        raise ValueError(f"calibration count {limit}: need at least 1 image")
    files = list_images(folder)
    out = []
    for f in files:
        if len(out) >= limit:
            break
        try:
            out.append(preprocess(f, cfg)[None])
        except (ImageDecodeError, ValueError):
            continue  # a broken file in a folder of photos does not stop the calibration
    if not out:
        raise ValueError(f"{folder}: no readable image to calibrate on ({len(files)} image files found)")
    return out
