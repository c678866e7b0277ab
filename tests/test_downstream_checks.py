"""Detection/segmentation input checks: COCO ids, ADE20K masks checked when the dataset is opened, foreign
checkpoints named for what they are, and per-class results keyed by class name, each as one line on the
command line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpubone.cli import main
from cpubone.downstream.datasets import AnnotationError, CocoDetection, SegmentationFolder, write_synthetic_ade, \
    write_synthetic_coco
from cpubone.downstream.api import load_downstream_model
from cpubone.downstream.metrics import ConfusionMatrix
from cpubone.models.checkpoints import CheckpointError

DET_TRAIN = ["--backbone", "cpubone_nano", "--epochs", "1", "--batch-size", "2", "--fpn-channels", "32",
             "--min-size", "64", "--max-size", "64", "--workers", "0", "--log-every", "0"]
SEG_TRAIN = ["--backbone", "cpubone_nano", "--num-classes", "4", "--no-reduce-zero-label", "--iters", "2",
             "--batch-size", "2", "--crop-size", "64", "--base-size", "64", "--fpn-channels", "32",
             "--head-channels", "32", "--workers", "0", "--eval-every", "2", "--log-every", "0"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_synthetic_coco(root, 4, size=64, num_classes=3, seed=0, split="train")
    write_synthetic_coco(root, 2, size=64, num_classes=3, seed=1, split="val")
    return root


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ade")
    write_synthetic_ade(root, 4, size=64, num_classes=3, seed=0, split="training")
    write_synthetic_ade(root, 2, size=64, num_classes=3, seed=1, split="validation")
    return root


@pytest.fixture(scope="module")
def runs(coco, ade, tmp_path_factory):
    """A tiny detector and segmenter trained through the command line, and a classifier from cpubone train."""
    from cpubone.train.data import write_digits_imagefolder

    from conftest import subset_imagefolder

    out = tmp_path_factory.mktemp("runs")
    assert main(["detect", "train", "--data", str(coco), "--output", str(out / "det"), *DET_TRAIN]) == 0
    assert main(["segment", "train", "--data", str(ade), "--output", str(out / "seg"), *SEG_TRAIN]) == 0
    digits = subset_imagefolder(write_digits_imagefolder(out / "digits_full", size=24), out / "digits",
                                {"train": 2, "val": 1})
    assert main(["train", "--data", str(digits), "--model", "cpubone_nano", "--recipe", "digits",
                 "--img-size", "24", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--no-tensorboard", "--output", str(out / "cls")]) == 0
    return out


def _copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / root.name))


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- COCO ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"][2].update(id=d["images"][0]["id"]), r"duplicate image id 1 \(000000.png and 000002.png\)"),
    (lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]), "duplicate annotation id 1"),
    (lambda d: d["annotations"][0].pop("id"), r"annotation #0 \(image_id 1\) lacks 'id'"),
    (lambda d: d["categories"][1].update(name="red_square"), r"duplicate category name 'red_square' \(ids \[1, 2\]\)"),
    (lambda d: d["categories"].append(dict(d["categories"][0], name="x")), "duplicate category id 1"),
    (lambda d: d.update(images=[], annotations=[]), "'images' is empty"),
])
def test_coco_duplicates_are_named(coco, tmp_path, edit, message):
    root = _copy(coco, tmp_path)
    ann = root / "annotations" / "instances_train.json"
    _edit(ann, edit)
    with pytest.raises(AnnotationError, match=message) as e:
        CocoDetection(root / "images" / "train", ann)
    assert str(e.value).startswith(str(ann))


def test_coco_empty_annotation_list_warns_one_line(coco, runs, tmp_path, capsys):
    root = _copy(coco, tmp_path)
    ann = root / "annotations" / "instances_val.json"
    _edit(ann, lambda d: d.update(annotations=[]))
    with pytest.warns(UserWarning, match="'annotations' is empty"):
        ds = CocoDetection(root / "images" / "val", ann)
    assert len(ds) == 2 and ds.target(0)["boxes"].shape == (0, 4)  # the images stay usable
    assert main(["detect", "eval", str(runs / "det" / "model.pt"), "--data", str(root), "--json"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning:" in err[0] and "instances_val.json: 'annotations' is empty" in err[0]


# --- ADE20K masks ----------------------------------------------------------------------------------
def _mask(root: Path, name: str = "000001.png") -> Path:
    return root / "annotations" / "training" / name


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"\x89PNG not really"), "000001.png: not a readable mask image"),
    (lambda p: Image.new("RGB", (64, 64)).save(p), "000001.png: mask mode is RGB, expected a single-channel"),
    (lambda p: Image.new("LA", (64, 64)).save(p), "000001.png: mask mode is LA"),
    (lambda p: Image.new("L", (64, 48)).save(p), "000001.png: mask is 64x48 but image 000001.png is 64x64"),
])
def test_bad_masks_are_found_when_the_dataset_opens(ade, tmp_path, damage, message):
    """Checked up front from the headers: the error comes from the constructor, before any sample is drawn."""
    root = _copy(ade, tmp_path)
    damage(_mask(root))
    with pytest.raises(AnnotationError, match=message):
        SegmentationFolder(root, "training", num_classes=4)


def test_truncated_mask_is_named_when_read(ade, tmp_path):
    root = _copy(ade, tmp_path)
    data = _mask(root).read_bytes()
    _mask(root).write_bytes(data[:len(data) // 2])  # header intact, pixel data cut
    ds = SegmentationFolder(root, "training", num_classes=4)
    with pytest.raises(AnnotationError, match="000001.png: not a readable image .*truncated"):
        ds.read_mask(1)


def test_bad_mask_stops_training_before_the_first_step(ade, tmp_path, capsys):
    """The issue's case: a corrupt mask in a run of a few iterations used to pass (or raise a raw
    UnidentifiedImageError); now the command stops at once with one line naming the file."""
    root = _copy(ade, tmp_path)
    _mask(root, "000003.png").write_bytes(b"corrupt")
    code = main(["segment", "train", "--data", str(root), "--output", str(tmp_path / "run"), *SEG_TRAIN])
    assert code == 2
    err = _one_error_line(capsys)
    assert "annotations/training/000003.png: not a readable mask image" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_class_names_come_with_the_dataset(ade, tmp_path):
    assert SegmentationFolder(ade, "training", 4).classes == ["background", "red_square", "green_disc", "blue_triangle"]
    assert SegmentationFolder(ade, "training", 3, reduce_zero_label=True).classes == [
        "red_square", "green_disc", "blue_triangle"]
    assert SegmentationFolder(ade, "training", 4, classes=list("abcd")).classes == list("abcd")
    root = _copy(ade, tmp_path)
    with pytest.raises(AnnotationError, match=r"classes.json: lists 4 names; 5 classes need 5"):
        SegmentationFolder(root, "training", 5)
    (root / "classes.json").write_text(json.dumps(["a", "b", "a", "c"]))
    with pytest.raises(AnnotationError, match=r"class names repeat: \['a'\]"):
        SegmentationFolder(root, "training", 4)
    (root / "classes.json").unlink()
    assert SegmentationFolder(root, "training", 4).classes == ["0", "1", "2", "3"]


# --- per-class results by name ---------------------------------------------------------------------
def test_confusion_matrix_keys_iou_by_class_name():
    cm = ConfusionMatrix(3, classes=["sky", "road", "car"])
    cm.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
    iou = cm.compute()["IoU"]
    assert list(iou) == ["sky", "road", "car"]
    assert iou["sky"] == pytest.approx(2 / 3) and iou["road"] == pytest.approx(1 / 2) and np.isnan(iou["car"])
    with pytest.raises(ValueError, match="need 3 distinct names"):
        ConfusionMatrix(3, classes=["a", "b"])


def test_training_and_eval_print_class_names(coco, ade, runs, capsys):
    """The per-class tables of train and eval both show names, because the metric functions return them."""
    assert main(["detect", "train", "--data", str(coco), "--output", str(runs / "det2"), *DET_TRAIN]) == 0
    train_out = capsys.readouterr().out
    assert "per-class AP" in train_out and all(n in train_out for n in ("red_square", "green_disc", "blue_triangle"))
    assert main(["detect", "eval", str(runs / "det" / "model.pt"), "--data", str(coco), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert list(metrics["per_class_AP"]) == ["red_square", "green_disc", "blue_triangle"]

    assert main(["segment", "train", "--data", str(ade), "--output", str(runs / "seg2"), *SEG_TRAIN]) == 0
    train_out = capsys.readouterr().out
    assert "per-class IoU" in train_out and "blue_triangle" in train_out and "background" in train_out
    assert main(["segment", "eval", str(runs / "seg" / "model.pt"), "--data", str(ade), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert list(metrics["IoU"]) == ["background", "red_square", "green_disc", "blue_triangle"]


# --- foreign checkpoints ---------------------------------------------------------------------------
def test_classifier_checkpoint_is_named_for_what_it_is(coco, ade, runs, tmp_path, capsys):
    cls_last = runs / "cls" / "last.pt"
    image = coco / "images" / "val" / "000000.png"
    assert main(["detect", "predict", str(cls_last), str(image), "--output", str(tmp_path / "a.png")]) == 2
    err = _one_error_line(capsys)
    assert "last.pt: is an image-classification checkpoint (cpubone_nano, 10 classes; from cpubone train)" in err
    assert "expected a detection checkpoint (model.pt or last.pt from cpubone detect train)" in err
    assert main(["segment", "predict", str(cls_last), str(image), "--output", str(tmp_path / "b.png")]) == 2
    assert "expected a segmentation checkpoint" in _one_error_line(capsys)
    assert main(["segment", "eval", str(runs / "cls" / "best_model"), "--data", str(ade)]) == 2
    assert "a saved image classifier (model.safetensors)" in _one_error_line(capsys)
    assert not (tmp_path / "a.png").exists()


def test_other_task_and_non_checkpoints_are_named(coco, runs, tmp_path, capsys):
    image = coco / "images" / "val" / "000000.png"
    assert main(["detect", "predict", str(runs / "seg" / "model.pt"), str(image), "--output", str(tmp_path / "a.png")]) == 2
    assert "a segmentation checkpoint (cpubone_nano), not a detection one" in _one_error_line(capsys)
    # a run folder stands for its model.pt
    model, cfg = load_downstream_model(runs / "det", task="detect")
    assert cfg["task"] == "detect" and not model.training
    cases = {
        "random.pt": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(256)), "not a PyTorch checkpoint file"),
        "weights.pt": (lambda p: torch.save({"conv.weight": torch.zeros(2)}, p),
                       r"holds bare weights \(a state dict of 1 tensors\)"),
        "pickled.pt": (lambda p: torch.save({"model": {}, "config": Path("x")}, p), "holds pickled Python objects"),
    }
    for name, (write, message) in cases.items():
        write(tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_downstream_model(tmp_path / name, task="detect")
        assert main(["detect", "eval", str(tmp_path / name), "--data", str(coco)]) == 2
        assert name in _one_error_line(capsys)
