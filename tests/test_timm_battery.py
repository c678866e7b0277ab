"""A timm-style model battery over every released variant and a design config.

What timm's own model tests ask of a model in its registry, written for ours: forward and backward at
timm's test sizes (224 or the variant's input size forward, 128 backward), the default (pretrained)
config checked against the model, ``features_only`` through timm's feature wrappers (``getter``,
``list``, ``dict``, ``hook``, ``fx``), ``forward_intermediates``, torch.fx symbolic tracing and
``create_feature_extractor`` (torchvision's and timm's), TorchScript of the training and of the
inference form (``reparameterize``), and timm's entry-point arguments, also through timm's registry.
Every traced or scripted model is compared with eager, at 224, at 240 (odd maps from stage 3 on) and at
an odd, non-square size. The two largest variants (B2.5, B3) are checked at 64x64 / 65x67 to keep the
file fast on one core.
"""
from __future__ import annotations

import copy
import functools
import io
import math
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet
from timm.models._features_fx import FeatureGraphNet

import cpubone
from cpubone.models import VARIANTS, reparameterize

from conftest import trained_like

# a design that reaches what the released variants do not: stem blocks, an attention stage 2, unfused
# (MBConv) local blocks from 48 channels, a 3x3 stride-1 Lowtention projection in stage 4
DESIGN = dict(name="battery_design", base="cpubone_nano", depths=[1, 2, 1, 1, 1],
              attention=[False, True, True, True], attn_strides=[2, 2, 2, 1], kernel_sizes=[3, 3, 2, 3],
              fused_below_channels=48)
NAMES = list(VARIANTS) + ["design"]
LARGE = {"cpubone_b2_5", "cpubone_b3"}
BWD_SIZE = (128, 128)  # timm's backward test size

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")


def _build(name: str, **kwargs) -> nn.Module:
    return cpubone.create_model(dict(DESIGN) if name == "design" else name, **kwargs)


def _fwd_size(name: str) -> tuple:
    """The forward test size: the model's default input size (64x64 for the two largest)."""
    if name in LARGE:
        return (64, 64)
    return tuple(_trained(name).pretrained_cfg["input_size"][1:])


def _sizes(name: str) -> list:
    """Sizes for the traced/scripted parity checks: even, odd from stage 3 on, odd everywhere."""
    return [(64, 64), (65, 67)] if name in LARGE else [(224, 224), (240, 240), (97, 131)]


@functools.lru_cache(maxsize=None)
def _trained(name: str) -> nn.Module:
    """The model with trained-like norm statistics, in eval mode (shared: copy before changing it)."""
    torch.manual_seed(0)
    return trained_like(_build(name), seed=1)


@functools.lru_cache(maxsize=None)
def _inference(name: str) -> nn.Module:
    return reparameterize(_trained(name))


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=msg or None)


# --- forward / backward ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward(name):
    model = _trained(name)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *_fwd_size(name)))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()

    torch.manual_seed(0)
    model = _build(name).train()  # as timm tests: default rates (stochastic depth could drop a whole batch)
    out = model(torch.randn(2, 3, *BWD_SIZE))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.mean().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(params) == len(list(model.parameters())) > 0
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad[:5]}"
    # every weight matrix/kernel learns (a zero gradient would mean a branch is cut off)
    dead = [n for n, p in params if p.ndim > 1 and not p.grad.abs().sum() > 0]
    assert not dead, f"zero gradient for {dead[:5]}"


# --- default (pretrained) config --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_matches_the_model(name):
    model = copy.deepcopy(_trained(name))
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["architecture"] == ("battery_design" if name == "design" else name)
    if name != "design":
        assert cfg["hf_hub_id"] == VARIANTS[name].hf_hub_id
        assert cfg["input_size"] == VARIANTS[name].pretrained_input_size
    assert cfg["num_classes"] == model.num_classes == 1000
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0] == model.in_chans == 3
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    assert cfg["first_conv"] + ".weight" in model.state_dict()
    classifier = model.get_submodule(cfg["classifier"])
    assert classifier is model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert (classifier.in_features, classifier.out_features) == (model.head_hidden_size, 1000)
    assert cfg["pool_size"] == tuple(s // 32 for s in cfg["input_size"][1:])
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == cfg["input_size"] and data["crop_pct"] == cfg["crop_pct"]

    h, w = _fwd_size(name)
    x = torch.randn(1, 3, h, w)
    pool = (math.ceil(h / 32), math.ceil(w / 32))
    if name not in LARGE:
        assert pool == cfg["pool_size"]
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, model.num_features, *pool)
        assert model.num_features == model.feature_info[-1]["num_chs"]
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model(x).shape == (1, model.head_hidden_size, *pool)
        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7)
        assert model.get_submodule(cfg["classifier"]).out_features == 7


# --- features_only ------------------------------------------------------------------------------------
@pytest.mark.parametrize("feature_cls", ["getter", "list"])
@pytest.mark.parametrize("name", NAMES)
def test_features_only_through_timm_wrappers(name, feature_cls):
    torch.manual_seed(0)
    ref = _build(name).eval()
    torch.manual_seed(0)  # the same initial weights
    feats = _build(name, features_only=True, feature_cls=feature_cls).eval()
    assert type(feats) is {"getter": FeatureGetterNet, "list": FeatureListNet}[feature_cls]
    widths = [f["num_chs"] for f in ref.feature_info]
    assert feats.feature_info.channels() == widths
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    # the wrapper carries the model's pretrained config, less the classifier's entries (as timm's builder)
    cfg = feats.pretrained_cfg
    assert feats.default_cfg is cfg and "num_classes" not in cfg and "classifier" not in cfg
    assert {k: cfg[k] for k in ("input_size", "mean", "std", "first_conv")} == \
        {k: ref.pretrained_cfg[k] for k in ("input_size", "mean", "std", "first_conv")}
    assert feats.in_chans == 3
    h, w = (64, 64) if name in LARGE else (97, 131)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        outs = feats(x)
        expected = ref.forward_intermediates(x, intermediates_only=True)
    assert isinstance(outs, list) and len(outs) == 4
    for o, e, c, r in zip(outs, expected, widths, feats.feature_info.reduction(), strict=True):
        assert o.shape == (1, c, math.ceil(h / r), math.ceil(w / r))
        _close(o, e)
    # out_indices as timm reads them: a tuple of stages, or an int n for the last n
    torch.manual_seed(0)
    two = _build(name, features_only=True, feature_cls=feature_cls, out_indices=2).eval()
    assert two.feature_info.channels() == widths[2:]
    with torch.no_grad():
        for o, e in zip(two(x), expected[2:], strict=True):
            _close(o, e)


def test_every_timm_feature_class_and_the_default():
    torch.manual_seed(0)
    ref = _build("cpubone_nano").eval()
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    for feature_cls, kind in [(None, FeatureGetterNet), ("getter", FeatureGetterNet), ("list", FeatureListNet),
                              ("dict", FeatureDictNet), ("hook", FeatureHookNet), ("fx", FeatureGraphNet),
                              ("LIST", FeatureListNet), (FeatureListNet, FeatureListNet)]:
        torch.manual_seed(0)
        feats = _build("cpubone_nano", features_only=True, feature_cls=feature_cls, out_indices=(1, -1)).eval()
        assert type(feats) is kind, feature_cls
        assert feats.feature_info.channels() == [48, 192] and feats.feature_info.reduction() == [8, 32]
        assert "first_conv" in feats.pretrained_cfg and "classifier" not in feats.default_cfg
        with torch.no_grad():
            outs = feats(x)
        outs = list(outs.values()) if isinstance(outs, dict) else outs
        assert len(outs) == 2, feature_cls
        for o, e in zip(outs, expected, strict=True):
            _close(o, e, msg=str(feature_cls))
    with pytest.raises(ValueError, match="feature_cls='nope'"):
        _build("cpubone_nano", features_only=True, feature_cls="nope")
    with pytest.raises(ValueError, match="only used with features_only=True"):
        _build("cpubone_nano", feature_cls="list")


# --- forward_intermediates ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_equal_forward_features(name):
    model = _trained(name)
    h, w = _fwd_size(name)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        only = model.forward_intermediates(x, intermediates_only=True)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0, -3], stop_early=True, intermediates_only=True)
        logits = model.forward_head(final)
        eager = model(x)
    assert torch.equal(final, feats) and torch.equal(inter[-1], feats)
    assert len(inter) == len(only) == 4
    for a, b, info in zip(inter, only, model.feature_info, strict=True):
        assert torch.equal(a, b)
        r = info["reduction"]
        assert a.shape == (1, info["num_chs"], math.ceil(h / r), math.ceil(w / r))
    assert len(last2) == 2 and all(torch.equal(a, b) for a, b in zip(last2, inter[2:], strict=True))
    assert len(early) == 2 and torch.equal(early[0], inter[0]) and torch.equal(early[1], inter[1])
    assert torch.equal(logits, eager)


# --- torch.fx ------------------------------------------------------------------------------------------
def _leaf_calls(gm: torch.fx.GraphModule) -> set:
    return {getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_and_feature_extractors_equal_eager(name):
    from timm.layers import create_feature_extractor as timm_extractor
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model, inference = _trained(name), _inference(name)
    gm = torch.fx.symbolic_trace(model)
    gi = torch.fx.symbolic_trace(inference)
    # the size-dependent steps are leaves, so the graph takes eager's branch at every size
    assert {"pad_to_stride", "crop_to", "attention"} <= _leaf_calls(gm)
    assert {"pad_to_stride", "crop_to"} <= _leaf_calls(gi)
    _, eval_nodes = get_graph_node_names(model)
    last = eval_nodes[-1]
    nodes = {"stages.0": "s0", "stages.2": "s2", "stages.3": "s3", last: "out"}
    tv = create_feature_extractor(model, return_nodes=nodes)
    tm = timm_extractor(model, return_nodes=list(nodes))
    for h, w in _sizes(name):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            final, ref_inter = model.forward_intermediates(x)
            ref = model.forward_head(final)  # model(x), one pass
            ref_inf = inference(x)
            got_tv, got_tm = tv(x), tm(x)
            _close(gm(x), ref, f"fx at {h}x{w}")
            _close(gi(x), ref_inf, f"fx inference form at {h}x{w}")
        _close(got_tv["out"], ref, f"torchvision extractor at {h}x{w}")
        _close(got_tm[last], ref, f"timm extractor at {h}x{w}")
        for key, idx in (("s0", 0), ("s2", 2), ("s3", 3)):
            _close(got_tv[key], ref_inter[idx], f"{key} at {h}x{w}")
            _close(got_tm[f"stages.{idx}"], ref_inter[idx], f"{key} at {h}x{w}")


@pytest.mark.parametrize("name", ["cpubone_nano", "cpubone_b1", "design"])
def test_fx_training_graph_matches_eager_and_backpropagates(name):
    torch.manual_seed(0)
    model = _build(name, drop_path_rate=0.1).train()
    gm = torch.fx.symbolic_trace(model)
    for h, w in (BWD_SIZE, (97, 131)):
        x = torch.randn(2, 3, h, w)
        torch.manual_seed(1)
        ref = model(x)
        torch.manual_seed(1)  # the same dropout and stochastic-depth draws
        out = gm(x)
        _close(out, ref, f"training graph at {h}x{w}")
    model.zero_grad(set_to_none=True)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient through the fx graph for {missing[:5]}"


# --- TorchScript ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_torchscript_training_and_inference_forms_equal_eager(name):
    model, inference = _trained(name), _inference(name)
    scripted = torch.jit.script(model)
    scripted_inf = torch.jit.script(inference)
    for h, w in _sizes(name):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            ref, ref_inf = model(x), inference(x)
            _close(scripted(x), ref, f"scripted training form at {h}x{w}")
            _close(scripted_inf(x), ref_inf, f"scripted inference form at {h}x{w}")
        torch.testing.assert_close(ref_inf, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["cpubone_nano", "design"])
def test_torchscript_trains_saves_and_loads(name):
    torch.manual_seed(0)
    model = _build(name, proj_drop_rate=0.0).train()
    twin = copy.deepcopy(model)
    scripted = torch.jit.script(twin)
    x = torch.randn(2, 3, 97, 131)
    ref = model(x)
    out = scripted(x)
    _close(out, ref, "scripted training-mode forward")
    ref.mean().backward()
    out.mean().backward()
    for (n, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert b.grad is not None, n
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
    # both forms survive torch.jit.save / load: no Python callbacks are left in them
    # (the crop pad mode turns the 2x2 "same" pads into a conv pad plus a crop)
    inference = reparameterize(trained_like(_build(name), seed=2), pad_mode="crop")
    x = torch.randn(1, 3, 65, 67)
    for form in (trained_like(_build(name), seed=2), inference):
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(form), buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        with torch.no_grad():
            _close(loaded(x), form(x))


# --- timm's entry-point arguments ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpubone_nano", "design"])
def test_entry_point_arguments(name):
    # what timm.create_model passes to every entry point, unset
    model = _build(name, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None)
    assert isinstance(model, cpubone.CPUBone) and model.num_classes == 1000
    base = model.pretrained_cfg

    model = _build(name, num_classes=10, in_chans=1, drop_rate=0.25, drop_path_rate=0.2, global_pool="")
    assert model.num_classes == 10 and model.pretrained_cfg["num_classes"] == 10
    assert model.in_chans == 1 and model.get_submodule(base["first_conv"]).in_channels == 1
    assert model.head.drop.p == 0.25
    assert max(m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath") == pytest.approx(0.2)
    assert model.eval()(torch.randn(1, 1, 64, 96)).shape == (1, 10, 2, 3)  # global_pool='': dense logits
    with pytest.raises(ValueError, match="global_pool='max'"):
        _build(name, global_pool="max")

    over = _build(name, pretrained_cfg_overlay=dict(crop_pct=1.0, license="other")).pretrained_cfg
    assert over["crop_pct"] == 1.0 and over["license"] == "other"
    assert {k: v for k, v in over.items() if k not in ("crop_pct", "license")} == \
        {k: v for k, v in base.items() if k not in ("crop_pct", "license")}
    as_dict = _build(name, pretrained_cfg=dict(mean=[0.5, 0.5, 0.5], std=(0.5, 0.5, 0.5))).pretrained_cfg
    assert as_dict["mean"] == as_dict["std"] == (0.5, 0.5, 0.5) and as_dict["first_conv"] == base["first_conv"]
    assert _build(name, pretrained_cfg="r224_in1k").pretrained_cfg["tag"] == "r224_in1k"
    # a timm PretrainedCfg: its class count and input channels are the model's defaults, as in timm
    cfg = timm.models.PretrainedCfg(num_classes=5, input_size=(1, 160, 160), crop_pct=0.9)
    model = _build(name, pretrained_cfg=cfg, pretrained_cfg_overlay=dict(crop_pct=0.8))
    assert model.num_classes == 5 and model.in_chans == 1
    assert model.pretrained_cfg["input_size"] == (1, 160, 160) and model.pretrained_cfg["crop_pct"] == 0.8
    assert model.pretrained_cfg["classifier"] == base["classifier"]
    with pytest.raises(ValueError, match="pretrained_cfg=3"):
        _build(name, pretrained_cfg=3)


def _hf_cache(root, repo_id: str, state: dict) -> None:
    """A Hugging Face cache holding ``repo_id``'s model.safetensors, laid out as huggingface_hub does."""
    commit = "0" * 40
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))


def _random_timm_nano(seed: int) -> nn.Module:
    """timm's cpubone_nano (the layout of the published weights) with random weights, in eval mode."""
    ref = timm.create_model("cpubone_nano")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if t.ndim == 1 else 0.0))
    return ref.eval()


def test_cache_dir_reaches_the_hub_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    published, other = _random_timm_nano(1), _random_timm_nano(2)
    _hf_cache(tmp_path / "cache", VARIANTS["cpubone_nano"].hf_hub_id, published.state_dict())
    _hf_cache(tmp_path / "cache", "someone/nano_weights", other.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model = cpubone.create_model("cpubone_nano", pretrained=True, cache_dir=tmp_path / "cache").eval()
        _close(model(x), published(x))
        # the weights are found only where cache_dir says, not in the default cache
        with pytest.raises(cpubone.CheckpointError, match="timm/cpubone_nano.r224_in1k"):
            cpubone.create_model("cpubone_nano", pretrained=True)
        # a pretrained config's hf_hub_id names the repository to load
        model = cpubone.create_model("cpubone_nano", pretrained=True, cache_dir=str(tmp_path / "cache"),
                                     pretrained_cfg_overlay=dict(hf_hub_id="someone/nano_weights")).eval()
        assert model.pretrained_cfg["hf_hub_id"] == "someone/nano_weights"
        _close(model(x), other(x))


def test_weight_sources_of_pretrained_cfg(tmp_path):
    ref = _random_timm_nano(3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        for overlay in (dict(file=str(path)), dict(state_dict=ref.state_dict())):
            model = cpubone.create_model("cpubone_nano", pretrained=True, pretrained_cfg_overlay=overlay).eval()
            _close(model(x), expected, str(list(overlay)))
            assert "state_dict" not in model.pretrained_cfg
        design = cpubone.create_model(dict(name="nano_copy", base="cpubone_nano"), pretrained=True,
                                      pretrained_cfg=dict(file=str(path))).eval()
        _close(design(x), expected, "design config with a pretrained_cfg file")


# --- through timm's registry ---------------------------------------------------------------------------
@pytest.fixture
def registered():
    """Our nano and the design registered as timm entry points (removed afterwards)."""
    from timm.models import _registry

    names = {"cpubone_battery_nano": "cpubone_nano", "cpubone_battery_design": "design"}
    for entry, name in names.items():
        def fn(pretrained=False, _name=name, **kwargs):
            return _build(_name, pretrained=pretrained, **kwargs)
        fn.__name__ = entry
        fn.__module__ = __name__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timm.models.register_model(fn)
    yield list(names)
    for entry in names:
        _registry._model_entrypoints.pop(entry, None)
        _registry._model_to_module.pop(entry, None)
        for models in _registry._module_to_models.values():
            models.discard(entry)


def test_timm_create_model_with_entry_point_arguments(registered, tmp_path):
    for entry in registered:
        model = timm.create_model(entry, pretrained=False, cache_dir=tmp_path, num_classes=3, drop_rate=0.1,
                                  drop_path_rate=0.1, pretrained_cfg_overlay=dict(crop_pct=1.0))
        assert isinstance(model, cpubone.CPUBone) and model.num_classes == 3
        assert model.pretrained_cfg["crop_pct"] == 1.0
        tagged = timm.create_model(entry + ".r224_in1k")
        assert tagged.pretrained_cfg["tag"] == "r224_in1k"
        for feature_cls, kind in (("getter", FeatureGetterNet), ("list", FeatureListNet), ("fx", FeatureGraphNet)):
            feats = timm.create_model(entry, features_only=True, feature_cls=feature_cls, out_indices=(2, 3))
            assert type(feats) is kind and feats.feature_info.reduction() == [16, 32]
            assert [o.shape[-1] for o in feats(torch.randn(1, 3, 64, 96))] == [6, 3]
            assert "classifier" not in feats.default_cfg
        data = timm.data.resolve_data_config(model=timm.create_model(entry))
        assert data["crop_pct"] == 0.95 and data["input_size"] == (3, 224, 224)
