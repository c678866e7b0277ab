"""The one image decoder: every path that reads pixels goes through ``decode_image``.

Training and evaluation (``train.data``), export verification and int8 calibration (``deploy.onnx``,
``deploy.quantize``), the torch-free predictor (``deploy.preprocess``), detection and segmentation data and
their ``predict`` commands (``downstream``) all call it, so a model sees the same pixels when it is
trained, checked, calibrated and deployed. numpy and Pillow only: no torch, so the deployment side can use it.

The result is always an 8-bit RGB Pillow image. The rules, in the order they apply:

1. **EXIF orientation is applied** (``ImageOps.exif_transpose``): phone and camera photos store the
   sensor's pixel grid plus a tag saying how to turn it; every viewer and labelling tool shows the turned
   image, so that is what a model should see too (mmdet and detectron2 read images the same way).
   Detection and segmentation annotations are therefore taken to refer to the upright, tag-applied image:
   ``CocoDetection`` checks the decoded size against the annotation's ``width``/``height`` and raises
   ``AnnotationError`` naming both when they differ (an annotation made on the stored grid of a 90°-tagged
   photo is caught this way; a 180° or mirror tag keeps the size and cannot be told apart). Masks are label
   maps and are read as stored, never turned.
2. **16-bit integers** (``I;16*`` modes, ``uint16`` arrays) keep their high byte: ``v >> 8``. This is the
   fixed scale 0..65535 -> 0..255 (an 8-bit image widened by x257 comes back exactly) and the rule Pillow
   itself applies to 16-bit RGB(A) PNGs, so 16-bit gray and colour files agree. A fixed scale, not the
   image's own min..max: a dark 16-bit photo stays dark, as its 8-bit export and every viewer show it.
   32-bit integer images (mode ``I``) within 0..65535 are 16-bit data stored wide (older PNG readers) and
   take the same rule; beyond that range there is no standard scale and they take the float rule's last
   step.
3. **Floats** (mode ``F``, float arrays): values within [0, 1] are the [0, 1] convention of scikit-image,
   torchvision and most float TIFF writers: ``round(v * 255)``. Otherwise values within [0, 255] are 8-bit
   values stored as floats (Pillow's own ``F`` -> ``L`` convention): ``round(v)``. Otherwise (HDR, depth,
   signed data) there is no convention and the image's own finite min..max is stretched to 0..255.
   NaN and infinities become 0. Nothing is clipped.
4. **Transparency is composited on white** (255, 255, 255): RGBA, LA, PA, palette images with a transparent
   index and RGB/L images with a transparent colour (PNG ``tRNS``). Dropping the alpha channel instead
   would show whatever colour the invisible pixels happen to hold; white is how documents and web pages
   show transparent pictures (logos, product shots).
5. Everything else converts with Pillow's ``convert("RGB")``: grayscale (``L``) and 1-bit (``1``: 0 / 255)
   are repeated over the three channels, palette (``P``) looked up, CMYK and YCbCr converted. Embedded ICC
   colour profiles are not applied (as in timm and torchvision). Multi-frame files (GIF, TIFF) give their
   first frame.

Files that cannot be read (missing excepted: ``FileNotFoundError``) raise ``ImageDecodeError``, one error
type for corrupt, truncated, unidentified, oversized (Pillow's decompression-bomb limit) and unconvertible
images; datasets skip and count them, the predictor reports them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

__all__ = ["decode_image", "open_image", "exif_orientation", "list_images", "ImageDecodeError", "ImageSource",
           "IMAGE_EXTENSIONS", "BACKGROUND"]

# what the decoder reads (by extension); the folder walkers of every dataset use this list
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# transparent pixels are composited on this colour
BACKGROUND = (255, 255, 255)

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]
PathLike = Union[str, os.PathLike]

# Pillow's errors for files it cannot read: UnidentifiedImageError and truncation are OSErrors, some
# malformed headers raise SyntaxError / ValueError / EOFError, oversized ones DecompressionBombError
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageDecodeError(ValueError):
    """A file (or array) that cannot be read as an image; the message names it and the reason."""


def open_image(path: PathLike) -> Image.Image:
    """Open and fully decode ``path`` as stored (no orientation, no mode conversion).

    The shared file reading of images and label masks: raises ``FileNotFoundError`` for a missing file and
    ``ImageDecodeError`` for anything Pillow cannot decode (decoding happens here, not later in a transform).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except _READ_ERRORS as e:
        raise ImageDecodeError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def exif_orientation(image: Union[PathLike, Image.Image]) -> int:
    """The EXIF orientation tag (1..8; 1 = as stored, also when there is none). Reads only the header."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as img:
            return exif_orientation(img)
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    # a malformed tag (out of range, not an integer) is treated as absent, as exif_transpose does
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Pixel values of any supported dtype on the 8-bit scale (rules 2 and 3 of the module docstring)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    x = arr.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(x[finite].min()), float(x[finite].max())
    if np.issubdtype(arr.dtype, np.floating) and lo >= 0 and hi <= 1:
        x = x * 255.0
    elif not (np.issubdtype(arr.dtype, np.floating) and lo >= 0 and hi <= 255):
        x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    x[~finite] = 0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    """An (H, W) or (H, W, C) array, C in 1, 3, 4 (RGBA), as an 8-bit Pillow image."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageDecodeError(f"{name}: array of shape {tuple(arr.shape)} is not an image with 1, 3 or 4 channels "
                               f"(expected (H, W) or (H, W, C))")
    if not (arr.dtype in (np.uint8, np.uint16, np.bool_) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageDecodeError(f"{name}: array dtype {arr.dtype}: expected uint8, uint16, bool or float pixels")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(arr)))


def _to_rgb(img: Image.Image) -> Image.Image:
    """An oriented Pillow image of any mode -> 8-bit RGB (rules 2 to 5 of the module docstring)."""
    if img.mode.startswith("I") or img.mode == "F":
        # Pillow's convert() clips these to 0..255 instead of rescaling
        img = Image.fromarray(_to_uint8(np.asarray(img)))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(source: ImageSource, name: Optional[str] = None) -> Image.Image:
    """An image file, Pillow image or numpy array as an 8-bit RGB Pillow image, by the module's rules.

    Args:
        source: a path, a Pillow image (its EXIF orientation is applied too) or an array (H, W) / (H, W, C)
            with C in 1, 3, 4 of dtype uint8, uint16, bool or float.
        name: what error messages call an in-memory image (paths name themselves).

    Raises ``FileNotFoundError`` for a missing file, ``ImageDecodeError`` for anything unreadable.
    """
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        img = open_image(source)
    elif isinstance(source, np.ndarray):
        img = _from_array(source, name or "image")
    elif isinstance(source, Image.Image):
        img = source
    else:
        raise TypeError(f"{name or 'image'}: expected a path, a PIL image or a numpy array, "
                        f"got {type(source).__name__}")
    name = name or "image"
    try:
        if exif_orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except _READ_ERRORS as e:
        raise ImageDecodeError(f"{name}: cannot convert a {img.mode!r} image to RGB "
                               f"({type(e).__name__}: {e})") from e


def list_images(folder: PathLike) -> List[Path]:
    """Image files (by extension, ``IMAGE_EXTENSIONS``) under ``folder``, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
