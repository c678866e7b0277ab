"""Checkpoints: the authors' and timm's layouts, the Hugging Face path, our format, and safety."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import cpubone
from cpubone.models import VARIANTS, CheckpointError, load_checkpoint, read_state_dict, save_pretrained
from cpubone.models.checkpoints import convert_state_dict, detect_layout

from conftest import randomize_
from official import official_logits, official_state_dict

# released variant -> (official shapes file, timm model with the release's structure, timm model to load from)
OFFICIAL = {
    "cpubone_nano": ("nano", "cpubone_nano"),
    "cpubone_t0": ("t0", "cpubone_t0"),
    "cpubone_s0": ("s0", "cpubone_s0"),
    "cpubone_b0": ("b0", "cpubone_b0_bfrobust"),
    "cpubone_b1": ("b1", "cpubone_b1_bfrobust"),
    "cpubone_b2": ("b2", "cpubone_b2_bfrobust"),
    "cpubone_b2_5": ("b2_5", "cpubone_b2pt5_dwnorm"),
    "cpubone_b3": ("b3", "cpubone_b3"),
}
TIMM = {
    "cpubone_nano": "cpubone_nano", "cpubone_t0": "cpubone_t0", "cpubone_s0": "cpubone_s0",
    "cpubone_b0_bfrobust": "cpubone_b0", "cpubone_b1_bfrobust": "cpubone_b1", "cpubone_b1_dwnorm": "cpubone_b1",
    "cpubone_b2_bfrobust": "cpubone_b2", "cpubone_b2pt5_dwnorm": "cpubone_b2_5", "cpubone_b3": "cpubone_b3",
}


@pytest.mark.parametrize("name,tag", [("cpubone_b0", "b0"), ("cpubone_t0", "t0")])
def test_official_logits_match_original_code(name, tag):
    sd = official_state_dict(tag)
    assert detect_layout(sd) == "official"
    model = cpubone.create_model(name).double().eval()
    load_checkpoint(model, {"state_dict": sd})  # wrapped like the released evalmodel.pt
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 224, 224)))
    with torch.no_grad():
        logits = model(x).numpy()
    ref = official_logits(tag)
    assert ref.shape == logits.shape == (2, 1000)
    assert np.abs(logits - ref).max() <= 1e-12  # float64 rounding: the same computation


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_every_official_variant_converts_exactly(name):
    """Each variant's official layout -> ours equals the original structure (timm built without
    its extra norms, loading the official keys through timm's own converter), in float64."""
    tag, timm_name = OFFICIAL[name]
    sd = official_state_dict(tag)
    ref = timm.create_model(timm_name, local_mbconv_norm="proj").double().eval()
    from timm.models.cpubone import checkpoint_filter_fn
    ref.load_state_dict(checkpoint_filter_fn(dict(sd), ref))
    ours = cpubone.create_model(name).double().eval()
    load_checkpoint(ours, sd)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 3, 64, 80)))
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff <= 1e-6


@pytest.mark.parametrize("timm_name", list(TIMM))
def test_timm_checkpoints_load_with_equal_outputs(timm_name):
    ref = randomize_(timm.create_model(timm_name), seed=3).eval()
    ours = cpubone.create_model(TIMM[timm_name]).eval()
    info = load_checkpoint(ours, ref.state_dict())
    assert info["layout"] == "timm"
    for size in [(64, 64), (97, 75)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_bfrobust_norms_are_folded():
    ref = randomize_(timm.create_model("cpubone_b0_bfrobust"), seed=4)
    sd = convert_state_dict(ref.state_dict(), cpubone.create_model("cpubone_b0"))
    assert not any(k.endswith(("conv_pw.norm.running_var", "conv_dw.norm.running_var")) for k in sd)
    assert "stages.3.blocks.0.local.conv_pw.conv.bias" in sd


def _write_hf_cache(cache: Path, repo_id: str, state: dict) -> Path:
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    return snap / "model.safetensors"


def test_pretrained_true_uses_hugging_face_cache_offline(tmp_path):
    """The real hf_hub_download path, offline, from a cache laid out as huggingface_hub does."""
    ref = randomize_(timm.create_model("cpubone_nano"), seed=5).eval()
    _write_hf_cache(tmp_path / "hub", VARIANTS["cpubone_nano"].hf_hub_id, ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import torch, cpubone; m = cpubone.create_model('cpubone_nano', pretrained=True).eval(); "
        f"x = torch.load(r'{tmp_path / 'x.pt'}'); "
        f"torch.save(m(x).detach(), r'{tmp_path / 'y.pt'}'); "
        "m2 = cpubone.create_model('cpubone_nano', pretrained=True, num_classes=4); "
        "assert m2.num_classes == 4 and torch.equal(m2.stem.conv.conv.weight, m.stem.conv.conv.weight)"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=1e-5)
    # a variant whose weights are not cached: a clear error, not a hang or a network call
    code = "import cpubone; cpubone.create_model('cpubone_t0', pretrained=True)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "timm/cpubone_t0.r224_in1k" in run.stderr


def test_save_pretrained_round_trip(tmp_path):
    model = randomize_(cpubone.create_model("cpubone_t0", num_classes=12), seed=6).eval()
    save_pretrained(model, tmp_path / "t0")
    assert {p.name for p in (tmp_path / "t0").iterdir()} == {"model.safetensors", "config.json"}
    assert json.loads((tmp_path / "t0" / "config.json").read_text())["architecture"] == "cpubone_t0"
    loaded = cpubone.create_model("cpubone_t0", pretrained=tmp_path / "t0").eval()
    assert loaded.num_classes == 12
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # the weights file alone is self-describing too
    alone = cpubone.create_model("cpubone_t0", pretrained=tmp_path / "t0" / "model.safetensors")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(alone.eval()(x), model(x))
    # another input channel count: the pretrained stem is adapted (timm's adapt_input_conv sums RGB for 1)
    gray = cpubone.create_model("cpubone_t0", pretrained=tmp_path / "t0", in_chans=1)
    torch.testing.assert_close(gray.stem.conv.conv.weight, model.stem.conv.conv.weight.sum(1, keepdim=True))
    assert gray.eval()(torch.randn(1, 1, 40, 40)).shape == (1, 12)
    # fine-tuning start: new class count, backbone weights kept
    ft = cpubone.create_model("cpubone_t0", pretrained=tmp_path / "t0", num_classes=3)
    assert ft.num_classes == 3 and torch.equal(ft.stem.conv.conv.weight, model.stem.conv.conv.weight)


def test_torch_pickle_of_plain_state_dict_loads(tmp_path):
    model = cpubone.create_model("cpubone_nano")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    other = cpubone.create_model("cpubone_nano", pretrained=tmp_path / "ckpt.pth")
    assert torch.equal(other.head.fc.weight, model.head.fc.weight)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = cpubone.create_model("cpubone_nano").state_dict()
    with open(path, "wb") as f:
        pickle.dump({"state_dict": state, "extra": _Payload(marker)}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused to load.*execute arbitrary code"):
        cpubone.create_model("cpubone_nano", pretrained=path)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_pickled_code_in_a_torch_save_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    state = cpubone.create_model("cpubone_nano").state_dict()
    for legacy in (False, True):  # torch's zip format and its older pickle stream
        path = tmp_path / f"evil_{legacy}.pt"
        torch.save({"state_dict": state, "extra": _Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError) as e:
            cpubone.create_model("cpubone_nano", pretrained=path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: refused to load") and "GLOBAL" in msg and "system" in msg and "\n" not in msg
    assert not marker.exists()
    # the older format itself loads when it holds only tensors
    torch.save({"state_dict": state}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    other = cpubone.create_model("cpubone_nano", pretrained=tmp_path / "old.pt")
    assert torch.equal(other.head.fc.weight, state["head.fc.weight"])


@pytest.mark.parametrize("content, needle", [
    (np.random.default_rng(0).bytes(4096), "not a checkpoint: neither safetensors nor a file written by torch.save"),
    (b"", "not a checkpoint: the file is empty"),
    (b"hello, this is text\n", "not a checkpoint: neither safetensors nor a file written by torch.save"),
    (b"PK\x03\x04" + np.random.default_rng(1).bytes(200), "cannot read the checkpoint (truncated or corrupt?)"),
    (pickle.dumps({"w": [1.0, 2.0]}, protocol=4), "refused to load: a plain Python pickle, not a torch.save file"),
])
def test_files_that_are_no_checkpoint_fail_in_one_line_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        cpubone.create_model("cpubone_nano", pretrained=path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg


def test_broken_saved_config_names_the_file(tmp_path):
    save_pretrained(cpubone.create_model("cpubone_nano"), tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"d/config\.json: the saved model config is not valid JSON"):
        cpubone.create_model("cpubone_nano", pretrained=tmp_path / "d")


def test_truncated_files_fail_clearly(tmp_path):
    model = cpubone.create_model("cpubone_nano")
    torch.save(model.state_dict(), tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot read the checkpoint \(truncated or corrupt"):
        read_state_dict(tmp_path / "cut.pt")
    save_pretrained(model, tmp_path / "d")
    data = (tmp_path / "d" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        read_state_dict(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nothing.pt"):
        read_state_dict(tmp_path / "nothing.pt")


def test_wrong_variant_names_variant_and_keys():
    b1 = cpubone.create_model("cpubone_b1").state_dict()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(cpubone.create_model("cpubone_b0"), b1)
    msg = str(e.value)
    assert "does not fit cpubone_b0" in msg and "its shapes are those of cpubone_b1" in msg
    assert "stages.0.downsample.conv_exp.conv.weight: checkpoint (96, 8, 3, 3) vs model (64, 8, 3, 3)" in msg
    assert "unexpected keys" in msg and "stages.2.blocks.3." in msg


def test_missing_and_unexpected_keys_are_named():
    sd = cpubone.create_model("cpubone_nano").state_dict()
    sd.pop("head.pre_fc.weight")
    sd["head.surprise.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(cpubone.create_model("cpubone_nano"), sd)
    assert "1 missing keys:\n    head.pre_fc.weight" in str(e.value)
    assert "1 unexpected keys:\n    head.surprise.weight" in str(e.value)
    info = load_checkpoint(cpubone.create_model("cpubone_nano"), sd, strict=False)
    assert info["missing"] == ["head.pre_fc.weight"] and info["unexpected"] == ["head.surprise.weight"]


def test_unknown_layout():
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout.*conv1.weight"):
        load_checkpoint(cpubone.create_model("cpubone_nano"), {"conv1.weight": torch.zeros(1)})
