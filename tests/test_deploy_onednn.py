"""The eager oneDNN form (cpubone.deploy.onednn): same outputs as the training form, fused post-ops."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

from cpubone import VARIANTS, create_model
from cpubone.deploy import onednn
from cpubone.deploy.onednn import OneDNNConv, to_onednn
from cpubone.deploy.reparam import ConvAct, reparameterize

from conftest import trained_like


@pytest.mark.parametrize("name", list(VARIANTS))
def test_onednn_form_matches_training_form(name):
    model = trained_like(create_model(name))
    fast = to_onednn(reparameterize(model), input_size=(64, 64))
    assert not any(isinstance(m, (ConvAct, nn.Conv2d)) for m in fast.modules())
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        # 64x64 is the size the weights were laid out for; the others make oneDNN re-lay them out
        for hw in [(64, 64), (33, 47), (97, 97)]:
            x = torch.randn(1, 3, *hw, generator=g)
            ref = model(x)
            assert (fast(x) - ref).abs().max().item() <= 1e-5, (name, hw)  # NCHW in: the stem converts
            xc = x.contiguous(memory_format=torch.channels_last)
            assert (fast(xc) - ref).abs().max().item() <= 1e-5, (name, hw)


def test_onednn_post_ops_fused_and_model_still_a_module():
    model = trained_like(create_model("cpubone_t0"))
    inference = reparameterize(model, pad_mode="crop")
    numel = sum(t.numel() for t in inference.state_dict().values())
    fast = to_onednn(inference, input_size=(64, 64))
    # the dense weights stay registered (the opaque packed copies are not in the state_dict), so it saves
    assert sum(t.numel() for t in fast.state_dict().values()) == numel
    torch.save(fast.state_dict(), io.BytesIO())
    convs = [m for m in fast.modules() if isinstance(m, OneDNNConv)]
    assert convs[0].to_channels_last and not any(c.to_channels_last for c in convs[1:])
    assert any(c.crop for c in convs)
    block = fast.stages[2].blocks[0]
    # the MLP's exact GELU runs as fc1's post-op, Hardswish as the expansion conv's
    assert (block.mlp.fc1.attr, block.mlp.fc1.algorithm) == ("gelu", "none")
    assert isinstance(block.mlp.act, nn.Identity)
    assert block.local.conv_exp.attr == "hardswish" and block.local.conv_pwl.attr == "none"
    x = torch.randn(1, 3, 45, 61)
    with torch.inference_mode():
        ref = model(x)
        assert (fast(x) - ref).abs().max() <= 1e-5
        clone = copy.deepcopy(fast)  # the packed weights are rebuilt, not copied
        assert (clone(x) - ref).abs().max() <= 1e-5


def test_onednn_keeps_unfusable_activation_and_rejects_training_form():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    net = nn.Sequential(ConvAct(conv, nn.SiLU()), ConvAct(nn.Conv2d(16, 4, 2), nn.Hardswish(), pad=(1, 0, 1, 0)))
    x = torch.randn(1, 8, 9, 11)
    with torch.inference_mode():
        ref = net(x)
        fast = to_onednn(copy.deepcopy(net), input_size=(9, 11))
        assert isinstance(fast[0], nn.Sequential) and isinstance(fast[0][1], nn.SiLU)
        assert fast[1].pad == (1, 0, 1, 0) and fast[1].attr == "hardswish"
        assert (fast(x) - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="reparameterize"):
        to_onednn(create_model("cpubone_nano"))
    assert onednn.onednn_available()
