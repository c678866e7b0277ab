"""cpubone profile: node-name mapping, block units, MAC partition, tables and files."""
import csv
import json
import os
import tempfile

import pytest
import torch
from PIL import Image

from cpubone import create_model
from cpubone.models.macs import count_macs
from cpubone.analysis.profile import _charge, block_units, module_of_node, profile_model, profiling_engines
from cpubone.cli import main
from cpubone.engines import NodeTime, engine_class

needs_openvino = pytest.mark.skipif(not engine_class("openvino").available(),
                                    reason="openvino extra not installed")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CPUBONE_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_module_of_node_maps_scope_names():
    names = [n for n, _ in create_model("cpubone_nano").named_modules()]
    assert module_of_node("/stages/stages.2/blocks/blocks.0/attn/qkv/Conv", names) == "stages.2.blocks.0.attn.qkv"
    assert module_of_node("/stem/conv/conv/Conv_output_0_nchwc", names) == "stem.conv.conv"
    assert module_of_node("/stages/stages.3/blocks/blocks.1/Add_1", names) == "stages.3.blocks.1"
    assert module_of_node("/head/fc/Gemm", names) == "head.fc"
    assert module_of_node("ReorderOutput_token_12", names) == ""
    assert module_of_node("/nothing/here/Conv", names) == ""
    # OpenVINO's PyTorch frontend: the module path after "__module.", up to the first "/"
    assert module_of_node("__module.stages.2.blocks.0.attn.qkv/aten::_convolution/Convolution", names) \
        == "stages.2.blocks.0.attn.qkv"
    assert module_of_node("__module.stages.2.blocks.0/aten::add/Add", names) == "stages.2.blocks.0"
    assert module_of_node("__module.head.fc/aten::linear/Add", names) == "head.fc"
    assert module_of_node("__module.stages.9.x/aten::add/Add", names) == "stages"  # deepest module that exists
    assert module_of_node("MVN_21976", names) == ""


def test_runtime_nodes_charged_to_blocks():
    """A node goes to the block of its first scoped fused name, else its own; unscoped ones follow the
    node before them."""
    model = create_model("cpubone_nano")
    names, units = [n for n, _ in model.named_modules()], block_units(model)
    nodes = [
        NodeTime("x_abcd_acdb___module.stem.conv.conv/aten::_convolution/Convolution", "Reorder", 0.5, "jit_uni_f32"),
        NodeTime("__module.stem.conv.conv/aten::_convolution/Convolution", "Convolution", 1.0, "brgconv_avx512_f32",
                 ("__module.stem.conv.conv/aten::_convolution/Convolution",
                  "__module.stem.conv.act/aten::hardswish/HSwish")),
        # a GroupNorm OpenVINO decomposed: its executed node is named MVN_*, the norm's name is among the fused
        NodeTime("MVN_1", "MVN", 2.0, "jit_avx512_f32",
                 ("MVN_1", "Multiply_2", "__module.stages.2.blocks.0.norm1/aten::group_norm/GroupNormalization")),
        NodeTime("__module.stages.2.blocks.0.attn.qkv/aten::_convolution/Convolution", "Convolution", 4.0,
                 "brgconv_avx512_1x1_f32"),
        NodeTime("VariadicSplit_3", "VariadicSplit", 8.0, "ref_f32", ("VariadicSplit_3",)),
        NodeTime("/stages/stages.2/blocks/blocks.0/mlp/fc1/Conv", "Conv", 16.0),  # ONNX Runtime: no kernel given
        NodeTime("/head/fc/Gemm", "Gemm", 32.0),
    ]
    unit_ms, op_ms, op_calls, kernels = _charge(nodes, names, units)
    assert dict(unit_ms) == {"": 0.5, "stem": 1.0, "stages.2.blocks.0.norm1": 2.0, "stages.2.blocks.0.attn": 12.0,
                             "stages.2.blocks.0.mlp": 16.0, "head": 32.0}
    assert dict(op_ms) == {"Reorder": 0.5, "Convolution": 5.0, "MVN": 2.0, "VariadicSplit": 8.0, "Conv": 16.0,
                           "Gemm": 32.0}
    assert op_calls["Convolution"] == 2
    assert [(k["op"], k["exec_type"], k["calls"], k["ms"], k["blocks"]) for k in kernels] == [
        ("VariadicSplit", "ref_f32", 1, 8.0, "stages.2.blocks.0.attn"),
        ("Convolution", "brgconv_avx512_1x1_f32", 1, 4.0, "stages.2.blocks.0.attn"),
        ("MVN", "jit_avx512_f32", 1, 2.0, "stages.2.blocks.0.norm1"),
        ("Convolution", "brgconv_avx512_f32", 1, 1.0, "stem"),
        ("Reorder", "jit_uni_f32", 1, 0.5, "(model)")]


def test_block_units_kinds():
    units = block_units(create_model("cpubone_b0"))
    assert units["stem"] == "stem" and units["head"] == "head"
    assert units["stages.0.downsample"] == "GrFuMBConv"
    assert units["stages.2.blocks.0.attn"] == "Lowtention" and units["stages.2.blocks.0.mlp"] == "MLP"
    # the paper's rule: fused local block below 256 channels (stage 3 of B0), unfused at 256 (stage 4)
    assert units["stages.2.blocks.0.local"] == "GrFuMBConv" and units["stages.3.blocks.0.local"] == "GrMBConv"
    generic = block_units(create_model("mobilenetv3_large_100"))
    assert generic["blocks.1.0"] == "InvertedResidual" and "conv_stem" in generic


@pytest.mark.parametrize("engine", ["onnxruntime", "eager", pytest.param("openvino", marks=needs_openvino)])
def test_profile_tables(engine, tmp_path):
    res = profile_model("cpubone_nano", engine=engine, size=64, runs=3, warmup=1, out_dir=tmp_path)
    assert (res.engine, res.precision) == (engine, "fp32")
    total = count_macs(create_model("cpubone_nano"), 64).total
    # every MAC lands in exactly one block and one kind
    assert sum(b["macs"] for b in res.blocks) == total == res.macs
    assert sum(k["macs"] for k in res.kinds) == total
    assert {"stem", "GrFuMBConv", "Lowtention", "MLP", "head"} <= {k["kind"] for k in res.kinds}
    assert sum(k["share_pct"] for k in res.kinds) == pytest.approx(100.0)
    assert sum(b["ms"] for b in res.blocks) == pytest.approx(res.profiled_ms)
    for b in res.blocks:
        if b["gmacps"]:
            assert b["gmacps"] == pytest.approx(b["macs"] / (b["ms"] * 1e-3) / 1e9)
    assert res.predicted_ms <= res.profiled_ms + 1e-9
    assert res.floor_ms == pytest.approx(total / (res.peak_gmacps * 1e9) * 1e3)
    conv = next(o for o in res.ops if o["op"] == "all conv ops")
    assert 0 < conv["macs"] <= total and conv["ms"] > 0
    stem = "profile_cpubone_nano" + ("" if engine == "onnxruntime" else f"_{engine}")
    with open(tmp_path / f"{stem}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["table"] for r in rows} == {"block", "kind", "op"} | ({"kernel"} if engine == "openvino" else set())
    assert json.loads((tmp_path / f"{stem}.json").read_text())["macs"] == total
    assert "predicted latency" in (tmp_path / f"{stem}.md").read_text()
    with Image.open(tmp_path / f"{stem}.png") as im:
        assert im.format == "PNG"


@needs_openvino
def test_openvino_profile_blocks_ops_and_kernels(tmp_path):
    res = profile_model("cpubone_nano", engine="openvino", size=64, runs=2, warmup=1, out_dir=tmp_path)
    # every block of the model is listed, each once, and nothing runs outside them but the input's reorder
    units = list(block_units(create_model("cpubone_nano")))
    assert [b["block"] for b in res.blocks if b["block"] != "(model)"] == units
    assert {b["kind"] for b in res.blocks if b["block"] == "(model)"} <= {"other"}
    # per-block times add up to the per-op sum and to the per-kernel sum: every executed node counted once
    ops = [o for o in res.ops if not o["op"].startswith("all ")]
    assert sum(b["ms"] for b in res.blocks) == pytest.approx(sum(o["ms"] for o in ops))
    assert sum(b["ms"] for b in res.blocks) == pytest.approx(res.profiled_ms)
    assert sum(k["ms"] for k in res.kernels) == pytest.approx(res.profiled_ms)
    assert sum(k["calls"] for k in res.kernels) == sum(o["calls"] for o in ops)
    # OpenVINO's op types, the MAC-doing ones classed, and the kernel it picked for each
    types = {o["op"]: o["mac_class"] for o in ops}
    assert types["Convolution"] == types["GroupConvolution"] == "conv" and types["FullyConnected"] == "matmul"
    assert {"MVN", "Softmax"} <= set(types)
    assert all(k["exec_type"] and k["exec_type"] != "undef" for k in res.kernels)
    assert any(k["exec_type"].endswith("_f32") for k in res.kernels if k["op"] == "Convolution")
    saved = json.loads((tmp_path / "profile_cpubone_nano_openvino.json").read_text())
    assert (saved["engine"], saved["precision"]) == ("openvino", "fp32")
    assert saved["kernels"] == res.kernels and saved["measured_ms"] > 0
    assert "By kernel" in (tmp_path / "profile_cpubone_nano_openvino.md").read_text()


def _cpu_has_bf16() -> bool:
    if not engine_class("openvino").available():
        return False
    import openvino as ov

    from cpubone.engines.openvino import _cpu_has_bf16 as has_bf16

    return has_bf16(ov.Core())


@pytest.mark.parametrize("engine, precision, kernel", [
    pytest.param("openvino", "bf16", "_bf16", marks=pytest.mark.skipif(not _cpu_has_bf16(), reason="no bf16 CPU")),
    ("onnxruntime", "int8", "QLinearConv"),
])
def test_profile_precision_reaches_the_runtime(engine, precision, kernel, tmp_path):
    """--precision prepares the network as bench does; the kernels / op types show it ran that way."""
    res = profile_model("cpubone_nano", engine=engine, precision=precision, size=64, runs=2, warmup=1,
                        out_dir=tmp_path)
    assert (res.engine, res.precision) == (engine, precision)
    if engine == "openvino":  # every conv in the plugin's bf16 kernels
        convs = [k for k in res.kernels if "Convolution" in k["op"]]
        assert convs and all(k["exec_type"].endswith(kernel) for k in convs)
    else:  # ONNX Runtime's int8 QDQ graph runs quantized conv kernels
        assert kernel in {o["op"] for o in res.ops}
        assert next(o for o in res.ops if o["op"] == kernel)["mac_class"] == "conv"
    saved = json.loads((tmp_path / f"profile_cpubone_nano_{engine}_{precision}.json").read_text())
    assert saved["precision"] == precision


def test_engine_profile_nodes_refusals():
    from cpubone.engines import EngineError, get_engine

    eager = get_engine("eager")
    runner = eager.prepare(create_model("cpubone_nano").eval(), (1, 3, 64, 64))
    with pytest.raises(EngineError, match="'eager' has no per-node profiler"):
        eager.profile_nodes(runner)
    with pytest.raises(EngineError, match="'onnxruntime' cannot profile a runner of engine 'eager'"):
        get_engine("onnxruntime").profile_nodes(runner)


@pytest.mark.parametrize("engine", ["executorch", "litert", "ncnn", "compile"])
def test_cli_profile_engine_without_profiler(engine, capsys, tmp_path):
    assert engine not in profiling_engines()
    assert main(["profile", "cpubone_nano", "--engine", engine, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cpubone profile: error: engine {engine!r}")
    assert "no per-op profiler" in err and "onnxruntime, openvino, eager" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_profile_openvino_missing_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("openvino", "nncf") else real(name, *a))
    assert main(["profile", "cpubone_nano", "--engine", "openvino", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'cpubone[openvino]'" in err


@pytest.mark.parametrize("args, needle", [
    (["profile", "no_such_model"], "no_such_model"),
    (["profile", "cpubone_nano", "--size", "31"], "size=31"),
    (["profile", "cpubone_nano", "--threads", "0"], "threads=0"),
    (["profile", "cpubone_nano", "--engine", "tensorrt"], "unknown engine 'tensorrt'"),
    (["profile", "cpubone_nano", "--engine", "onnxruntime,eager"], "one engine at a time"),
    (["profile", "cpubone_nano", "--engine", "onnxruntime", "--precision", "bf16"], "precision 'bf16'"),
    (["profile", "cpubone_nano", "--engine", "eager", "--precision", "int8"], "fp32 only"),
])
def test_cli_profile_bad_input(args, needle, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpubone profile: error:") and needle in err


def _unwritable_cwd(work, monkeypatch):
    """Make the working directory refuse new files: read-only, or (for root, whom permissions do not
    stop) removed."""
    monkeypatch.chdir(work)
    if os.geteuid() == 0:
        work.rmdir()
    else:
        work.chmod(0o555)


def test_profile_from_an_unwritable_cwd_leaves_nothing_behind(tmp_path, monkeypatch):
    """ONNX Runtime's trace goes to a private temporary folder, not the working directory, and is removed."""
    work, temp, out = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "out"
    work.mkdir()
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    _unwritable_cwd(work, monkeypatch)
    res = profile_model("cpubone_nano", size=64, runs=2, warmup=1, out_dir=out)
    assert sorted(os.path.basename(f) for f in res.files.values()) == sorted(
        f"profile_cpubone_nano.{ext}" for ext in ("csv", "json", "png", "md"))
    assert sorted(p.name for p in out.iterdir()) == sorted(os.path.basename(f) for f in res.files.values())
    assert list(temp.iterdir()) == []
    if work.exists():
        work.chmod(0o755)
        assert list(work.iterdir()) == []


def test_profile_interrupted_removes_its_trace(tmp_path, monkeypatch):
    from cpubone.engines import onnxruntime

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(tmp_path)
    real = onnxruntime.ort_session

    class Interrupted:  # a session that is interrupted (Ctrl-C) after its first profiled run
        def __init__(self, *args, **kwargs):
            self.sess = real(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.sess, name)

        def run(self, *args):
            self.sess.run(*args)
            raise KeyboardInterrupt

    monkeypatch.setattr(onnxruntime, "ort_session", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile_model("cpubone_nano", size=64, runs=2, warmup=1, out_dir=tmp_path / "out")
    assert list(temp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "tmp"]  # no trace, no report


def test_cli_profile_checks_its_output_folder_first(tmp_path, monkeypatch, capsys):
    from cpubone.analysis import profile

    def not_reached(*args, **kwargs):
        raise AssertionError("built and measured before the output folder was checked")

    monkeypatch.setattr(profile, "build_model", not_reached)
    (tmp_path / "file").write_text("x")
    assert main(["profile", "cpubone_nano", "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err


def test_cli_profile_prints_results_when_writing_fails_late(tmp_path, monkeypatch, capsys):
    from cpubone.analysis import profile

    out = tmp_path / "out"
    real = profile.build_model

    def build_then_block(*args, **kwargs):  # the folder turns into a file while the profile runs
        out.write_text("x")
        return real(*args, **kwargs)

    monkeypatch.setattr(profile, "build_model", build_then_block)
    assert main(["profile", "cpubone_nano", "--size", "64", "--runs", "2", "--warmup", "1", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "predicted latency" in captured.out and "by block kind" in captured.out
    assert captured.err.startswith("cpubone profile: error: profile measured but not written")
    assert captured.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # no partial or temporary files
