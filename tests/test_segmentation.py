"""Semantic FPN on CPUBone: ADE20K-format data (round trip, label reduction, malformed masks), mIoU on known
predictions, the model (any size, ONNX parity), learning on synthetic shapes, and ``cpubone segment``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpubone.cli import main
from cpubone.downstream.datasets import (AnnotationError, SegmentationFolder, segmentation_transforms,
                                         synthetic_scene, write_synthetic_ade)
from cpubone.downstream.api import SegmentationTrainConfig, evaluate_segmentation, train_segmentation
from cpubone.downstream.metrics import ConfusionMatrix
from cpubone.downstream.segmentation import create_semantic_fpn


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ade")
    write_synthetic_ade(root, 16, size=64, num_classes=3, seed=0, split="training")
    write_synthetic_ade(root, 4, size=64, num_classes=3, seed=1, split="validation")
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ade"
    shutil.copytree(root, dst)
    return dst


# --- data ----------------------------------------------------------------------------------------
def test_synthetic_ade_round_trip(ade_root):
    ds = SegmentationFolder(ade_root, "training", num_classes=4)
    rng = np.random.default_rng(0)
    for i in range(len(ds)):
        img, objects = synthetic_scene(rng, 64, 3, 3)
        expect = np.zeros((64, 64), np.int64)
        for o in objects:
            expect[o.mask] = o.label + 1
        image, mask = ds[i]
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(img))
        assert torch.equal(mask, torch.from_numpy(expect))


def test_reduce_zero_label(ade_root, tmp_path):
    root = _copy(ade_root, tmp_path)
    path = root / "annotations" / "training" / "000000.png"
    Image.fromarray(np.array([[0, 1, 2, 3], [255, 3, 2, 1]], np.uint8)).save(path)
    Image.new("RGB", (4, 2)).save(root / "images" / "training" / "000000.png")
    mask = SegmentationFolder(root, "training", num_classes=3, reduce_zero_label=True).read_mask(0)
    assert mask.tolist() == [[255, 0, 1, 2], [255, 2, 1, 0]]


def test_mask_values_out_of_range_are_named(ade_root, tmp_path):
    root = _copy(ade_root, tmp_path)
    path = root / "annotations" / "training" / "000005.png"
    m = np.asarray(Image.open(path)).copy()
    m[0, :3] = [7, 9, 255]  # 255 is the ignore index and allowed
    Image.fromarray(m).save(path)
    ds = SegmentationFolder(root, "training", num_classes=4)
    with pytest.raises(AnnotationError, match=r"000005\.png: mask values \[7, 9\] outside 0..3"):
        ds[5]
    ds[4]  # the other files are fine


def test_missing_files_and_size_mismatch_are_named(ade_root, tmp_path):
    root = _copy(ade_root, tmp_path)
    (root / "annotations" / "training" / "000002.png").unlink()
    with pytest.raises(AnnotationError, match="no mask PNG for 1 image.*000002.png"):
        SegmentationFolder(root, "training", num_classes=4)
    Image.new("L", (64, 64)).save(root / "annotations" / "training" / "000002.png")
    (root / "images" / "training" / "000003.png").unlink()
    with pytest.raises(AnnotationError, match="no image for 1 mask.*000003.png"):
        SegmentationFolder(root, "training", num_classes=4)
    Image.new("RGB", (32, 64)).save(root / "images" / "training" / "000003.png")
    with pytest.raises(AnnotationError, match="000003.png: mask is 64x64 but image 000003.png is 32x64"):
        SegmentationFolder(root, "training", num_classes=4)[3]
    with pytest.raises(FileNotFoundError, match="images/nosplit"):
        SegmentationFolder(root, "nosplit", num_classes=4)


def test_train_transforms_keep_mask_aligned(ade_root):
    ds = SegmentationFolder(ade_root, "training", num_classes=4,
                            transforms=segmentation_transforms(True, crop_size=80, base_size=64, photometric=False))
    torch.manual_seed(0)
    for i in range(4):
        image, mask = ds[i]
        assert image.shape == (3, 80, 80) and mask.shape == (80, 80) and mask.dtype == torch.int64
        pad = image.sum(0) == 0
        assert (mask[pad] == 255).all()  # padding is ignored, not background
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 255}


# --- metrics -------------------------------------------------------------------------------------
def test_confusion_matrix_hand_computed():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 255], [1, 1, 255]])
    pred = torch.tensor([[0, 1, 2], [1, 1, 0]])  # predictions on ignored pixels do not count
    cm.update(pred, target)
    m = cm.compute()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 absent from both -> no IoU
    iou = list(m["IoU"].values())
    assert iou[:2] == pytest.approx([0.5, 2 / 3]) and np.isnan(iou[2])
    assert m["mIoU"] == pytest.approx(7 / 12)
    assert m["aAcc"] == pytest.approx(3 / 4) and m["mAcc"] == pytest.approx(0.75)
    cm.update(target.clamp(max=1), target.clamp(max=1))  # accumulates
    assert cm.mat.sum() == 4 + 6


def test_confusion_matrix_matches_sklearn():
    from sklearn.metrics import jaccard_score

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 20, 20), generator=g)
    pred = torch.where(torch.rand(3, 20, 20, generator=g) < 0.6, target, torch.randint(0, 5, (3, 20, 20), generator=g))
    cm = ConfusionMatrix(5)
    cm.update(pred, target)
    ref = jaccard_score(target.flatten().numpy(), pred.flatten().numpy(), average=None, labels=list(range(5)))
    assert list(cm.compute()["IoU"].values()) == pytest.approx(ref.tolist())


def test_perfect_model_gets_miou_one(ade_root):
    class Oracle(torch.nn.Module):
        """Returns one-hot logits of the true mask of whichever image it is given."""

        def __init__(self, ds):
            super().__init__()
            self.lookup = {ds[i][0].float().div(255).sum().item(): ds[i][1] for i in range(len(ds))}

        def forward(self, x):
            return torch.nn.functional.one_hot(self.lookup[x[0].sum().item()], 4).permute(2, 0, 1)[None].float()

    ds = SegmentationFolder(ade_root, "validation", num_classes=4)
    m = evaluate_segmentation(Oracle(ds), ds)
    assert m["mIoU"] == 1.0 and m["aAcc"] == 1.0 and m["images"] == 4


# --- model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["cpubone_nano", "mobilenetv3_small_050"])
def test_semantic_fpn_any_size(backbone):
    model = create_semantic_fpn(backbone, num_classes=5, fpn_channels=32, channels=32).eval()
    assert model.backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        for h, w in ((64, 64), (70, 90)):
            assert model(torch.rand(1, 3, h, w)).shape == (1, 5, h, w)


def test_semantic_fpn_onnx_matches_eager(tmp_path):
    from cpubone.engines.onnxruntime import ort_session
    from cpubone.engines.onnx_export import export_onnx

    model = create_semantic_fpn("cpubone_nano", num_classes=5, fpn_channels=32, channels=32).eval()
    path = export_onnx(model, tmp_path / "seg.onnx", input_size=(64, 64))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-3


def test_training_lowers_the_loss_and_raises_miou(ade_root, tmp_path):
    cfg = SegmentationTrainConfig(data=str(ade_root), output=str(tmp_path / "run"), num_classes=4,
                                  reduce_zero_label=False, backbone="cpubone_nano", val_split="training",
                                  fpn_channels=32, head_channels=32, iters=120, batch_size=8, crop_size=64,
                                  base_size=64, lr=3e-3, workers=0, eval_every=40, log_every=0)
    res = train_segmentation(cfg, log=lambda s: None)
    hist = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["global_step"] for h in hist] == [40, 80, 120]
    assert hist[-1]["train_loss"] < 0.6 * hist[0]["train_loss"]
    untrained = create_semantic_fpn("cpubone_nano", 4, fpn_channels=32, channels=32)
    base = evaluate_segmentation(untrained, SegmentationFolder(ade_root, "training", 4), base_size=64)["mIoU"]
    assert res["mIoU"] > base + 0.2
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["global_step"] == 120 and json.loads(state["config"])["task"] == "segment"


# --- command line --------------------------------------------------------------------------------
def test_cli_synthetic_train_eval_predict(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["segment", "make-synthetic", str(data), "--train-images", "4", "--val-images", "2", "--size", "64"]) == 0
    assert json.loads((data / "classes.json").read_text())[0] == "background"
    assert main(["segment", "train", "--data", str(data), "--output", str(run), "--backbone", "cpubone_nano",
                 "--num-classes", "4", "--no-reduce-zero-label", "--iters", "2", "--batch-size", "2",
                 "--crop-size", "64", "--base-size", "64", "--fpn-channels", "32", "--head-channels", "32",
                 "--workers", "0", "--eval-every", "2"]) == 0
    capsys.readouterr()
    assert main(["segment", "eval", str(run / "model.pt"), "--data", str(data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2 and list(metrics["IoU"])[0] == "background" and len(metrics["IoU"]) == 4
    png = tmp_path / "overlay.png"
    assert main(["segment", "predict", str(run / "model.pt"), str(data / "images" / "validation" / "000000.png"),
                 "--output", str(png), "--json"]) == 0
    shares = json.loads(capsys.readouterr().out)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    with Image.open(png) as im:  # enlarged 6x for legible labels, with the legend beside it
        assert im.format == "PNG" and im.size[1] == 384 and im.size[0] > 384


def test_cli_rejects_wrong_task_and_bad_data(tmp_path, capsys):
    assert main(["segment", "eval", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    assert main(["segment", "predict", str(bad), str(bad), "--output", str(tmp_path / "x.png")]) == 2
    assert "holds bare weights" in capsys.readouterr().err
