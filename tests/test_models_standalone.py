"""The models package stands alone, and each block carries its own inference form (``fuse()``)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cpubone.models
from cpubone.models import ConvAct, ConvNormAct, CPUBoneBlock, FusedMBConv, Lowtention, LowtentionInference, create_model

from conftest import trained_like

MODELS_DIR = Path(cpubone.models.__file__).parent


def _outside_imports(path: Path) -> list:
    """``import`` statements in ``path`` (anywhere, lazy ones included) that reach cpubone outside models."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 2 or (node.level == 0 and (node.module or "").split(".")[0] == "cpubone"
                                   and not (node.module or "").startswith("cpubone.models")):
                bad.append(f"{path.name}:{node.lineno}: from {'.' * node.level}{node.module or ''} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cpubone" and not alias.name.startswith("cpubone.models"):
                    bad.append(f"{path.name}:{node.lineno}: import {alias.name}")
    return bad


def test_models_package_imports_nothing_else_from_cpubone():
    files = sorted(MODELS_DIR.glob("*.py"))
    assert {"layers.py", "cpubone.py", "factory.py"} <= {f.name for f in files}
    bad = [b for f in files for b in _outside_imports(f)]
    assert not bad, "cpubone.models must not import the rest of cpubone:\n" + "\n".join(bad)


def test_ast_scan_catches_a_lazy_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def fuse(self):\n    from ..models.reparam import reparameterize\n    import cpubone.deploy\n")
    assert len(_outside_imports(module)) == 2


def test_models_in_use_load_no_other_cpubone_module():
    # what actually gets imported while building, fusing and saving a model (lazy imports included)
    code = (
        "import sys, json, tempfile, torch\n"
        "import cpubone.models as m\n"
        "model = m.create_model('cpubone_nano', num_classes=3)\n"
        "d = tempfile.mkdtemp()\n"
        "m.save_pretrained(model, d)\n"
        "m.load_checkpoint(model, d)\n"
        "model.fuse()(torch.randn(1, 3, 33, 47))\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] == 'cpubone')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    # the package root (a lazy-attribute __init__) is imported with any subpackage
    outside = [k for k in loaded if k not in ("cpubone", "cpubone._lazy") and not k.startswith("cpubone.models")]
    assert "cpubone.models.layers" in loaded and not outside, outside


def _compare(block: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (block(x) - fused(x)).abs().max().item()


@pytest.mark.parametrize("kernel_size,stride,groups", [(3, 2, 1), (2, 1, 8), (2, 2, 8), (1, 1, 2)])
@pytest.mark.parametrize("pad_mode", ["pad", "crop"])
def test_conv_norm_act_fuse(kernel_size, stride, groups, pad_mode):
    block = trained_like(ConvNormAct(8, 16, kernel_size, stride, groups=groups))
    fused = block.fuse(pad_mode)
    assert isinstance(fused, ConvAct) and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert isinstance(block.norm, nn.BatchNorm2d)  # the training form is left as it was
    assert fused.crop == (pad_mode == "crop" and kernel_size == 2 and stride == 1)
    # 8 in-channels in 2 groups (4 per group) is below densify_below=16: dense block-diagonal weights
    assert fused.conv.groups == (1 if groups == 2 else groups)
    assert block.fuse(densify_below=0).conv.groups == groups
    for hw in [(9, 9), (10, 13)]:
        assert _compare(block, fused, torch.randn(2, 8, *hw)) <= 1e-5


@pytest.mark.parametrize("stride", [1, 2])
def test_lowtention_fuse(stride):
    attn = trained_like(Lowtention(64, stride=stride))
    fused = attn.fuse()
    assert isinstance(fused, LowtentionInference)
    for hw in [(8, 8), (7, 9)]:
        assert _compare(attn, fused, torch.randn(2, 64, *hw)) <= 1e-5


def test_block_fuse_folds_only_the_mlp_norm_affine():
    block = trained_like(CPUBoneBlock(48))
    x = torch.randn(1, 48, 7, 9)
    with torch.no_grad():
        ref = block(x)
        assert block.fuse() is block
        assert not block.norm2.affine and block.norm1.affine  # Lowtention zero-pads: its norm keeps the shift
        assert block.fuse() is block and (block(x) - ref).abs().max() <= 1e-5  # idempotent


def test_timm_reparameterize_model_uses_the_block_hooks():
    # timm's walker replaces every child that has fuse() by child.fuse(): the same inference form
    from timm.utils import reparameterize_model

    model = trained_like(create_model("cpubone_nano"))
    fused = reparameterize_model(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, ConvNormAct, Lowtention)) for m in fused.modules())
    assert isinstance(fused.stages[0].downsample, FusedMBConv)
    x = torch.randn(1, 3, 65, 67)
    with torch.no_grad():
        out = fused(x)
        assert (out - model(x)).abs().max() <= 1e-5
        assert torch.equal(out, model.fuse()(x))  # CPUBone.fuse: the same rewrite, plus dropout removed
