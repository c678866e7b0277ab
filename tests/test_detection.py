"""RetinaNet on CPUBone: COCO data (round trip, malformed input), COCO AP on known predictions, the model,
learning on synthetic shapes, and the ``cpubone detect`` commands."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpubone.cli import main
from cpubone.downstream.datasets import (AnnotationError, CocoDetection, detection_transforms, synthetic_scene,
                                         write_synthetic_coco)
from cpubone.downstream.detection import RetinaNetRaw, create_retinanet, retinanet_anchor_generator
from cpubone.downstream.api import DetectionTrainConfig, evaluate_detection, train_detection
from cpubone.downstream.metrics import coco_detection_metrics


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_synthetic_coco(root, 12, size=96, num_classes=3, seed=0, split="train")
    write_synthetic_coco(root, 6, size=96, num_classes=3, seed=1, split="val")
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "coco"
    shutil.copytree(root, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


# --- data ----------------------------------------------------------------------------------------
def test_synthetic_coco_round_trip(coco_root):
    """Reading the written set back gives the generator's own images, boxes and labels."""
    ds = CocoDetection(coco_root / "images" / "train", coco_root / "annotations" / "instances_train.json")
    rng = np.random.default_rng(0)  # write_synthetic_coco(seed=0) draws scenes from this generator in order
    assert len(ds) == 12 and ds.classes == ["red_square", "green_disc", "blue_triangle"]
    for i in range(len(ds)):
        img, objects = synthetic_scene(rng, 96, 3, 3)
        image, target = ds[i]
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(img))
        assert target["boxes"].tolist() == [list(map(float, o.box)) for o in objects]
        assert target["labels"].tolist() == [o.label for o in objects]
        for o, b in zip(objects, target["boxes"]):  # boxes are tight around the drawn shapes
            ys, xs = np.nonzero(o.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(int(v) for v in b)


def test_transforms_move_boxes_with_the_image(coco_root):
    from torchvision.transforms import v2

    ds = CocoDetection(coco_root / "images" / "train", coco_root / "annotations" / "instances_train.json",
                       transforms=v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)]))
    plain = ds.target(0)["boxes"]
    image, t = ds[0]
    w = image.shape[-1]
    assert torch.allclose(t["boxes"][:, [0, 2]], w - plain[:, [2, 0]])
    assert image.dtype == torch.float32 and image.max() <= 1.0


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][0].update(bbox=[10, 10, -5, 20]), "non-positive width"),
    (lambda d: d["annotations"][0].update(bbox=[90, 10, 30, 20]), "outside the 96x96 image"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "4 finite numbers"),
    (lambda d: d["annotations"][0].update(category_id=77), "category_id 77 is not declared"),
    (lambda d: d["annotations"][0].update(image_id=999), "image_id 999"),
    (lambda d: d.pop("categories"), "missing top-level key 'categories'"),
])
def test_malformed_annotations_are_named(coco_root, tmp_path, edit, message):
    root = _copy(coco_root, tmp_path)
    ann = root / "annotations" / "instances_train.json"
    _edit_json(ann, edit)
    with pytest.raises(AnnotationError, match=message) as e:
        CocoDetection(root / "images" / "train", ann)
    assert "instances_train.json" in str(e.value)
    if "annotation id" in str(e.value) and "image_id" not in message:
        assert "annotation id 1" in str(e.value) and "000000.png" in str(e.value)


def test_missing_image_file_is_named(coco_root, tmp_path):
    root = _copy(coco_root, tmp_path)
    (root / "images" / "train" / "000003.png").unlink()
    with pytest.raises(AnnotationError, match="1 image file.*000003.png"):
        CocoDetection(root / "images" / "train", root / "annotations" / "instances_train.json")


def test_unreadable_image_is_skipped_and_counted(coco_root, tmp_path):
    root = _copy(coco_root, tmp_path)
    (root / "images" / "val" / "000002.png").write_bytes(b"not a png")
    ds = CocoDetection(root / "images" / "val", root / "annotations" / "instances_val.json",
                       transforms=detection_transforms(train=False))
    with pytest.warns(UserWarning, match="000002.png"):
        assert ds[2] is None
    model = create_retinanet("cpubone_nano", 3, fpn_channels=64, min_size=96, max_size=96)
    with pytest.warns(UserWarning):
        res = evaluate_detection(model, ds, batch_size=3)
    assert res["skipped_images"] == 1 and res["images"] == 5


# --- metrics -------------------------------------------------------------------------------------
def _gt(boxes_per_image, size=200):
    from pycocotools.coco import COCO

    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image, 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        for (x, y, w, h, c) in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    coco.createIndex()
    return coco


def test_perfect_detections_give_ap_one():
    boxes = [[(10, 10, 20, 20, 1), (50, 50, 60, 60, 2)], [(5, 5, 150, 150, 1)]]
    coco = _gt(boxes)
    results = [{"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": 0.9}
               for i, bs in enumerate(boxes, 1) for (x, y, w, h, c) in bs]
    m = coco_detection_metrics(coco, results)
    assert m.pop("per_class_AP") == pytest.approx({"a": 1.0, "b": 1.0})  # keyed by category name
    assert m == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "APs": 1.0, "APm": 1.0, "APl": 1.0})


def test_partial_detections_give_hand_computed_ap():
    """Two objects, one found (score 0.9) and one false positive (0.8): precision 1 up to recall 0.5, no
    higher recall. COCO's 101-point AP is then 51/101 (recall points 0.00..0.50) at every IoU threshold."""
    coco = _gt([[(10, 10, 40, 40, 1), (100, 100, 40, 40, 1)]])
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [60, 150, 30, 30], "score": 0.8}]
    m = coco_detection_metrics(coco, results)
    assert m["AP"] == pytest.approx(51 / 101) and m["AP50"] == pytest.approx(51 / 101)
    # per class: category "a" holds both objects; "b" has no ground truth, so no AP
    assert m["per_class_AP"]["a"] == pytest.approx(51 / 101) and np.isnan(m["per_class_AP"]["b"])
    assert m["APs"] == -1.0 and m["APl"] == -1.0  # no objects in those size ranges (pycocotools' -1)
    # a box shifted to IoU 0.6 counts at AP50 but not at AP75
    shifted = [{"image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 40], "score": 0.9}]
    iou = (30 * 40) / (40 * 40 * 2 - 30 * 40)
    assert 0.5 < iou < 0.75
    m = coco_detection_metrics(coco, shifted)
    assert m["AP50"] == pytest.approx(51 / 101) and m["AP75"] == 0.0


def test_no_detections_give_zero_ap():
    m = coco_detection_metrics(_gt([[(10, 10, 40, 40, 1)]]), [])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0


# --- model ---------------------------------------------------------------------------------------
def test_anchors_cover_five_levels():
    gen = retinanet_anchor_generator()
    assert gen.num_anchors_per_location() == [9] * 5
    assert [round(s[0]) for s in gen.sizes] == [32, 64, 128, 256, 512]


def test_backbone_levels_are_chosen_by_stride():
    from cpubone.downstream.backbone import create_feature_backbone

    mnv3 = create_feature_backbone("mobilenetv3_small_050", strides=(8, 16, 32))  # its index 0 is stride 2
    assert mnv3.feature_info.reduction() == [8, 16, 32] and len(mnv3(torch.rand(1, 3, 64, 64))) == 3
    with pytest.raises(ValueError, match=r"strides \[2\] are not available"):
        create_feature_backbone("cpubone_nano", strides=(2, 4))


@pytest.mark.parametrize("backbone", ["cpubone_nano", "mobilenetv3_small_050"])
def test_retinanet_levels_and_outputs(backbone):
    model = create_retinanet(backbone, num_classes=3, fpn_channels=32, min_size=96, max_size=96).eval()
    feats = model.backbone(torch.rand(1, 3, 96, 96))
    assert list(feats) == ["p3", "p4", "p5", "p6", "p7"]
    assert [f.shape[-1] for f in feats.values()] == [12, 6, 3, 2, 1]  # strides 8..128
    raw = RetinaNetRaw(model)(torch.rand(1, 3, 96, 96))
    assert raw.shape == (1, 9 * (144 + 36 + 9 + 4 + 1), 3 + 4)
    with torch.no_grad():
        out = model([torch.rand(3, 96, 80)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_training_lowers_the_loss_and_raises_ap(tmp_path):
    """A short overfit on 8 images: the loss falls clearly and AP50 on those images beats the untrained model."""
    write_synthetic_coco(tmp_path / "data", 8, size=128, num_classes=3, seed=0, split="train")
    cfg = DetectionTrainConfig(data=str(tmp_path / "data"), output=str(tmp_path / "run"), backbone="cpubone_nano",
                               val_split="train", fpn_channels=64, epochs=80, batch_size=8, lr=1e-3,
                               warmup_iters=3, grad_clip=10.0, min_size=128, max_size=128, workers=0, eval_every=80,
                               log_every=0)
    res = train_detection(cfg, log=lambda s: None)
    hist = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 80
    assert np.mean([h["train_loss"] for h in hist[-3:]]) < 0.5 * hist[0]["train_loss"]
    torch.manual_seed(0)
    untrained = create_retinanet("cpubone_nano", 3, fpn_channels=64, min_size=128, max_size=128)
    ds = CocoDetection(tmp_path / "data" / "images" / "train", tmp_path / "data" / "annotations" / "instances_train.json",
                       transforms=detection_transforms(train=False))
    base = evaluate_detection(untrained, ds)["AP50"]
    assert res["AP50"] > base + 0.25
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 80 and json.loads(state["config"])["task"] == "detect" and state["task"] == "detect"


# --- command line --------------------------------------------------------------------------------
def test_cli_synthetic_train_eval_predict(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["detect", "make-synthetic", str(data), "--train-images", "4", "--val-images", "2", "--size", "64"]) == 0
    assert (data / "annotations" / "instances_val.json").is_file()
    assert main(["detect", "train", "--data", str(data), "--output", str(run), "--backbone", "cpubone_nano",
                 "--epochs", "1", "--batch-size", "2", "--fpn-channels", "32", "--min-size", "64", "--max-size", "64",
                 "--workers", "0", "--json"]) == 0
    train_out = capsys.readouterr().out
    assert "RetinaNet on cpubone_nano: 4 training images, 3 classes" in train_out
    assert (run / "last.pt").is_file() and (run / "model.pt").is_file()
    assert main(["detect", "eval", str(run / "model.pt"), "--data", str(data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2 and 0.0 <= metrics["AP50"] <= 1.0
    png = tmp_path / "pred.png"
    assert main(["detect", "predict", str(run / "model.pt"), str(data / "images" / "val" / "000000.png"),
                 "--output", str(png), "--score-thresh", "0.0", "--json"]) == 0
    dets = json.loads(capsys.readouterr().out)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (384, 384)  # enlarged 6x so the labels are legible
        drawn = np.asarray(im)
    original = np.asarray(Image.open(data / "images" / "val" / "000000.png")).repeat(6, 0).repeat(6, 1)
    assert len(dets) > 0 and (drawn != original).any()  # boxes were drawn on the image


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["detect", "eval", str(tmp_path / "nope.pt"), "--data", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["detect", "train", "--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "instances_train.json" in capsys.readouterr().err


def test_resume_continues_the_schedule(coco_root, tmp_path):
    """Resuming from last.pt restores weights, optimizer, scheduler and progress: 2 + 1 epochs = 3 epochs."""
    common = dict(data=str(coco_root), output=str(tmp_path / "run"), backbone="cpubone_nano", val_split=None,
                  fpn_channels=32, batch_size=6, lr=1e-3, warmup_iters=1, min_size=96, max_size=96, workers=0,
                  log_every=0)
    train_detection(DetectionTrainConfig(epochs=2, **common), log=lambda s: None)
    first = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert first["epoch"] == 2 and first["global_step"] == 4
    logs = []
    train_detection(DetectionTrainConfig(epochs=3, resume=str(tmp_path / "run" / "last.pt"), **common), log=logs.append)
    assert "resumed from" in logs[0] and "epoch 3, step 0/2 of the epoch, global step 4" in logs[0]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and state["global_step"] == 6
    assert [h["epoch"] for h in json.loads(state["history"])] == [1, 2, 3]
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]  # atomic writes leave no temp files
