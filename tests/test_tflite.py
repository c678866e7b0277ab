"""`cpubone export --format tflite` and the .tflite it writes.

The conversion needs litert-torch (extra [mobile]), which does not co-install with the main environment: the
tests that convert skip there and run in `.venv-mobile` (`make test-mobile`). The missing-extra message is
tested everywhere.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cpubone.cli import main
from cpubone.deploy.export import ExportVerificationError
from cpubone.preprocess import PreprocessConfig, preprocess
from cpubone.engines import ExportError, load_artifact
from cpubone.models import create_model

from conftest import trained_like

SIZE = 64
converter = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("litert_torch", "ai_edge_litert")),
    reason="litert-torch not installed here: these run in .venv-mobile (make test-mobile)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained-like cpubone_nano exported at 64x64 once: (model, report, path)."""
    from cpubone.deploy.export import export_tflite_model

    torch.manual_seed(0)
    model = trained_like(create_model("cpubone_nano"))
    path = tmp_path_factory.mktemp("tflite") / "nano.tflite"
    return model, export_tflite_model(model, path, input_size=(SIZE, SIZE)), path


@converter
def test_export_is_verified_and_predict_runs_it_without_torch(exported, tmp_path):
    from PIL import Image
    from skimage import data

    model, report, path = exported
    assert report.path == str(path) and path.is_file() and report.max_abs_diff < 1e-4
    assert len(report.checks) == 6 and all(c.top1_agree for c in report.checks)  # random + five photos
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert report.metadata_path == str(path) + ".json" and json.loads(meta["cpubone.engine"]) == "litert"
    assert load_artifact(path).precision == "fp32"
    from ai_edge_litert.interpreter import Interpreter

    # nano's first downsample (12 -> 48 channels, 2 groups) is dense in the inference form for ONNX Runtime;
    # the file holds the grouped conv (filter (48, 3, 3, 6)), which LiteRT's XNNPACK runs at full speed
    filters = {tuple(t["shape"]) for t in Interpreter(model_path=str(path)).get_tensor_details()}
    assert (48, 3, 3, 6) in filters and (48, 3, 3, 12) not in filters

    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cpubone.cli import main\n"
            f"sys.exit(main(['predict', {str(path)!r}, {str(photo)!r}, '--topk', '3', '--json']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    top = [t["index"] for t in json.loads(out.stdout)[0]["topk"]]
    x = preprocess(Image.open(photo), PreprocessConfig.from_metadata(meta))[None]
    with torch.no_grad():
        ref = model(torch.from_numpy(x))[0].numpy()
    assert top == list(np.argsort(-ref)[:3])  # the file, its metadata and the training form agree


@converter
def test_a_file_that_disagrees_is_not_left_under_the_name(exported, tmp_path, monkeypatch, capsys):
    """Verification compares with the model it was given: other weights must be refused, file set aside."""
    from cpubone.deploy import tflite

    _, _, good = exported
    monkeypatch.setattr(tflite, "export_tflite", lambda m, path, *a, **k: path.write_bytes(good.read_bytes()) and path)
    out = tmp_path / "other.tflite"
    other = trained_like(create_model("cpubone_nano"), seed=1)
    with pytest.raises(ExportVerificationError, match=r"litert fp32 .*other\.tflite.* disagrees with PyTorch"):
        tflite.export_tflite_model(other, out, input_size=(SIZE, SIZE))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.tflite.failed"]  # no file, no metadata


@converter
def test_conversion_failure_is_one_line(tmp_path, capfd):
    from cpubone.engines.litert_export import export_tflite

    class DataDependent(torch.nn.Module):  # torch.export cannot trace a branch on a tensor's value
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ExportError) as e:
        export_tflite(DataDependent(), tmp_path / "dd.tflite", (8, 8))
    assert str(e.value).startswith("DataDependent: TFLite conversion failed (") and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    assert capfd.readouterr().out == ""  # the converter's progress lines are silenced


def test_missing_converter_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import fails as if not installed
    assert main(["export", "cpubone_nano", "--format", "tflite", "-o", str(tmp_path / "a.tflite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'cpubone[mobile]'" in err and "litert_torch" in err
    assert list(tmp_path.iterdir()) == []
