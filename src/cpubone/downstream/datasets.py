"""Detection (COCO format) and segmentation (ADE20K format) data, their augmentations, and synthetic sets.

Formats, exactly as the public datasets ship them:
- COCO detection: an image folder and an ``instances_*.json`` with ``images``, ``annotations`` (``bbox`` as
  ``[x, y, w, h]`` in pixels, ``category_id``, ``area``, ``iscrowd``) and ``categories``.
- ADE20K segmentation: ``images/<split>/*.jpg|png`` and ``annotations/<split>/*.png`` index masks of the
  same stem; 0 is "other" (dropped with ``reduce_zero_label``, as mmseg does for ADE20K's 150 classes),
  255 is ignored.

Augmentations use ``torchvision.transforms.v2`` with ``tv_tensors`` so boxes and masks follow the image
through resize, crop and flip. Annotations are checked when the dataset is opened, so a bad file stops a run
before its first step, not when a sampler happens to draw it: a bad box, an undeclared category, a duplicate
id, a missing file, an unreadable mask, a mask of the wrong mode or size raise ``AnnotationError`` naming the
file and the annotation (mask headers only are read then; PIL decodes lazily). Mask values out of range need
the decoded pixels and are checked when a mask is read. Images are read by the shared decoder
(``cpubone.images.decode_image``: EXIF orientation applied, so annotations and masks refer to the upright
image; an image whose size disagrees with its annotation raises ``AnnotationError``). Images that exist but
cannot be decoded are skipped and counted (``collate_skip`` drops them); masks are read as stored.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    exif_orientation,
    open_image,
)

__all__ = [
    "AnnotationError", "CocoDetection", "SegmentationFolder", "detection_transforms", "segmentation_transforms",
    "collate_skip", "SYNTHETIC_CLASSES", "synthetic_scene", "write_synthetic_coco", "write_synthetic_ade",
]

PathLike = Union[str, os.PathLike]
IGNORE_INDEX = 255
# boxes may overhang the image by rounding; COCO's own annotations do by up to ~1 px
BOX_TOLERANCE_PX = 1.0


class AnnotationError(ValueError):
    """A malformed annotation or a missing file; the message names the file and the annotation."""


def _load_rgb(path: Path) -> Optional[Image.Image]:
    """The image from the shared decoder, or None (with a warning) when the file cannot be decoded."""
    try:
        return decode_image(path)
    except (ImageDecodeError, FileNotFoundError) as e:  # FileNotFoundError: deleted since the check
        warnings.warn(f"skipping unreadable image: {e}")
        return None


def _size_mismatch(what: str, path: Path, size: Tuple[int, int], expected: Tuple[int, int]) -> str:
    """Message for an image whose decoded (EXIF-oriented) size is not the one its annotation refers to."""
    msg = f"{what} is {expected[0]}x{expected[1]} but image {path.name} is {size[0]}x{size[1]}"
    orientation = exif_orientation(path)
    if orientation != 1:
        msg += (f" after applying its EXIF orientation (tag {orientation}); annotations refer to the upright "
                f"image as viewers show it: annotate that, or remove the tag")
    return msg


# --- COCO detection ---------------------------------------------------------------------------
class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection data: ``(image, target)`` with ``target`` = boxes (XYXY), labels, image_id.

    Args:
        image_dir: folder that ``file_name`` entries are relative to.
        ann_file: the instances JSON.
        transforms: a v2 transform called as ``transforms(image, target)``.

    Labels are contiguous (0..K-1) in the sorted order of the declared category ids; ``cat_ids[label]``
    maps back for COCO evaluation. Crowd annotations are kept out of the training targets (RetinaNet has no
    ignore regions) but stay in the ground truth that ``COCOeval`` sees.
    """

    def __init__(self, image_dir: PathLike, ann_file: PathLike,
                 transforms: Optional[Callable] = None) -> None:
        # optional: pip install 'cpubone[downstream]'
        from pycocotools.coco import COCO

        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}")
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{self.ann_file}: not valid JSON: {e}") from e
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise AnnotationError(f"{self.ann_file}: missing top-level key {key!r} (COCO instances format)")
        _validate_coco(data, self.ann_file, self.image_dir)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.ids: List[int] = sorted(self.coco.imgs)
        self.cat_ids: List[int] = sorted(self.coco.cats)
        self.cat_to_label: Dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.classes: List[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> Dict[str, torch.Tensor]:
        """Ground truth of image ``index`` (XYXY boxes in pixels, contiguous labels), crowd excluded."""
        img_id = self.ids[index]
        anns = [a for a in self.coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels, "image_id": torch.tensor(img_id)}

    def __getitem__(self, index: int):
        info = self.coco.imgs[self.ids[index]]
        path = self.image_dir / info["file_name"]
        img = _load_rgb(path)
        if img is None:
            return None
        if img.size != (info["width"], info["height"]):  # the boxes would not lie where they were drawn
            raise AnnotationError(f"{self.ann_file}: " + _size_mismatch(
                f"image id {info['id']}'s width x height", path, img.size, (info["width"], info["height"])))
        t = self.target(index)
        image = tv_tensors.Image(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        t["boxes"] = tv_tensors.BoundingBoxes(t["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
        if self.transforms is not None:
            image, t = self.transforms(image, t)
        return image, t


def _validate_coco(data: Dict[str, Any], ann_file: Path, image_dir: Path) -> None:
    cats: Dict[Any, str] = {}
    for c in data["categories"]:
        if "id" not in c or "name" not in c:
            raise AnnotationError(f"{ann_file}: category entry {c!r} lacks 'id' or 'name'")
        if c["id"] in cats:
            raise AnnotationError(f"{ann_file}: duplicate category id {c['id']!r} ({cats[c['id']]!r} and {c['name']!r})")
        cats[c["id"]] = c["name"]
    if not cats:
        raise AnnotationError(f"{ann_file}: no categories declared")
    # class names key the per-class tables and colour the pictures: two classes must not share one
    names = sorted(cats.values())
    twice = sorted({n for a, n in zip(names, names[1:]) if a == n})
    if twice:
        raise AnnotationError(f"{ann_file}: duplicate category name {twice[0]!r} (ids "
                              f"{sorted(i for i, n in cats.items() if n == twice[0])})")
    if not data["images"]:
        raise AnnotationError(f"{ann_file}: 'images' is empty")
    if not data["annotations"]:
        warnings.warn(f"{ann_file}: 'annotations' is empty: no object to learn from or to score")
    images: Dict[int, Dict[str, Any]] = {}
    missing: List[str] = []
    for im in data["images"]:
        for key in ("id", "file_name", "width", "height"):
            if key not in im:
                raise AnnotationError(f"{ann_file}: image entry {im.get('id', im)!r} lacks {key!r}")
        if im["id"] in images:
            # pycocotools would keep the last entry and pin the first file's boxes onto it
            raise AnnotationError(f"{ann_file}: duplicate image id {im['id']!r} "
                                  f"({images[im['id']]['file_name']} and {im['file_name']})")
        images[im["id"]] = im
        if not (image_dir / im["file_name"]).is_file():
            missing.append(im["file_name"])
    if missing:
        raise AnnotationError(
            f"{ann_file}: {len(missing)} image file(s) listed but not found under {image_dir}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    ann_ids: set = set()
    for i, a in enumerate(data["annotations"]):
        if "id" not in a:  # pycocotools indexes annotations by id
            raise AnnotationError(f"{ann_file}: annotation #{i} (image_id {a.get('image_id')!r}) lacks 'id'")
        aid = a["id"]
        if aid in ann_ids:  # COCOeval matches detections to ground truth by annotation id
            raise AnnotationError(f"{ann_file}: duplicate annotation id {aid!r}")
        ann_ids.add(aid)
        where = f"{ann_file}: annotation id {aid}"
        if a.get("image_id") not in images:
            raise AnnotationError(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
        im = images[a["image_id"]]
        where += f" (image {im['file_name']})"
        if a.get("category_id") not in cats:
            raise AnnotationError(f"{where}: category_id {a.get('category_id')!r} is not declared in 'categories' "
                                  f"(declared: {sorted(cats)})")
        box = a.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in box):
            raise AnnotationError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise AnnotationError(f"{where}: bbox {box} has non-positive width or height")
        tol = BOX_TOLERANCE_PX
        if x < -tol or y < -tol or x + w > im["width"] + tol or y + h > im["height"] + tol:
            raise AnnotationError(f"{where}: bbox {box} lies outside the {im['width']}x{im['height']} image")


# --- ADE20K-format segmentation ----------------------------------------------------------------
class SegmentationFolder(torch.utils.data.Dataset):
    """ADE20K-format segmentation: ``(image, mask)`` pairs from ``images/<split>`` and ``annotations/<split>``.

    Args:
        root: dataset root holding ``images/`` and ``annotations/``.
        split: sub-folder, e.g. ``training`` / ``validation``.
        num_classes: classes after label reduction (150 for ADE20K).
        reduce_zero_label: map label 0 ("other") to ignore and shift the rest down by one, as ADE20K's
            150-class benchmark does.
        transforms: a v2 transform called as ``transforms(image, mask)``.
        classes: the class names (``num_classes`` of them). Default: ``root/classes.json`` (a list naming
            every mask value from 0, so its first name is dropped with ``reduce_zero_label``), else "0", "1"...

    Every mask is opened when the dataset is (header only, no decoding): a file that is not an image, a
    mask that is not single-channel, or one whose size differs from its image raises ``AnnotationError``.
    """

    def __init__(self, root: PathLike, split: str, num_classes: int, reduce_zero_label: bool = False,
                 transforms: Optional[Callable] = None, ignore_index: int = IGNORE_INDEX,
                 classes: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        self.image_dir = self.root / "images" / split
        self.mask_dir = self.root / "annotations" / split
        for d in (self.image_dir, self.mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"segmentation folder not found: {d} (expected ADE20K layout "
                                        f"images/<split>/ and annotations/<split>/)")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one class")
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.transforms = transforms
        images = {p.stem: p for p in sorted(self.image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        masks = {p.stem: p for p in sorted(self.mask_dir.iterdir()) if p.suffix.lower() == ".png"}
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask:
            raise AnnotationError(f"{self.mask_dir}: no mask PNG for {len(no_mask)} image(s): "
                                  f"{', '.join(images[s].name for s in no_mask[:5])}")
        if no_image:
            raise AnnotationError(f"{self.image_dir}: no image for {len(no_image)} mask(s): "
                                  f"{', '.join(masks[s].name for s in no_image[:5])}")
        if not images:
            raise AnnotationError(f"{self.image_dir}: no images found")
        self.samples: List[Tuple[Path, Path]] = [(images[s], masks[s]) for s in sorted(images)]
        self.classes: List[str] = self._class_names(classes)
        for image_path, mask_path in self.samples:
            _check_mask_header(image_path, mask_path)

    def _class_names(self, classes: Optional[Sequence[str]]) -> List[str]:
        if classes is not None:
            names, source = [str(c) for c in classes], "classes"
        else:
            path = self.root / "classes.json"
            if not path.is_file():
                return [str(k) for k in range(self.num_classes)]
            try:
                names = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}: not valid JSON: {e}") from e
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise AnnotationError(f"{path}: must be a JSON list of class names (mask value 0 first)")
            source = str(path)
            expect = self.num_classes + (1 if self.reduce_zero_label else 0)
            if len(names) != expect:
                raise AnnotationError(
                    f"{path}: lists {len(names)} names; {self.num_classes} classes need {expect}"
                    + (" (label 0 first, dropped by reduce_zero_label)" if self.reduce_zero_label else ""))
            names = names[1:] if self.reduce_zero_label else names
        if len(names) != self.num_classes:
            raise ValueError(f"{source}: {len(names)} names for {self.num_classes} classes")
        if len(set(names)) != len(names):
            raise AnnotationError(f"{source}: class names repeat: "
                                  f"{sorted({n for n in names if names.count(n) > 1})}")
        return names

    def __len__(self) -> int:
        return len(self.samples)

    def read_mask(self, index: int) -> np.ndarray:
        """Label map (H, W) int64 after reduction, checked against ``num_classes`` and ``ignore_index``."""
        path = self.samples[index][1]
        try:
            m = open_image(path)  # as stored: a label map is never rescaled, composited or turned
        except ImageDecodeError as e:
            raise AnnotationError(str(e)) from e
        _check_mask_mode(path, m)
        mask = np.asarray(m).astype(np.int64)
        if self.reduce_zero_label:
            was_ignored = mask == self.ignore_index
            mask = mask - 1  # 0 ("other") -> -1 -> ignore, k -> k-1
            mask[(mask < 0) | was_ignored] = self.ignore_index
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != self.ignore_index) | (mask < 0)])
        if bad.size:
            raise AnnotationError(
                f"{path}: mask values {bad[:10].tolist()} outside 0..{self.num_classes - 1} and not the ignore "
                f"index {self.ignore_index}" + (" (after reduce_zero_label)" if self.reduce_zero_label else ""))
        return mask

    def __getitem__(self, index: int):
        img_path, mask_path = self.samples[index]
        img = _load_rgb(img_path)
        if img is None:
            return None
        mask = self.read_mask(index)
        if mask.shape != (img.height, img.width):
            raise AnnotationError(f"{mask_path}: " + _size_mismatch("mask", img_path, img.size, mask.shape[::-1]))
        image = tv_tensors.Image(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        target = tv_tensors.Mask(torch.from_numpy(mask))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


MASK_MODES = ("L", "P", "I", "I;16")  # single-channel index images; the values are the labels


def _check_mask_mode(path: Path, mask: Image.Image) -> None:
    if mask.mode not in MASK_MODES:
        hint = " (a colour-coded mask? index masks hold one class number per pixel)" if mask.mode in ("RGB", "RGBA") else ""
        raise AnnotationError(f"{path}: mask mode is {mask.mode}, expected a single-channel index PNG "
                              f"({', '.join(MASK_MODES)}){hint}")


def _open_mask(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError) as e:
        why = ("not an image file PIL can identify" if isinstance(e, UnidentifiedImageError)
               else str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise AnnotationError(f"{path}: not a readable mask image ({why})") from e


def _check_mask_header(image_path: Path, mask_path: Path) -> None:
    """Mode and size of a mask against its image, from the file headers (``Image.open`` decodes nothing)."""
    with _open_mask(mask_path) as m:
        _check_mask_mode(mask_path, m)
        mask_size = m.size
    try:
        with Image.open(image_path) as im:
            image_size = im.size
            if exif_orientation(im) >= 5:  # decode_image turns the image upright: 5-8 swap width and height
                image_size = image_size[::-1]
    except (OSError, SyntaxError, ValueError):
        return  # an unreadable image is skipped (with a warning) when drawn; its mask is never used
    if mask_size != image_size:
        raise AnnotationError(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but image {image_path.name} "
                              f"is {image_size[0]}x{image_size[1]}")


# --- augmentations -----------------------------------------------------------------------------
def photometric_distortion(p: float = 0.5):
    """mmseg's PhotoMetricDistortion in v2 terms: brightness +-32/255, contrast and saturation x[0.5, 1.5],
    hue +-0.05 (applied with probability ``p``). Unlike v2.RandomPhotometricDistort (SSD's), it never
    permutes the colour channels, which would turn a red object into a blue one."""
    return v2.RandomApply([v2.ColorJitter(brightness=32 / 255, contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                                          hue=0.05)], p=p)


def detection_transforms(train: bool, scale_jitter: Optional[Tuple[int, int]] = None, photometric: bool = True):
    """Images to float [0, 1]; training adds photometric distortion and horizontal flip (mmdet's 1x pipeline
    flips; resizing to ``min_size``/``max_size`` is done inside RetinaNet). ``scale_jitter`` = (min, max)
    shorter side adds multi-scale training."""
    ops: List[Any] = []
    if train:
        if photometric:
            ops.append(photometric_distortion())
        if scale_jitter:
            ops.append(v2.RandomShortestSize(list(range(scale_jitter[0], scale_jitter[1] + 1, 32))))
        ops.append(v2.RandomHorizontalFlip())
        ops.append(v2.SanitizeBoundingBoxes())  # drops boxes that transforms made empty
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)


def segmentation_transforms(train: bool, crop_size: int = 512, base_size: int = 512,
                            ratio_range: Tuple[float, float] = (0.5, 2.0), photometric: bool = True,
                            ignore_index: int = IGNORE_INDEX):
    """mmseg's ADE20K pipeline in v2 terms.

    Training: random rescale of the shorter side to ``base_size`` x ``ratio_range``, random ``crop_size`` crop
    (padded with 0 / ``ignore_index`` where the image is smaller), horizontal flip, photometric distortion.
    Evaluation: shorter side to ``base_size`` (the prediction is resized back to the original mask).
    """
    ops: List[Any] = []
    if train:
        ops += [
            v2.RandomResize(int(base_size * ratio_range[0]), int(base_size * ratio_range[1]) + 1),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
            v2.RandomHorizontalFlip(),
        ]
        if photometric:
            ops.append(photometric_distortion())
    else:
        ops.append(v2.Resize(base_size))
    ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True))
    return v2.Compose(ops)


def collate_skip(batch: Sequence[Any]) -> Tuple[List[Any], List[Any], int]:
    """Collate to (images, targets, skipped): unreadable images (None) are dropped and counted."""
    kept = [b for b in batch if b is not None]
    return [b[0] for b in kept], [b[1] for b in kept], len(batch) - len(kept)


# --- synthetic data in the real formats ---------------------------------------------------------
# (shape, RGB) per class: shape and colour both identify the class, so a few minutes of CPU training suffice
SYNTHETIC_CLASSES: Tuple[Tuple[str, str, Tuple[int, int, int]], ...] = (
    ("red_square", "square", (220, 40, 40)),
    ("green_disc", "disc", (40, 200, 60)),
    ("blue_triangle", "triangle", (40, 80, 230)),
    ("yellow_disc", "disc", (230, 210, 40)),
    ("magenta_square", "square", (210, 50, 210)),
    ("cyan_triangle", "triangle", (40, 210, 210)),
)


@dataclass
class SyntheticObject:
    label: int  # index into SYNTHETIC_CLASSES
    mask: np.ndarray  # (H, W) bool, the visible pixels
    box: Tuple[int, int, int, int]  # XYXY, tight around ``mask``, exclusive right/bottom (COCO pixel boxes)


def synthetic_scene(rng: np.random.Generator, size: int = 128, num_classes: int = 3, max_objects: int = 3,
                    min_frac: float = 0.2, max_frac: float = 0.45) -> Tuple[np.ndarray, List[SyntheticObject]]:
    """One image (H, W, 3) uint8 of coloured shapes on a noisy background, with its non-overlapping objects.

    Object sides are ``min_frac``..``max_frac`` of ``size``; colours are jittered so the task is not a lookup.
    """
    if not 1 <= num_classes <= len(SYNTHETIC_CLASSES):
        raise ValueError(f"num_classes={num_classes}: the synthetic set has 1..{len(SYNTHETIC_CLASSES)} classes")
    base = rng.integers(60, 180, size=3)
    grad = np.linspace(-30, 30, size)[None, :, None] * rng.uniform(-1, 1)
    img = np.clip(base[None, None, :] + grad + rng.normal(0, 12, (size, size, 3)), 0, 255)
    objects: List[SyntheticObject] = []
    taken = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            side = int(rng.integers(int(min_frac * size), int(max_frac * size) + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not taken[max(0, y0 - 2):y0 + side + 2, max(0, x0 - 2):x0 + side + 2].any():
                break
        else:
            continue
        label = int(rng.integers(0, num_classes))
        _, shape, colour = SYNTHETIC_CLASSES[label]
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        x1, y1 = x0 + side - 1, y0 + side - 1
        if shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=1)
        elif shape == "disc":
            draw.ellipse([x0, y0, x1, y1], fill=1)
        else:
            draw.polygon([(x0 + side / 2, y0), (x0, y1), (x1, y1)], fill=1)
        mask = np.asarray(canvas).astype(bool)
        ys, xs = np.nonzero(mask)
        colour_j = np.clip(np.asarray(colour) + rng.integers(-25, 26, size=3), 0, 255)
        img[mask] = colour_j + rng.normal(0, 6, (int(mask.sum()), 3))
        taken |= mask
        objects.append(SyntheticObject(label, mask, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def write_synthetic_coco(root: PathLike, num_images: int = 200, size: int = 128, num_classes: int = 3,
                         seed: int = 0, split: str = "train", max_objects: int = 3) -> Path:
    """Write a COCO-format detection set: ``root/images/<split>/*.png`` and ``root/annotations/instances_<split>.json``
    (boxes, areas, RLE masks). Returns the JSON path."""
    # optional: pip install 'cpubone[downstream]'
    from pycocotools import mask as mask_utils

    root = Path(root)
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        img, objects = synthetic_scene(rng, size, num_classes, max_objects)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for o in objects:
            rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = o.box
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": o.label + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(o.mask.sum()), "iscrowd": 0,
                         "segmentation": rle})
    data = {"info": {"description": f"cpubone synthetic shapes ({split})"}, "images": images,
            "annotations": anns,
            "categories": [{"id": k + 1, "name": SYNTHETIC_CLASSES[k][0], "supercategory": "shape"}
                           for k in range(num_classes)]}
    path = root / "annotations" / f"instances_{split}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


def write_synthetic_ade(root: PathLike, num_images: int = 200, size: int = 128, num_classes: int = 3,
                        seed: int = 0, split: str = "training", max_objects: int = 3) -> Path:
    """Write an ADE20K-format segmentation set: ``root/images/<split>/*.png`` and index masks
    ``root/annotations/<split>/*.png`` with 0 = background, k+1 = synthetic class k. Returns ``root``.

    Train with ``num_classes + 1`` classes (background counted) or with ``reduce_zero_label`` and
    ``num_classes`` (background ignored, ADE20K's convention)."""
    root = Path(root)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        img, objects = synthetic_scene(rng, size, num_classes, max_objects)
        mask = np.zeros((size, size), np.uint8)
        for o in objects:
            mask[o.mask] = o.label + 1
        Image.fromarray(img).save(img_dir / f"{i:06d}.png")
        Image.fromarray(mask).save(ann_dir / f"{i:06d}.png")
    (root / "classes.json").write_text(json.dumps(["background"] + [c[0] for c in SYNTHETIC_CLASSES[:num_classes]]))
    return root
