"""The torch-free predictor and the shared eval preprocessing (cpubone.deploy.predictor / .preprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from cpubone import create_model
from cpubone.cli import main
from cpubone.deploy.export import export_model
from cpubone.deploy.predictor import Predictor
from cpubone.preprocess import PreprocessConfig, preprocess

torch.set_num_threads(1)
SRC = str(Path(__file__).resolve().parents[1] / "src")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


@pytest.mark.parametrize("size,crop_mode", [((224, 224), "center"), ((256, 192), "center"), ((97, 97), "squash")])
def test_preprocess_matches_timm_eval_transform(size, crop_mode):
    from timm.data import create_transform, resolve_data_config

    data_cfg = resolve_data_config(model=create_model("cpubone_nano"))
    data_cfg.update(input_size=(3, *size), crop_mode=crop_mode)
    timm_tf = create_transform(**data_cfg)
    cfg = PreprocessConfig.from_data_config(data_cfg)
    assert cfg.interpolation == "bicubic" and cfg.crop_pct == 0.95
    for name in PHOTOS:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        ref = timm_tf(img).numpy()
        out = preprocess(getattr(data, name)(), cfg)  # arrays (gray camera too) convert like .convert('RGB')
        assert out.shape == ref.shape == (3, *size)
        assert np.abs(out - ref).max() <= 1e-5, name


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    path = tmp / "nano.onnx"
    export_model("cpubone_nano", path, input_size=(64, 64), verify=False)
    files = []
    for name in ("chelsea", "camera"):
        files.append(tmp / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(files[-1])
    return path, files


def test_predictor_runs_without_torch(exported):
    path, files = exported
    code = (
        "import sys, json\n"
        "from cpubone.deploy.predictor import Predictor\n"
        f"Predictor({str(path)!r}).predict([{str(files[0])!r}])\n"
        "assert 'torch' not in sys.modules, 'predictor imported torch'\n"
        "from cpubone.cli import main as cli\n"
        f"rc = cli(['predict', {str(path)!r}, {str(files[0])!r}, {str(files[1])!r}, '--json', '--topk', '3'])\n"
        f"rc2 = cli(['predict', {str(files[0])!r}, '--onnx', {str(path)!r}])\n"
        "assert 'torch' not in sys.modules, 'cpubone predict imported torch'\n"
        "sys.exit(rc or rc2)\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    preds = json.loads(proc.stdout[: proc.stdout.rindex("]") + 1])
    assert [Path(p["image"]).name for p in preds] == ["chelsea.png", "camera.png"]
    assert all(len(p["topk"]) == 3 for p in preds)


def test_predictor_matches_pytorch(exported):
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    path, files = exported
    pred = Predictor(path)
    model = create_model("cpubone_nano").eval()  # for its data config (timm resolve_data_config)
    cfg = resolve_data_config(model=model)
    cfg["input_size"] = (3, 64, 64)
    x_timm = create_transform(**cfg)(Image.open(files[0]).convert("RGB")).numpy()
    assert np.abs(pred.preprocess(files[0]) - x_timm).max() <= 1e-5
    logits = pred.logits([files[0]])[0]
    out = pred.predict([files[0], Image.open(files[1])], topk=5)
    assert out[0].indices[0] == int(np.argmax(logits))
    assert out[0].probs == sorted(out[0].probs, reverse=True) and 0 < sum(out[0].probs) <= 1.0 + 1e-6
    assert out[0].labels[0] == ImageNetInfo().label_descriptions()[out[0].indices[0]]
    assert out[1].image == "image 1"


def test_predictor_errors(exported, tmp_path, capsys):
    path, files = exported
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        Predictor(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        Predictor(junk)
    pred = Predictor(path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match="bad.jpg: not a readable image"):
        pred.predict([bad])
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\)"):
        pred.predict([np.zeros((8, 8, 2), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        pred.predict([np.zeros((8, 8, 3), np.int64)])
    # RGBA and LA (2-band) Pillow images and float arrays decode by the shared rules (tests/test_images.py)
    assert pred.predict([Image.new("RGBA", (40, 30)), Image.new("LA", (40, 30)), np.zeros((8, 8, 3), np.float32)],
                        topk=1)[2].indices
    assert main(["predict", str(bad), "--onnx", str(path)]) == 1
    assert "not a readable image" in capsys.readouterr().err
    assert main(["predict", str(files[0]), "--onnx", str(tmp_path / "nope.onnx")]) == 2
    assert "model not found: " + str(tmp_path / "nope.onnx") in capsys.readouterr().err
    # a model that is neither ONNX nor weights, and a model with no image
    assert main(["predict", str(files[0]), str(files[1])]) == 2
    assert "not a model" in capsys.readouterr().err
    assert main(["predict", str(path)]) == 2
    assert "at least one image" in capsys.readouterr().err


def test_predict_many_images_and_folders(exported, tmp_path, capsys):
    """One unreadable image does not stop the others: each gets its result or a one-line error."""
    path, files = exported
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    rc = main(["predict", str(path), str(files[0]), str(bad), str(tmp_path / "missing.png"), str(files[1]),
               "--topk", "2"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert str(files[0]) in out and str(files[1]) in out and "bad.jpg" not in out
    errors = err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("cpubone predict: error:") for e in errors)
    assert "bad.jpg: not a readable image" in errors[0] and "missing.png" in errors[1]
    # a folder: the images inside it (recursively, sorted), other files ignored
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.open(files[0]).save(folder / "b.png")
    Image.open(files[1]).save(folder / "sub" / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", str(path), str(folder), "--json", "--topk", "1"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [Path(p["image"]).relative_to(folder).as_posix() for p in preds] == ["b.png", "sub/a.jpg"]
    ref = Predictor(path).predict([files[0]], topk=1)[0]
    assert preds[0]["topk"][0]["index"] == ref.indices[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(path), str(empty), str(files[0]), "--json"]) == 1
    out, err = capsys.readouterr()
    assert [p.get("error") is None for p in json.loads(out)] == [True, False]
    assert "no image files" in err and str(empty) in err


def test_channel_count_of_the_model(tmp_path):
    gray = tmp_path / "gray.onnx"
    export_model(create_model("cpubone_nano", in_chans=1), gray, input_size=(32, 32), verify=False)
    pred = Predictor(gray)
    assert pred.config.input_size == (1, 32, 32)
    assert pred.preprocess(data.chelsea()).shape == (1, 32, 32)  # RGB -> L for a 1-channel model
    two = tmp_path / "two.onnx"
    export_model(create_model("cpubone_nano", in_chans=2), two, input_size=(32, 32), verify=False)
    with pytest.raises(ValueError, match="expects 2 input channels"):
        Predictor(two).predict([data.chelsea()])


def test_class_names_travel_with_the_weights(tmp_path, capsys):
    """A fine-tuned classifier keeps its class names: saved, restored, exported, shown by predict."""
    import cpubone
    from safetensors import safe_open

    names = ["cat", "coffee cup", "rocket"]
    model = create_model("cpubone_nano", num_classes=3)
    model.pretrained_cfg["label_names"] = names
    cpubone.save_pretrained(model, tmp_path / "best_model")
    assert json.loads((tmp_path / "best_model" / "config.json").read_text())["pretrained_cfg"]["label_names"] == names
    with safe_open(str(tmp_path / "best_model" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["cpubone_config"])["pretrained_cfg"]["label_names"] == names
    restored = create_model("cpubone_nano", pretrained=tmp_path / "best_model")
    assert list(restored.pretrained_cfg["label_names"]) == names
    # a new classifier of another size does not inherit the names
    assert "label_names" not in create_model("cpubone_nano", pretrained=tmp_path / "best_model",
                                             num_classes=5).pretrained_cfg
    with pytest.raises(ValueError, match="2 names for a model with 3 classes"):
        model.pretrained_cfg["label_names"] = names[:2]
        cpubone.save_pretrained(model, tmp_path / "wrong")

    onnx_path = tmp_path / "nano3.onnx"
    # at the model's own input size, the one the PyTorch path below preprocesses to
    assert main(["export", "cpubone_nano", "--checkpoint", str(tmp_path / "best_model"), "-o", str(onnx_path)]) == 0
    from cpubone.engines.onnx_export import read_metadata

    assert json.loads(read_metadata(onnx_path)["cpubone.labels"]) == names
    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    capsys.readouterr()
    assert main(["predict", str(onnx_path), str(photo), "--json", "--topk", "3"]) == 0
    via_onnx = json.loads(capsys.readouterr().out)[0]["topk"]
    assert sorted(t["label"] for t in via_onnx) == sorted(names)
    # the PyTorch path: the save_pretrained folder itself, same names, same ranking
    assert main(["predict", str(tmp_path / "best_model"), str(photo), "--json", "--topk", "3"]) == 0
    via_torch = json.loads(capsys.readouterr().out)[0]["topk"]
    assert [t["label"] for t in via_torch] == [t["label"] for t in via_onnx]
    assert all(abs(a["prob"] - b["prob"]) < 1e-5 for a, b in zip(via_torch, via_onnx))  # same input, same model
    assert [t["label"] for t in via_torch] == [names[t["index"]] for t in via_torch]
    assert main(["predict", str(tmp_path / "best_model"), str(photo)]) == 0
    assert "class " not in capsys.readouterr().out


def test_fine_tuned_timm_model_keeps_its_class_names(tmp_path, capsys):
    """The same for a timm model: its saved class count and names come back for predict and export."""
    import cpubone
    from cpubone.engines.onnx_export import read_metadata

    model = create_model("test_efficientnet", num_classes=3)
    model.pretrained_cfg["label_names"] = ["a", "b", "c"]
    cpubone.save_pretrained(model, tmp_path / "best_model")
    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    assert main(["predict", str(tmp_path / "best_model"), str(photo), "--json", "--topk", "3"]) == 0
    assert sorted(t["label"] for t in json.loads(capsys.readouterr().out)[0]["topk"]) == ["a", "b", "c"]
    out = tmp_path / "te.onnx"
    assert main(["export", "test_efficientnet", "--checkpoint", str(tmp_path / "best_model"), "-o", str(out)]) == 0
    assert json.loads(read_metadata(out)["cpubone.labels"]) == ["a", "b", "c"]
    assert main(["predict", str(tmp_path / "nothing"), str(photo)]) == 2
    assert "model not found" in capsys.readouterr().err
