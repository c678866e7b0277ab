"""Detection metrics (COCO AP via pycocotools' ``COCOeval``) and segmentation metrics (confusion matrix)."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["COCO_STATS", "coco_detection_metrics", "detections_to_coco", "ConfusionMatrix"]

# the first six numbers of COCOeval.stats, in its order
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                       cat_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """One image's detections (XYXY boxes, contiguous labels) as COCO result entries (``[x, y, w, h]``)."""
    out = []
    for b, s, l in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        out.append({"image_id": int(image_id), "category_id": int(cat_ids[int(l)]),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    return out


def coco_detection_metrics(coco_gt, results: List[Dict[str, Any]],
                           image_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """COCO box AP, AP50, AP75, APs, APm, APl of ``results`` against the ``pycocotools.coco.COCO`` ground truth,
    and ``per_class_AP``: {category name: AP} (IoU 0.50:0.95, all areas, as in detectron2's per-category table).

    Args:
        results: COCO result entries (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``).
        image_ids: evaluate only these images (default: all images of ``coco_gt``).

    Values are in [0, 1]; an area range without any ground-truth object gives -1 (pycocotools' convention),
    a category without any ground-truth object NaN. No detections at all gives 0 wherever there are objects.
    """
    # optional: pip install 'cpubone[downstream]'
    from pycocotools.cocoeval import COCOeval

    ids = list(image_ids) if image_ids is not None else sorted(coco_gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = coco_gt.loadRes(copy.deepcopy(results))  # loadRes adds keys to the entries
        else:
            # optional: pip install 'cpubone[downstream]'
            from pycocotools.coco import COCO

            dt = COCO()
            dt.dataset = {"images": copy.deepcopy(coco_gt.dataset["images"]), "annotations": [],
                          "categories": copy.deepcopy(coco_gt.dataset["categories"])}
            dt.createIndex()
        ev = COCOeval(coco_gt, dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: Dict[str, Any] = {k: float(v) for k, v in zip(COCO_STATS, ev.stats[:6])}
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections]; -1 = no ground truth
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        per_class[coco_gt.cats[cat_id]["name"]] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    out["per_class_AP"] = per_class
    return out


class ConfusionMatrix:
    """Pixel confusion matrix over ``num_classes`` (rows: ground truth, columns: prediction).

    Pixels whose ground truth is ``ignore_index`` are not counted. ``compute()`` gives mmseg's metrics:
    per-class IoU = TP / (TP + FP + FN) as ``IoU`` = {class name: IoU} (NaN for a class absent from both
    ground truth and prediction), mIoU = mean over the classes that have an IoU, aAcc = pixel accuracy,
    mAcc = mean per-class recall. ``classes`` names the classes (default "0", "1", ...).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, classes: Optional[Sequence[str]] = None) -> None:
        if classes is not None and (len(classes) != num_classes or len(set(classes)) != num_classes):
            raise ValueError(f"classes: need {num_classes} distinct names, got {list(classes)[:10]}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.classes: List[str] = list(classes) if classes is not None else [str(k) for k in range(num_classes)]
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add label maps ``pred`` and ``target`` of the same shape (any batch layout)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target labels outside 0..{self.num_classes - 1}: "
                             f"{torch.unique(target[(target < 0) | (target >= self.num_classes)]).tolist()[:10]}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted labels outside 0..{self.num_classes - 1}")
        self.mat += torch.bincount(target * self.num_classes + pred, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)

    def compute(self) -> Dict[str, Any]:
        m = self.mat.double()
        tp = m.diag()
        gt = m.sum(1)
        union = gt + m.sum(0) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = m.sum()
        return {
            "mIoU": float(np.nanmean(iou.numpy())) if (union > 0).any() else float("nan"),
            "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mAcc": float(np.nanmean(acc.numpy())) if (gt > 0).any() else float("nan"),
            "IoU": dict(zip(self.classes, iou.tolist())),
        }
