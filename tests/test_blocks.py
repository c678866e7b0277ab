"""cpubone blocks: analytic MAC ratios of the Gr blocks, the spatial rule, rule derivation, a tiny sweep."""
import csv
import json

import pytest
import torch
from PIL import Image

from cpubone.analysis.blocks import (BlockSpec, block_specs, design_rules, make_block, run_block_sweep,
                                     spatial_size)
from cpubone.models.macs import count_macs
from cpubone.cli import main
from cpubone.models.layers import FusedMBConv, MBConv


def _macs(spec: BlockSpec) -> int:
    return count_macs(make_block(spec), (1, spec.width, spec.resolution, spec.resolution)).total


@pytest.mark.parametrize("width", [24, 32, 96, 256, 512])
def test_grfumbconv_is_055_of_fumbconv(width):
    fu, grfu = _macs(BlockSpec("fused", width, 3, 1)), _macs(BlockSpec("fused", width, 3, 2))
    # expansion 9*C*4C/2 + projection 4C*C over 9*C*4C + 4C*C = 22/40, exactly, at any width
    assert grfu * 40 == fu * 22


@pytest.mark.parametrize("width", [32, 96, 256, 512])
def test_grmbconv_is_about_075_of_mbconv(width):
    ratio = _macs(BlockSpec("unfused", width, 3, 2)) / _macs(BlockSpec("unfused", width, 3, 1))
    assert 0.74 < ratio < 0.79
    if width >= 256:
        assert ratio == pytest.approx(0.75, abs=0.01)


def test_blocks_are_the_real_layers():
    assert isinstance(make_block(BlockSpec("fused", 64, 2, 2)), FusedMBConv)
    m = make_block(BlockSpec("unfused", 64, 2, 4))
    assert isinstance(m, MBConv) and m.conv_pw.conv.groups == 4 and m.conv_dw.conv.kernel_size == (2, 2)
    assert make_block(BlockSpec("dw", 64, 3)).conv.groups == 64


def test_spatial_rule():
    assert [spatial_size(w) for w in (24, 32, 48, 64, 96, 128, 192, 256, 384, 512)] == \
        [56, 56, 28, 28, 14, 14, 7, 7, 7, 7]


def test_block_specs_and_variant_names():
    specs = block_specs([32, 64], kernels=(2, 3), groups=(1, 2, 4, 8))
    assert len(specs) == 2 * 2 * (4 + 4 + 1)
    assert {s.variant for s in specs} == {"FuMBConv", "GrFuMBConv", "GrFuMBConv-g4", "GrFuMBConv-g8", "MBConv",
                                          "GrMBConv", "GrMBConv-g4", "GrMBConv-g8", "DWConv"}


def _rec(family, width, kernel, groups, gmacps, macs=1000):
    variant = BlockSpec(family, width, kernel, groups).variant
    return dict(variant=variant, family=family, width=width, resolution=spatial_size(width), kernel=kernel,
                groups=groups, macs=macs, median_ms=macs / gmacps, gmacps=gmacps)


def test_design_rules_from_records():
    recs = []
    for w, (fu, un) in {64: (60.0, 30.0), 128: (60.0, 40.0), 256: (50.0, 55.0), 512: (45.0, 50.0)}.items():
        for k, scale in ((2, 1.1), (3, 1.0)):
            recs += [_rec("fused", w, k, 1, fu * scale, 2000), _rec("fused", w, k, 2, fu * scale, 1100),
                     _rec("unfused", w, k, 1, un * scale, 800), _rec("unfused", w, k, 2, un * scale * 0.95, 600),
                     _rec("dw", w, k, 1, 5.0 * (1.5 if k == 2 else 1.0), 10)]
    out = design_rules(recs)
    k2 = [p for p in out["preferred"] if p["kernel"] == 2]
    assert [p["preferred"] for p in k2] == ["GrFuMBConv", "GrFuMBConv", "GrMBConv", "GrMBConv"]
    assert k2[0]["macps_ratio"] == pytest.approx(60 / (30 * 0.95)) and k2[2]["latency_ratio"] == pytest.approx((1100 / (50 * 1.1)) / (600 / (55 * 1.1 * 0.95)))
    rules = {r["rule"]: r["measured"] for r in out["rules"]}
    assert rules["fused/unfused crossover (2x2)"] == "256 channels"
    assert rules["channels 64-128 (2x2)"].startswith("GrFuMBConv") and rules["channels 256-512 (2x2)"].startswith("GrMBConv")
    assert rules["MACpS gain of 2x2 over 3x3, DWConv"] == "+50%"
    assert rules["MACpS gain of 2x2 over 3x3, GrFuMBConv"] == "+10%"
    assert rules["groups=2 vs 1, FuMBConv k3"].startswith("0.55x MACs, MACpS +0%")
    assert rules["groups=2 vs 1, MBConv k3"].startswith("0.75x MACs, MACpS -5%")


def test_tiny_sweep_runs(tmp_path):
    torch.set_num_threads(1)
    res = run_block_sweep(widths=[32, 64], groups=(1, 2), runs=2, warmup=0, out_dir=tmp_path, progress=False)
    assert len(res.records) == 2 * 2 * (2 + 2 + 1)
    assert all(r["gmacps"] > 0 and r["macs"] > 0 for r in res.records)
    assert len(res.preferred) == 2 * 2 and any(r["rule"].startswith("fused/unfused crossover") for r in res.rules)
    with open(tmp_path / "blocks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res.records) and rows[0]["variant"]
    assert len(json.loads((tmp_path / "blocks.json").read_text())["records"]) == len(res.records)
    assert "Design rules" in (tmp_path / "blocks.md").read_text()
    with Image.open(tmp_path / "blocks.png") as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("args, needle", [
    (["blocks", "--threads", "0"], "threads=0"),
    (["blocks", "--widths", "30"], "30"),
])
def test_cli_blocks_bad_input(args, needle, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpubone blocks: error:") and needle in err


def test_cli_blocks_checks_its_output_folder_first(tmp_path, capsys, monkeypatch):
    from cpubone.analysis import blocks

    def not_reached(*args, **kwargs):
        raise AssertionError("measured before the output folder was checked")

    monkeypatch.setattr(blocks, "prepare_block", not_reached)
    (tmp_path / "file").write_text("x")
    assert main(["blocks", "--quick", "--out", str(tmp_path / "file" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err
