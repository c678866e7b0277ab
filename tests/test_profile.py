"""cpubone profile: node-name mapping, block units, MAC partition, tables and files."""
import csv
import json

import pytest
import torch
from PIL import Image

from cpubone import create_model
from cpubone.analysis.macs import count_macs
from cpubone.analysis.profile import block_units, module_of_node, profile_model
from cpubone.cli import main


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


def test_block_units_kinds():
    units = block_units(create_model("cpubone_b0"))
    assert units["stem"] == "stem" and units["head"] == "head"
    assert units["stages.0.downsample"] == "GrFuMBConv"
    assert units["stages.2.blocks.0.attn"] == "Lowtention" and units["stages.2.blocks.0.mlp"] == "MLP"
    # the paper's rule: fused local block below 256 channels (stage 3 of B0), unfused at 256 (stage 4)
    assert units["stages.2.blocks.0.local"] == "GrFuMBConv" and units["stages.3.blocks.0.local"] == "GrMBConv"
    generic = block_units(create_model("mobilenetv3_large_100"))
    assert generic["blocks.1.0"] == "InvertedResidual" and "conv_stem" in generic


@pytest.mark.parametrize("engine", ["onnxruntime", "eager"])
def test_profile_tables(engine, tmp_path):
    res = profile_model("cpubone_nano", engine=engine, size=64, runs=3, warmup=1, out_dir=tmp_path)
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
    stem = "profile_cpubone_nano"
    with open(tmp_path / f"{stem}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["table"] for r in rows} == {"block", "kind", "op"}
    assert json.loads((tmp_path / f"{stem}.json").read_text())["macs"] == total
    assert "predicted latency" in (tmp_path / f"{stem}.md").read_text()
    with Image.open(tmp_path / f"{stem}.png") as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("args, needle", [
    (["profile", "no_such_model"], "no_such_model"),
    (["profile", "cpubone_nano", "--size", "31"], "size=31"),
    (["profile", "cpubone_nano", "--threads", "0"], "threads=0"),
])
def test_cli_profile_bad_input(args, needle, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpubone profile: error:") and needle in err
