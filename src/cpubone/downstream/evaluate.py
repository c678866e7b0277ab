"""Evaluation shared by the downstream training tasks and the API: COCO box metrics, segmentation metrics,
the COCO split layout, and the data loader both use.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .datasets import AnnotationError, CocoDetection, SegmentationFolder, collate_skip
from .metrics import ConfusionMatrix, coco_detection_metrics, detections_to_coco

__all__ = ["coco_split", "evaluate_detection", "evaluate_segmentation", "segment_image", "data_loader"]

PathLike = Union[str, os.PathLike]


def data_loader(ds, batch_size: int, shuffle: bool, workers: int, seed: int, drop_last: bool = False):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       collate_fn=collate_skip, generator=g, drop_last=drop_last,
                                       persistent_workers=False)


def coco_split(root: PathLike, split: str) -> Tuple[Path, Path]:
    """(image folder, instances JSON) of a COCO-layout split: ``root/images/<split>`` (or ``root/<split>``, as
    COCO ships ``train2017/``) and ``root/annotations/instances_<split>.json``."""
    root = Path(root)
    ann = root / "annotations" / f"instances_{split}.json"
    images = root / "images" / split
    if not images.is_dir():
        images = root / split
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann} (COCO layout: annotations/instances_<split>.json)")
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {root / 'images' / split} or {root / split}")
    return images, ann


@torch.no_grad()
def evaluate_detection(model: nn.Module, dataset: CocoDetection, batch_size: int = 4,
                       workers: int = 0) -> Dict[str, Any]:
    """COCO box metrics of ``model`` on ``dataset`` (AP, AP50, AP75, APs, APm, APl, per-class AP keyed by
    category name) plus the skipped-image count.

    Unreadable images are left out of the evaluation (and counted), not scored as misses.
    """
    was_training = model.training
    model.eval()
    results: List[Dict[str, Any]] = []
    seen: List[int] = []
    skipped = 0
    for images, targets, n_skip in data_loader(dataset, batch_size, False, workers, 0):
        skipped += n_skip
        if not images:
            continue
        for det, t in zip(model(images), targets):
            img_id = int(t["image_id"])
            seen.append(img_id)
            results += detections_to_coco(img_id, det["boxes"], det["scores"], det["labels"], dataset.cat_ids)
    model.train(was_training)
    if not seen:
        raise AnnotationError(f"{dataset.ann_file}: no readable images to evaluate ({skipped} skipped)")
    return {**coco_detection_metrics(dataset.coco, results, image_ids=seen), "images": len(seen),
            "skipped_images": skipped}



def _resize_short(x: torch.Tensor, base_size: Optional[int]) -> torch.Tensor:
    if not base_size:
        return x
    h, w = x.shape[-2:]
    s = base_size / min(h, w)
    if s == 1:
        return x
    return F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                         align_corners=False, antialias=s < 1)


@torch.no_grad()
def segment_image(model: nn.Module, image: torch.Tensor, base_size: Optional[int] = None) -> torch.Tensor:
    """Label map (H, W) of one float image (3, H, W) in [0, 1]: run at shorter side ``base_size``, logits
    resized back to the image's own size (mmseg's 'whole' inference)."""
    logits = model(_resize_short(image[None], base_size))
    logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits[0].argmax(0)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: SegmentationFolder,
                          base_size: Optional[int] = None) -> Dict[str, Any]:
    """mIoU, aAcc, mAcc and per-class IoU ({class name: IoU}) of ``model`` on ``dataset`` against the
    original-size masks."""
    if dataset.transforms is not None:
        raise ValueError("evaluate_segmentation needs a dataset without transforms (it compares at the original size)")
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, classes=getattr(dataset, "classes", None))
    skipped = 0
    for i in range(len(dataset)):
        item = dataset[i]
        if item is None:
            skipped += 1
            continue
        image, mask = item
        cm.update(segment_image(model, image.float() / 255, base_size), mask)
    model.train(was_training)
    return {**cm.compute(), "images": len(dataset) - skipped, "skipped_images": skipped}
