"""Design configs as models: the released variants are configs, a config builds the same model, per-stage
choices take effect, save_pretrained round trips a design, bad configs fail in one line."""
import json

import pytest
import torch

from cpubone.models.macs import count_macs, count_params
from cpubone.cli import main
from cpubone.models import (VARIANTS, ConfigError, CPUBoneBlock, FusedMBConv, MBConv, create_model, load_config,
                            save_config, save_pretrained, variant_config)


def _built(source, seed=0):
    torch.manual_seed(seed)
    return create_model(source).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_config_builds_the_variant(name, tmp_path):
    path = save_config(variant_config(name), tmp_path / f"{name}.json")
    a, b = _built(name), _built(str(path))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert count_params(b) == VARIANTS[name].params
    x = torch.randn(1, 3, 40, 56)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))


def test_config_macs_equal_the_variant():
    assert count_macs(_built(variant_config("cpubone_b0")), 224).total == VARIANTS["cpubone_b0"].macs


def test_base_plus_changes(tmp_path):
    path = tmp_path / "deeper.json"
    path.write_text(json.dumps({"name": "b0_deeper", "base": "cpubone_b0", "depths": [0, 1, 1, 4, 4]}))
    cfg = load_config(path)
    assert cfg["name"] == "b0_deeper" and cfg["depths"] == [0, 1, 1, 4, 4] and cfg["widths"] == [16, 32, 64, 128, 256]
    model = create_model(str(path))
    assert len(model.stages[2].blocks) == 4 and len(model.stages[3].blocks) == 4
    assert model.pretrained_cfg["architecture"] == "b0_deeper"
    # one more CPUBone block of width 128: the parameter difference is exactly that block's
    extra = count_params(CPUBoneBlock(128, attn_stride=2))
    assert count_params(model) == VARIANTS["cpubone_b0"].params + extra


def test_per_stage_choices_take_effect():
    cfg = dict(base="cpubone_nano", expand_groups=[1, 2, 4, 4], kernel_sizes=[3, 2, 3, 2],
               attention=[False, True, True, True], attn_strides=[1, 2, 2, 1], fused_below_channels=96,
               expand_ratio=[4, 4, 3, 4], downsample_expand_ratio=6, depths=[0, 2, 1, 1, 2])
    m = create_model(cfg).eval()
    s1, s2, s3, s4 = m.stages
    assert isinstance(s1.blocks[0], FusedMBConv) and s1.blocks[0].conv_exp.conv.groups == 1
    assert s1.blocks[0].conv_exp.conv.kernel_size == (3, 3)
    assert isinstance(s2.blocks[0], CPUBoneBlock) and s2.blocks[0].attn.stride == 2
    assert s2.blocks[0].local.conv_exp.conv.kernel_size == (2, 2)  # 48 channels < 96: fused
    assert isinstance(s3.blocks[0].local, MBConv) and s3.blocks[0].local.conv_dw.conv.kernel_size == (3, 3)
    assert s3.blocks[0].local.conv_pw.conv.groups == 4 and s3.blocks[0].local.conv_pw.conv.out_channels == 96 * 3
    assert s4.blocks[0].attn.stride == 1 and s4.downsample.conv_exp.conv.out_channels == 96 * 6
    with torch.inference_mode():
        assert m(torch.randn(1, 3, 45, 61)).shape == (1, 1000)


def test_save_pretrained_round_trips_a_design(tmp_path):
    design = dict(name="tiny", base="cpubone_nano", expand_groups=[2, 2, 4, 1], kernel_sizes=[3, 3, 3, 2],
                  head_widths=[256, 320], input_size=[96, 128])
    torch.manual_seed(3)
    model = create_model(design, num_classes=10).eval()
    save_pretrained(model, tmp_path / "run")
    again = create_model(str(tmp_path / "run"), pretrained=True).eval()
    assert again.model_config == model.model_config and again.num_classes == 10
    assert again.pretrained_cfg["input_size"] == (3, 96, 128)
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"base": "cpubone_b0", "widht": [1]}', "unknown key 'widht'"),
    ('{"depths": [0, 1, 1, 1, 1]}', "missing key 'widths'"),
    ('{"base": "cpubone_b7"}', "base 'cpubone_b7'"),
    ('{"base": "cpubone_b0", "expand_groups": 3}', "do not split into 3 groups"),
    ('{"base": "cpubone_b0", "kernel_sizes": [3, 3, 4, 2]}', "kernel_sizes"),
    ('{"base": "cpubone_b0", "attention": [true, false]}', "attention"),
    ('{"base": "cpubone_b0", "input_size": [16, 16]}', "input_size"),
])
def test_bad_config_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        create_model(str(path))
    text = str(e.value)
    assert message in text and "\n" not in text and ("bad.json" in text)


def test_design_pretrained_true_without_weights():
    with pytest.raises(ValueError, match="no published weights"):
        create_model({"base": "cpubone_nano"}, pretrained=True)


def test_cli_accepts_a_config(tmp_path, capsys):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"base": "cpubone_nano", "depths": [0, 1, 1, 2, 2]}))
    assert main(["info", str(path), "--json", "--size", "64", "64"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["params"] == count_params(create_model(str(path)))
    path.write_text('{"base": "cpubone_nano", "depth": 3}')
    assert main(["info", str(path)]) == 2
    assert "unknown key 'depth'" in capsys.readouterr().err


# --- a design goes wherever a model name goes: bench, profile, export, train ----------------------------
SMALL_DESIGN = {"name": "small_design", "base": "cpubone_nano", "expand_groups": [2, 2, 4, 1],
                "kernel_sizes": [3, 3, 3, 2], "head_widths": [128, 160]}


@pytest.fixture()
def design_file(tmp_path):
    path = tmp_path / "small_design.json"
    path.write_text(json.dumps(SMALL_DESIGN))
    return path


def test_bench_and_profile_take_a_config(design_file, tmp_path, monkeypatch):
    from cpubone.analysis.bench import run_bench
    from cpubone.analysis.profile import profile_model

    monkeypatch.setenv("CPUBONE_CACHE_DIR", str(tmp_path / "cache"))
    res = run_bench([str(design_file)], size=64, runs=2, warmup=1, rounds=1, out_dir=None, progress=False)
    row = res.rows[0]
    model = create_model(str(design_file))
    assert row.family == "CPUBone" and row.deploy_form and row.top1 is None
    assert row.params == count_params(model) and row.macs == count_macs(model, 64).total
    prof = profile_model(str(design_file), size=64, runs=2, warmup=1, out_dir=None)
    assert prof.macs == row.macs
    assert {b["kind"] for b in prof.blocks} >= {"GrFuMBConv", "Lowtention", "MLP", "FuMBConv"}
    # the export cache follows the file's content, not its name
    design_file.write_text(json.dumps(dict(SMALL_DESIGN, depths=[0, 1, 1, 2, 2])))
    res2 = run_bench([str(design_file)], size=64, runs=1, warmup=0, rounds=1, out_dir=None, progress=False)
    assert res2.rows[0].macs > row.macs


def test_export_takes_a_config(design_file, tmp_path, capsys):
    assert main(["export", str(design_file), "-o", str(tmp_path / "d.onnx"), "--size", "64", "64"]) == 0
    assert "OK: max abs difference" in capsys.readouterr().out


def test_train_takes_a_config_and_saves_a_design(design_file, tmp_path):
    from cpubone.train.data import write_digits_imagefolder

    data = write_digits_imagefolder(tmp_path / "digits", size=32)
    for split, keep in (("train", 16), ("val", 4)):  # a few images a class: this checks plumbing, not learning
        for cls in (data / split).iterdir():
            for f in sorted(cls.iterdir())[keep:]:
                f.unlink()
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", str(design_file), "--recipe", "digits", "--epochs", "1",
                 "--batch-size", "64", "--workers", "0", "--output", str(out)]) == 0
    trained = create_model(str(out / "best_model"), pretrained=True).eval()
    assert trained.model_config == create_model(str(design_file)).model_config
    assert trained.num_classes == 10


def test_resolver_names_a_config_source(design_file):
    from cpubone.models import ResolvedName, is_cpubone, resolve_model_name

    r = resolve_model_name(str(design_file))
    assert r == ResolvedName("config", "small_design") and r.config["kernel_sizes"] == [3, 3, 3, 2]
    assert resolve_model_name({"base": "cpubone_b0"}).name == "cpubone_b0"
    assert is_cpubone(str(design_file)) and is_cpubone({"base": "cpubone_t0"})
    with pytest.raises(ConfigError, match="missing.json: no such config file"):
        resolve_model_name(str(design_file.with_name("missing.json")))
