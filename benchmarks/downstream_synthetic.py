"""Proof that detection and segmentation learn: train on synthetic shapes (written in the real COCO / ADE20K
formats) for a few CPU minutes, then report COCO AP and mIoU on held-out images next to the untrained model.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/downstream_synthetic.py --out runs/downstream_proof
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/downstream_synthetic.py --quick   # a short smoke run
    ... --pictures docs/figures   # also draw a held-out image per task (the pictures in docs/downstream.md)

The goal (issue 6): AP50 >= 0.5 and mIoU >= 0.5 on the held-out synthetic images. The backbone starts from
random weights (no pretrained weights are used), so the runs use small schedules of their own instead of the
paper's presets; every setting is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpubone.cli._render import print_table
from cpubone.downstream.bench import machine_name
from cpubone.downstream.datasets import CocoDetection, SegmentationFolder, detection_transforms, write_synthetic_ade, write_synthetic_coco
from cpubone.downstream.detection import create_retinanet
from cpubone.downstream.api import (DetectionTrainConfig, SegmentationTrainConfig, evaluate_detection,
                                       evaluate_segmentation, predict_detection, predict_segmentation,
                                       train_detection, train_segmentation)
from cpubone.downstream.segmentation import create_semantic_fpn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cpubone_downstream_proof")
    p.add_argument("--backbone", default="cpubone_nano")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--val-images", type=int, default=50)
    p.add_argument("--det-epochs", type=int, default=12)
    p.add_argument("--seg-iters", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny schedule: checks the script runs, not the goal")
    p.add_argument("--tasks", nargs="+", default=["detect", "segment"], choices=["detect", "segment"])
    p.add_argument("--pictures", type=Path, help="draw held-out image 000000 with each trained model into this "
                                                 "folder (detect_predict.png, segment_predict.png)")
    a = p.parse_args(argv)
    if a.quick:
        a.train_images, a.val_images, a.det_epochs, a.seg_iters = 16, 8, 1, 5
    torch.set_num_threads(a.threads)
    rows = []
    if "detect" in a.tasks:
        root = a.out / "coco"
        write_synthetic_coco(root, a.train_images, a.size, 3, seed=0, split="train")
        write_synthetic_coco(root, a.val_images, a.size, 3, seed=1, split="val")
        cfg = DetectionTrainConfig(data=str(root), output=str(a.out / "det_run"), backbone=a.backbone,
                                   fpn_channels=128, grad_clip=10.0, epochs=a.det_epochs,
                                   batch_size=8, lr=1e-3, warmup_iters=20, min_size=a.size, max_size=a.size,
                                   workers=0, eval_every=max(1, a.det_epochs // 4), log_every=0)
        print("detection:", {k: v for k, v in vars(cfg).items() if v is not None})
        val = CocoDetection(root / "images" / "val", root / "annotations" / "instances_val.json",
                            transforms=detection_transforms(train=False))
        torch.manual_seed(0)
        before = evaluate_detection(create_retinanet(a.backbone, 3, fpn_channels=128,
                                                     min_size=a.size, max_size=a.size), val)
        t0 = time.time()
        after = train_detection(cfg)
        minutes = (time.time() - t0) / 60
        if a.pictures:
            print(predict_detection(after["checkpoint"], root / "images" / "val" / "000000.png",
                                    a.pictures / "detect_predict.png", score_thresh=0.3))
        rows.append({"task": "RetinaNet", "metric": "AP50", "untrained": before["AP50"], "trained": after["AP50"],
                     "AP": after["AP"], "AP75": after["AP75"], "train_min": minutes,
                     "goal_met": after["AP50"] >= 0.5})
    if "segment" in a.tasks:
        root = a.out / "ade"
        write_synthetic_ade(root, a.train_images, a.size, 3, seed=0, split="training")
        write_synthetic_ade(root, a.val_images, a.size, 3, seed=1, split="validation")
        cfg = SegmentationTrainConfig(data=str(root), output=str(a.out / "seg_run"), num_classes=4,
                                      reduce_zero_label=False, backbone=a.backbone, fpn_channels=64,
                                      head_channels=64, iters=a.seg_iters, batch_size=8, crop_size=a.size,
                                      base_size=a.size, lr=2e-3, warmup_iters=10, workers=0,
                                      eval_every=max(1, a.seg_iters // 4), log_every=0)
        print("segmentation:", {k: v for k, v in vars(cfg).items() if v is not None})
        val = SegmentationFolder(root, "validation", 4)
        torch.manual_seed(0)
        before = evaluate_segmentation(create_semantic_fpn(a.backbone, 4, fpn_channels=64, channels=64), val,
                                       base_size=a.size)
        t0 = time.time()
        after = train_segmentation(cfg)
        minutes = (time.time() - t0) / 60
        if a.pictures:
            print(predict_segmentation(after["checkpoint"], root / "images" / "validation" / "000000.png",
                                       a.pictures / "segment_predict.png"))
        rows.append({"task": "Semantic FPN", "metric": "mIoU", "untrained": before["mIoU"], "trained": after["mIoU"],
                     "AP": None, "AP75": None, "train_min": minutes, "goal_met": after["mIoU"] >= 0.5})
    print_table(rows, title=f"{a.backbone} on synthetic shapes ({a.train_images} train / {a.val_images} held-out "
                            f"images, {a.size}px, {a.threads} thread(s))")
    print(f"machine: {machine_name()}")
    (a.out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
