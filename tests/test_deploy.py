"""Inference form, verified ONNX export and int8 quantization (cpubone.deploy)."""
from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from cpubone import VARIANTS, create_model, load_checkpoint
from cpubone.engines.onnxruntime import ort_session
from cpubone.cli import main
from cpubone.models import reparam
from cpubone.deploy.export import ExportVerificationError, export_model, verify_onnx
from cpubone.engines.onnx_export import read_metadata
from cpubone.preprocess import PreprocessConfig
from cpubone.engines.onnx_quantize import quantize_onnx
from cpubone.models.reparam import is_reparameterized, reparameterize

from conftest import trained_like


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inference_form_matches_training_form(name):
    model = trained_like(create_model(name))
    fused = reparameterize(model)
    assert is_reparameterized(fused) and not is_reparameterized(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in fused.modules())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for hw in [(64, 64), (33, 47), (97, 97)]:
            x = torch.randn(1, 3, *hw, generator=g)
            ref, out = model(x), fused(x)
            assert (out - ref).abs().max().item() <= 1e-5, (name, hw)


def test_fuse_method_pad_modes_and_channels_last():
    model = trained_like(create_model("cpubone_t0"))
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        ref = model(x)
        crop = reparameterize(model, pad_mode="crop")
        assert any(isinstance(m, reparam.ConvAct) and m.crop for m in crop.modules())
        assert (crop(x) - ref).abs().max() <= 1e-5
        cl = reparameterize(model).to(memory_format=torch.channels_last)
        assert (cl(x.contiguous(memory_format=torch.channels_last)) - ref).abs().max() <= 1e-5
        assert model.fuse() is model  # in place
        assert is_reparameterized(model) and (model(x) - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="pad_mode"):
        reparameterize(create_model("cpubone_nano"), pad_mode="reflect")


def test_densify_groups_is_exact_and_used_for_narrow_groups():
    conv = nn.Conv2d(16, 64, 3, 2, 1, groups=2, bias=True)
    x = torch.randn(1, 16, 20, 20)
    dense = reparam.densify_groups(conv)
    assert dense.groups == 1
    with torch.no_grad():
        assert torch.allclose(dense(x), conv(x), atol=1e-6)
    fused = reparameterize(create_model("cpubone_b0").eval())
    # B0's first downsample has 8 input channels per group: densified; stage 2's (16 per group) is kept
    assert fused.stages[0].downsample.conv_exp.conv.groups == 1
    assert fused.stages[1].downsample.conv_exp.conv.groups == 2


def test_timm_bfrobust_weights_to_inference_form():
    timm_model = trained_like(create_model("timm/cpubone_b0_bfrobust"))
    ours = create_model("cpubone_b0").eval()
    load_checkpoint(ours, timm_model.state_dict())  # folds timm's extra BatchNorms
    fused = reparameterize(ours)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (fused(x) - timm_model(x)).abs().max() <= 1e-5
    with pytest.raises(TypeError, match="load_checkpoint"):
        reparameterize(timm_model)


@pytest.fixture(scope="module")
def nano_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "nano.onnx"
    model = trained_like(create_model("cpubone_nano"))
    report = export_model(model, path, input_size=(64, 64), dynamic=True)
    return model, path, report


def test_export_metadata_and_verification(nano_onnx):
    from timm.data import resolve_data_config

    model, path, report = nano_onnx
    assert report.max_abs_diff < 1e-4
    names = [c.input for c in report.checks]
    assert any("33x47" in n for n in names) and sum(n.startswith("photo") for n in names) >= 4
    meta = read_metadata(path)
    cfg = PreprocessConfig.from_metadata(meta)
    timm_cfg = resolve_data_config(model=model)
    assert cfg.input_size == (3, 64, 64)
    assert cfg.crop_pct == timm_cfg["crop_pct"] and cfg.interpolation == timm_cfg["interpolation"] == "bicubic"
    assert cfg.mean == pytest.approx(timm_cfg["mean"]) and cfg.std == pytest.approx(timm_cfg["std"])
    labels = json.loads(meta["cpubone.labels"])
    assert len(labels) == 1000 and "tabby" in labels[281]
    # the reparameterized graph has no BatchNorm and the dynamic graph runs at odd sizes
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["BatchNormalization"] == 0
    sess = ort_session(path)
    for hw in [(97, 97), (40, 71)]:
        x = np.random.default_rng(0).standard_normal((1, 3, *hw)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert np.abs(sess.run(None, {"input": x})[0] - ref).max() < 1e-4


def test_verification_fails_loudly(nano_onnx, tmp_path, monkeypatch, capsys):
    model, path, _ = nano_onnx
    other = trained_like(create_model("cpubone_nano"), seed=5)
    with pytest.raises(ExportVerificationError, match="max abs difference"):
        verify_onnx(other, path, PreprocessConfig(input_size=(3, 64, 64)), photos=[])

    real = reparameterize

    def broken(m, *a, **k):  # an inference form that computes something else
        f = real(m, *a, **k)
        f.head.fc.bias.data += 1.0
        return f

    from cpubone.deploy import export as deploy_export

    monkeypatch.setattr(deploy_export, "reparameterize", broken)
    out = tmp_path / "bad.onnx"
    rc = main(["export", "cpubone_nano", "--size", "32", "32", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "verification FAILED" in err and "max abs difference" in err
    assert not out.exists()


def test_int8_quantization(nano_onnx, tmp_path):
    from PIL import Image
    from skimage import data

    _, path, _ = nano_onnx
    calib = tmp_path / "calib"
    (calib / "sub").mkdir(parents=True)
    for n in ("astronaut", "coffee", "rocket"):
        Image.fromarray(getattr(data, n)()).save(calib / "sub" / f"{n}.jpg")
    (calib / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "nano.int8.onnx"
    quantize_onnx(path, out, calib, exclude="attention,last")
    graph = onnx.load(str(out)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] > 20 and ops["DequantizeLinear"] > 20
    produced_by = {o: n for n in graph.node for o in n.output}
    # excluded groups stay float: no activation they consume was rounded to int8 (no DequantizeLinear
    # input, except the qkv conv's input, which comes from the int8 projection)
    checked = 0
    for n in graph.node:
        if n.op_type in ("MatMul", "Gemm", "Softmax") and ("/attn/" in n.name or n.name.startswith("/head/")):
            checked += 1
            assert all(produced_by.get(i) is None or produced_by[i].op_type != "DequantizeLinear" for i in n.input), n.name
    assert checked >= 9  # 3 blocks x (2 matmuls + softmax) + head
    # per-channel weight scales on convs
    assert any(len(init.dims) == 1 and init.dims[0] > 1 and "scale" in init.name for init in graph.initializer)
    meta = read_metadata(out)
    assert meta["cpubone.int8"] == "true" and PreprocessConfig.from_metadata(meta).input_size == (3, 64, 64)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    a = ort_session(path).run(None, {"input": x})[0].ravel()
    b = ort_session(out).run(None, {"input": x})[0].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.9  # close-ish: int8 noise, not a different function
    with pytest.raises(ValueError, match="unknown int8 exclusion"):
        quantize_onnx(path, tmp_path / "x.onnx", calib, exclude="attention,everything")
    with pytest.raises(ValueError, match="no readable calibration images"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "x.jpg").write_bytes(b"junk")
        quantize_onnx(path, tmp_path / "y.onnx", empty)


def test_export_cli_errors(tmp_path, capsys):
    assert main(["export", "cpubone_nano", "--int8", "-o", str(tmp_path / "a.onnx")]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["export", "cpubone_nano", "--format", "tflite", "--dynamic", "-o", str(tmp_path / "a.tflite")]) == 2
    assert "ONNX exports only" in capsys.readouterr().err


@pytest.mark.parametrize("opset", [7, 13, 21, 99])
def test_export_opset_outside_the_supported_range(opset, tmp_path, capsys, monkeypatch):
    from cpubone.deploy import export as deploy_onnx

    monkeypatch.setattr(deploy_onnx, "model_metadata", _not_reached)  # refused before any work
    assert main(["export", "cpubone_nano", "--opset", str(opset), "-o", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert err == f"cpubone export: error: opset {opset} is not supported: choose 14 to 20 (default 18)\n"
    assert list(tmp_path.iterdir()) == []


def _not_reached(*args, **kwargs):
    raise AssertionError("work started before the check")


def test_export_failure_is_one_line(tmp_path, capfd):
    """A model the exporter cannot convert: one line naming it and the reason; no graph dump, no files."""
    out = tmp_path / "eva.onnx"
    assert main(["export", "eva02_tiny_patch14_224", "-o", str(out)]) == 2
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("cpubone export: error: eva02_tiny_patch14_224: ONNX export failed (TypeError: ")
    assert list(tmp_path.iterdir()) == []


def test_export_checks_the_destination_first(tmp_path, capsys, monkeypatch):
    from cpubone.deploy import export as deploy_onnx

    monkeypatch.setattr(deploy_onnx, "model_metadata", _not_reached)
    (tmp_path / "file").write_text("x")
    assert main(["export", "cpubone_nano", "-o", str(tmp_path / "file" / "a.onnx")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["export", "cpubone_nano", "-o", str(tmp_path)]) == 2
    assert "is a folder, not a file name" in capsys.readouterr().err
