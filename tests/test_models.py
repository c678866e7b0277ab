"""The CPUBone family: exact params and MACs, any input size, timm's model API."""
import pytest
import torch
import torch.nn as nn

import cpubone
from cpubone.models.macs import count_macs, count_params
from cpubone.models import VARIANTS, FusedMBConv, GrFuMBConv, GrMBConv, Lowtention, MBConv, CPUBoneBlock
from cpubone.models import ResolvedName, is_cpubone, resolve_model_name
from cpubone.models.layers import ConvNormAct, lowtention_heads

ALL = list(VARIANTS)


def test_list_models():
    assert cpubone.list_models() == ALL
    assert cpubone.list_models("cpubone_b*") == ["cpubone_b0", "cpubone_b1", "cpubone_b2", "cpubone_b2_5", "cpubone_b3"]


@pytest.mark.parametrize("name", ALL)
def test_params_and_macs_match_release(name):
    model = cpubone.create_model(name)
    cfg = VARIANTS[name]
    assert count_params(model) == cfg.params
    macs = count_macs(model, 224).total
    assert abs(macs - cfg.macs) / cfg.macs < 1e-3


def test_mac_counter_counts_a_conv_exactly():
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False)
    # 16 outputs x (8/2 inputs x 9 taps) per position, 10x12 positions
    assert count_macs(conv, (8, 10, 12)).total == 16 * 4 * 9 * 10 * 12


@pytest.mark.parametrize("size", [(224, 224), (240, 240), (256, 256), (320, 240), (513, 513), (33, 33), (97, 131), (50, 35)])
def test_every_variant_runs_any_size_eval(size):
    x = torch.randn(1, 3, *size)
    for name in ALL:
        model = cpubone.create_model(name).eval()
        with torch.inference_mode():
            out = model(x)
        assert out.shape == (1, 1000) and torch.isfinite(out).all(), name
        feats = model.forward_intermediates(x, intermediates_only=True)
        # stage maps have ceil(size / stride) rows and columns
        for f, stride in zip(feats, (4, 8, 16, 32)):
            assert tuple(f.shape[-2:]) == tuple(-(-s // stride) for s in size), (name, f.shape)


@pytest.mark.parametrize("size", [(224, 224), (240, 240), (256, 256), (320, 240), (513, 513), (33, 33), (97, 131)])
def test_every_variant_trains_any_size(size):
    torch.manual_seed(0)  # DropPath may drop a whole branch of a tiny batch: fixed draws keep this deterministic
    x = torch.randn(1 if size[0] > 320 else 2, 3, *size)
    for name in ALL:
        model = cpubone.create_model(name, num_classes=7, drop_path_rate=0.1).train()
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        # the stem and the last stage both receive gradient
        assert model.stem.conv.conv.weight.grad.abs().sum() > 0
        assert model.stages[-1].blocks[-1].attn.qkv.weight.grad.abs().sum() > 0


def test_grad_checkpointing_at_513():
    model = cpubone.create_model("cpubone_b0", num_classes=3)
    model.set_grad_checkpointing(True)
    model(torch.randn(1, 3, 513, 513)).sum().backward()
    assert torch.isfinite(model.stem.conv.conv.weight.grad).all()


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = cpubone.create_model("cpubone_nano").train()
    b = cpubone.create_model("cpubone_nano").train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)  # same dropout masks in both runs
    a(x).sum().backward()
    torch.manual_seed(1)
    b(x).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_timm_api():
    model = cpubone.create_model("cpubone_b0").eval()
    x = torch.randn(1, 3, 96, 96)
    assert [f["num_chs"] for f in model.feature_info] == [32, 64, 128, 256]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    feats = model.forward_features(x)
    assert feats.shape == (1, 256, 3, 3) and model.num_features == 256
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, 1600) and model.head_hidden_size == 1600
    torch.testing.assert_close(model.forward_head(feats), model.head.fc(pre))
    final, inter = model.forward_intermediates(x, indices=[1, 3])
    assert [t.shape[1] for t in inter] == [64, 256]
    torch.testing.assert_close(final, feats)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (1, 1600)
    model.reset_classifier(4, global_pool="")
    assert model(x).shape == (1, 4, 3, 3)  # dense logits
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 0.95 and cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
    from timm.data import resolve_data_config
    assert resolve_data_config(model=model)["crop_pct"] == 0.95


def test_features_only():
    fx = cpubone.create_model("cpubone_t0", features_only=True, out_indices=(1, 2, 3)).eval()
    assert fx.feature_info.channels() == [48, 96, 192]
    assert fx.feature_info.reduction() == [8, 16, 32]
    outs = fx(torch.randn(1, 3, 128, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 48, 16, 12), (1, 96, 8, 6), (1, 192, 4, 3)]


def test_create_model_options():
    m = cpubone.create_model("cpubone_nano", num_classes=10, in_chans=1, drop_rate=0.2, drop_path_rate=0.1)
    assert m.num_classes == 10 and m(torch.randn(2, 1, 40, 40)).shape == (2, 10)
    assert m.head.drop.p == 0.2
    dps = [mod.drop_prob for mod in m.modules() if type(mod).__name__ == "DropPath"]
    assert dps and max(dps) == pytest.approx(0.1)


def test_timm_names_pass_through():
    m = cpubone.create_model("resnet10t", num_classes=3)
    assert type(m).__module__.startswith("timm.") and m(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    t = cpubone.create_model("timm/cpubone_nano")
    assert type(t).__module__ == "timm.models.cpubone"
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        cpubone.create_model("no_such_net")


def test_one_resolver_for_model_names():
    assert resolve_model_name("cpubone_b0") == ResolvedName("cpubone", "cpubone_b0")
    assert resolve_model_name("cpubone_b0.r224_in1k") == ResolvedName("cpubone", "cpubone_b0")  # tag: same model
    # the prefix forces timm, also for names we have a variant of
    assert resolve_model_name("timm/cpubone_nano") == ResolvedName("timm", "cpubone_nano")
    assert resolve_model_name("timm/cpubone_b0_bfrobust") == ResolvedName("timm", "cpubone_b0_bfrobust")
    assert resolve_model_name("resnet50.a1_in1k") == ResolvedName("timm", "resnet50.a1_in1k")
    assert is_cpubone("cpubone_t0") and not is_cpubone("timm/cpubone_t0") and not is_cpubone("resnet18")
    for bad, needle in [("no_such_net", "unknown model 'no_such_net': not a CPUBone variant (cpubone_nano, "),
                        ("timm/cpubone_b0", "unknown model 'timm/cpubone_b0': timm has no model 'cpubone_b0'"),
                        ("timm/", "unknown model 'timm/'"), ("", "got ''"), (None, "got None"), (3, "got 3")]:
        with pytest.raises(ValueError) as e:
            resolve_model_name(bad)
        assert needle in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ValueError, match="must be a non-empty string|unknown model"):
            cpubone.create_model(bad)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(in_chans=0), "in_chans=0: the number of input channels must be a positive integer"),
    (dict(in_chans=-3), "in_chans=-3"),
    (dict(in_chans=1.5), "in_chans=1.5"),
    (dict(num_classes=-1), "num_classes=-1: must be a positive integer, or 0 for no classifier"),
    (dict(features_only=True, out_indices=()), "out_indices=(): name at least one stage"),
    (dict(features_only=True, out_indices=0), "out_indices=0: an int n takes the last n stages"),
    (dict(features_only=True, out_indices=5), "out_indices=5: cpubone_nano has 4 stages, so the last n can be 1 to 4"),
    (dict(features_only=True, out_indices=(1, 4)), "4 is out of range"),
    (dict(features_only=True, out_indices=(-5,)), "-5 is out of range"),
    (dict(features_only=True, out_indices=(2, 2)), "a stage is named twice"),
    (dict(features_only=True, out_indices=(1.0, 2)), "stage indices must be integers"),
    (dict(out_indices=(1, 2)), "only used with features_only=True"),
])
@pytest.mark.parametrize("name", ["cpubone_nano", "timm/cpubone_nano"])
def test_impossible_model_arguments_fail_in_one_line(name, kwargs, needle):
    if name.startswith("timm/") and "cpubone_nano has 4 stages" in needle:
        needle = "does not fit the feature stages of cpubone_nano"  # timm's own check, reworded
    if name.startswith("timm/") and "out of range" in needle:
        needle = "does not fit the feature stages of cpubone_nano"
    with pytest.raises(ValueError) as e:
        cpubone.create_model(name, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_features_only_int_takes_the_last_stages_as_timm_does():
    import timm

    ours = cpubone.create_model("cpubone_nano", features_only=True, out_indices=2).eval()
    ref = timm.create_model("cpubone_nano", features_only=True, out_indices=2)
    assert ours.feature_info.reduction() == ref.feature_info.reduction() == [16, 32]
    assert [tuple(o.shape) for o in ours(torch.randn(1, 3, 64, 64))] == [(1, 96, 4, 4), (1, 192, 2, 2)]
    negative = cpubone.create_model("cpubone_nano", features_only=True, out_indices=(-2, -1))
    assert negative.feature_info.reduction() == [16, 32]
    assert cpubone.create_model("cpubone_nano", num_classes=0)(torch.randn(1, 3, 64, 64)).shape == (1, 1600)


# --- building blocks ---------------------------------------------------------------------------
def test_conv_2x2_same_padding():
    conv = ConvNormAct(1, 1, 2, 1, norm_layer=None, act_layer=None)
    assert conv.pad == (1, 0, 1, 0)
    nn.init.ones_(conv.conv.weight)
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    y = conv(x)
    assert y.shape == x.shape
    # top-left output sees only x[0,0] (zero pad left and top); bottom-right sums the last 2x2 window
    assert y[0, 0, 0, 0] == 1 and y[0, 0, 2, 2] == 5 + 6 + 8 + 9
    down = ConvNormAct(1, 1, 2, 2, norm_layer=None, act_layer=None)
    assert down.pad is None and down(torch.randn(1, 1, 8, 6)).shape == (1, 1, 4, 3)
    with pytest.raises(ValueError, match="kernel_size=4"):
        ConvNormAct(1, 1, 4)


def test_grouped_blocks_are_the_paper_blocks():
    gf, f = GrFuMBConv(64, 64, kernel_size=3), FusedMBConv(64, 64, kernel_size=3)
    assert gf.conv_exp.conv.groups == 2 and f.conv_exp.conv.groups == 1
    gm = GrMBConv(256, 256, kernel_size=2)
    assert gm.conv_pw.conv.groups == 2 and gm.conv_dw.conv.groups == 1024
    x = torch.randn(1, 64, 14, 14)
    assert gf(x).shape == x.shape and gm(torch.randn(1, 256, 7, 7)).shape == (1, 256, 7, 7)
    ratio = count_macs(gf, (64, 14, 14)).total / count_macs(f, (64, 14, 14)).total
    assert ratio == pytest.approx(0.55, abs=1e-9)
    assert not FusedMBConv(32, 64, stride=2).has_skip and GrFuMBConv(32, 32).has_skip


def test_fused_below_channels_rule():
    assert isinstance(CPUBoneBlock(128).local, FusedMBConv)
    assert isinstance(CPUBoneBlock(256).local, MBConv)
    assert isinstance(CPUBoneBlock(128, fused_below_channels=64).local, MBConv)
    model = cpubone.create_model("cpubone_b0")
    kinds = [type(b.local).__name__ for s in model.stages[2:] for b in s.blocks]
    assert kinds == ["FusedMBConv"] * 3 + ["MBConv"] * 4


def test_lowtention_heads_rule_and_attention():
    assert lowtention_heads(96) == (1, 48)
    assert lowtention_heads(192) == (3, 32)
    assert lowtention_heads(224) == (3, 37)
    assert lowtention_heads(512) == (8, 32)
    attn = Lowtention(64, stride=2).eval()
    x = torch.randn(1, 64, 9, 7)  # odd size: padded projection, cropped output
    y = attn(x)
    assert y.shape == x.shape
    # reference: explicit softmax attention on the projected map
    with torch.no_grad():
        p = attn.qkv(attn.proj(nn.functional.pad(x, (0, 1, 0, 1))))
        B, _, h, w = p.shape
        qkv = p.reshape(B, attn.num_heads, 3 * attn.head_dim, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, -1)
        a = (q @ k.transpose(-1, -2) / attn.head_dim ** 0.5).softmax(-1) @ v
        o = attn.out(a.transpose(-1, -2).reshape(B, -1, h, w))
        ref = o.repeat_interleave(2, 2).repeat_interleave(2, 3)[..., :9, :7]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
