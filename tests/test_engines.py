"""The engine layer: every runtime reproduces the training form in fp32, loads its own file back (without
torch where it can), runs low precision close to fp32 on a trained model, and names its missing extra."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from cpubone.preprocess import PreprocessConfig
from cpubone.engines import (ENGINES, EngineError, MissingExtraError, engine_class,
                             engine_for_file, get_engine, inference_form, load_artifact, parse_engines,
                             parse_precisions)
from cpubone.engines.verify import EngineVerificationError, agreement, torch_reference, verification_inputs, verify_fp32
from cpubone.models import create_model

from conftest import trained_like

SIZE = 64
SHAPE = (1, 3, SIZE, SIZE)
FP32 = [e for e in ENGINES if e != "litert"] + ["litert"]


def _installed(name, for_load=False):
    if not engine_class(name).available(for_load):
        where = "; its conversion runs in .venv-mobile: make test-mobile" if name == "litert" else ""
        pytest.skip(f"{name} not installed here ({', '.join(engine_class(name).missing(for_load))}); "
                    f"its missing-extra error is tested below{where}")


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    model = trained_like(create_model("cpubone_nano"))
    return model, inference_form(model)


@pytest.fixture(scope="module")
def inputs():
    return verification_inputs(PreprocessConfig(input_size=(3, SIZE, SIZE)))


@pytest.fixture(scope="module")
def fp32_runners(nano, tmp_path_factory):
    """Each installed engine's fp32 runner of nano at 64x64, prepared once (conversions are the slow part)."""
    cache = {}

    def get(name):
        if name not in cache:
            _installed(name)
            cache[name] = get_engine(name).prepare(nano[1], SHAPE, "fp32", workdir=tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", FP32)
def test_fp32_matches_training_form_and_reloads(name, nano, inputs, fp32_runners):
    runner = fp32_runners(name)
    checks = verify_fp32(runner, nano[0], inputs)
    assert len(checks) == len(inputs) and all(c.top1_agree for c in checks)
    assert runner.describe()["engine"] == name and runner.describe()["precision"] == "fp32"
    batch = np.concatenate([x for _, x in inputs[:3]])
    out = runner(batch)  # a batch runs sample by sample
    assert out.shape == (3, 1000)
    np.testing.assert_allclose(out, torch_reference(nano[0])(batch), atol=1e-4 * max(1, np.abs(out).max()))
    if name == "executorch":  # xnnpack_form leaves nothing to the portable kernels: one XNNPACK partition
        assert runner.describe()["partitions"] == 1 and runner.describe()["portable_ops"] == {}
    if runner.artifact is not None:
        assert engine_for_file(runner.artifact) == name
        again = load_artifact(runner.artifact)
        np.testing.assert_array_equal(again(inputs[1][1]), runner(inputs[1][1]))


@pytest.mark.parametrize("size", [(64, 64), (45, 71)])
def test_xnnpack_form_computes_the_inference_form(nano, size):
    """GroupNorm, Lowtention's output conv + nearest upsample and the head's LayerNorm, rewritten into
    XNNPACK's ops, compute the same logits and features (odd sizes: padded and cropped as before)."""
    from timm.layers import GroupNorm1

    from cpubone.engines.xnnpack_form import (GroupNormAsMeans, LowtentionTransposedOut, PooledHeadAsConvs,
                                              xnnpack_form)

    form = nano[1]
    xnn = xnnpack_form(form)
    kinds = {type(m) for m in xnn.modules()}
    assert {GroupNormAsMeans, LowtentionTransposedOut, PooledHeadAsConvs} <= kinds
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in xnn.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in form.modules())  # the form itself is untouched
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref, out = form(x), xnn(x)
        feats = form.forward_features(x)
        pre_ref, pre = form.forward_head(feats, pre_logits=True), xnn.forward_head(feats, pre_logits=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    np.testing.assert_allclose(pre, pre_ref, rtol=0, atol=1e-4 * pre_ref.abs().max().item())
    y = torch.randn(2, 24, 5, 3) * 3 + torch.arange(24.0)[:, None, None]  # groups with different statistics
    for norm in (GroupNorm1(24, eps=1e-5), torch.nn.GroupNorm(4, 24), torch.nn.GroupNorm(24, 24, affine=False)):
        if norm.weight is not None:
            torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
        np.testing.assert_allclose(xnnpack_form(norm)(y).detach(), norm(y).detach(), atol=1e-5)


def test_xnnpack_form_regroups_the_densified_convs(nano):
    """The inference form makes thin grouped convs dense for ONNX Runtime (nano's first downsample: 12 -> 48,
    two groups of 6); for XNNPACK they become grouped again -- every grouped conv of the training form is
    grouped -- and a conv that is dense for real stays dense."""
    from cpubone.engines.xnnpack_form import block_diagonal_groups, regroup_conv, regroup_convs, xnnpack_form
    from cpubone.models.layers import densify_groups

    def grouped(model):
        return sorted((m.in_channels, m.out_channels, m.groups) for m in model.modules()
                      if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels)

    train, form = nano
    assert (12, 48, 2) in grouped(train) and (12, 48, 2) not in grouped(form)  # densified in the form
    for rewritten in (xnnpack_form(form), regroup_convs(form)):
        assert grouped(rewritten) == grouped(train)
    assert (12, 48, 2) not in grouped(form)  # copies: the form itself is untouched

    torch.manual_seed(0)
    for groups, cin, cout, k in ((2, 12, 48, 3), (4, 16, 8, 1), (3, 6, 9, 2)):
        conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups)
        dense = densify_groups(conv)
        assert block_diagonal_groups(dense) == groups
        back = regroup_conv(dense)
        assert back.groups == groups
        x = torch.randn(1, cin, 9, 7)
        with torch.no_grad():
            np.testing.assert_allclose(back(x), conv(x), rtol=0, atol=1e-6)
    real = torch.nn.Conv2d(12, 48, 3)
    assert regroup_conv(real) is real
    one_off = densify_groups(torch.nn.Conv2d(12, 48, 3, groups=2))
    with torch.no_grad():
        one_off.weight[0, 11, 0, 0] = 1e-3  # one weight outside the blocks: not grouped
    assert regroup_conv(one_off) is one_off
    zero = torch.nn.Conv2d(8, 8, 1)
    torch.nn.init.zeros_(zero.weight)
    assert regroup_conv(zero).groups == 4  # at least two input channels per group, never channel by channel


def test_wrong_input_shape_and_bad_precision(fp32_runners):
    runner = fp32_runners("onnxruntime")
    with pytest.raises(EngineError, match=r"input of shape \(1, 3, 32, 32\), prepared for \(N, 3, 64, 64\)"):
        runner(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(EngineError, match="does not run precision 'bf16'"):
        get_engine("onnxruntime").prepare(torch.nn.Identity(), SHAPE, "bf16")
    with pytest.raises(EngineError, match="int8 needs calibration samples"):
        get_engine("onnxruntime").prepare(torch.nn.Identity(), SHAPE, "int8")


def test_verification_refuses_a_wrong_engine(nano, inputs, fp32_runners):
    runner = fp32_runners("onnxruntime")
    other = create_model("cpubone_nano").eval()  # different weights: the engine computes something else
    with pytest.raises(EngineVerificationError, match=r"onnxruntime fp32 .* disagrees with PyTorch: max abs"):
        verify_fp32(runner, other, inputs)


def test_torch_free_predict_on_every_artifact_kind(fp32_runners, tmp_path):
    """``cpubone predict`` runs the files of the runtimes that need no torch in a process where torch fails to
    import; the metadata sits beside each file as FILE.json (what ``cpubone deploy`` writes)."""
    import json

    from skimage import data
    from PIL import Image

    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    meta = dict(PreprocessConfig(input_size=(3, SIZE, SIZE)).to_metadata(), **{"cpubone.labels": "null"})
    files = {}
    for name in ENGINES:
        cls = engine_class(name)
        if cls.torch_free and cls.available():
            path = fp32_runners(name).artifact
            (path.parent / (path.name + ".json")).write_text(json.dumps(meta))
            files[name] = str(path)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from cpubone.cli import main\n"
        f"for name, path in {files!r}.items():\n"
        f"    assert main(['predict', path, {str(tmp_path / 'astronaut.png')!r}, '--topk', '1', '--json']) == 0\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    top = [line for line in out.stdout.splitlines() if '"index"' in line]
    assert len(top) == len(files) >= 1 and len(set(top)) == 1  # every runtime gives the same class


@pytest.mark.parametrize("name", list(ENGINES))
def test_missing_extra_is_one_line_naming_it(name, monkeypatch):
    cls = engine_class(name)
    monkeypatch.setattr(cls, "modules", cls.modules + ("cpubone_no_such_runtime",))
    with pytest.raises(MissingExtraError) as e:
        get_engine(name)
    msg = str(e.value)
    assert "\n" not in msg and "cpubone_no_such_runtime" in msg and f"pip install 'cpubone[{cls.extra}]'" in msg


def test_registry_parsing_errors():
    assert parse_engines("onnxruntime, eager,onnxruntime") == ["onnxruntime", "eager"]
    assert parse_precisions("fp32,int8") == ["fp32", "int8"]
    with pytest.raises(EngineError, match="unknown engine 'tensorrt'"):
        parse_engines("onnxruntime,tensorrt")
    with pytest.raises(EngineError, match="unknown precision 'fp8'"):
        parse_precisions("fp8")
    with pytest.raises(EngineError, match=r"model\.pth: unknown model file type"):
        engine_for_file("model.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_artifact("missing.onnx")


# --- low precision, on a trained model ---
@pytest.fixture(scope="module")
def trained(trained_nano):
    model, vx, vy = trained_nano
    ref = torch_reference(model)(vx)
    assert (ref.argmax(-1) == vy).mean() > 0.9, "the digits model did not train"
    return model, inference_form(model), vx, vy, ref


@pytest.mark.parametrize("name,precision", [("onnxruntime", "int8"), ("openvino", "int8"), ("openvino", "bf16"),
                                            ("executorch", "int8"), ("litert", "int8"), ("eager", "bf16")])
def test_low_precision_agrees_with_fp32_on_a_trained_model(name, precision, trained, tmp_path):
    _installed(name)
    model, form, vx, vy, ref = trained
    calib = [vx[i:i + 1] for i in range(0, 64)]
    try:
        runner = get_engine(name).prepare(form, (1, *vx.shape[1:]), precision, calib=calib, workdir=tmp_path)
    except EngineError as e:
        if "no bf16 instructions" in str(e):
            pytest.skip(str(e))
        raise
    assert runner.precision == precision
    held_out = slice(64, None)  # not the calibration images
    agree = agreement(runner(vx[held_out]), ref[held_out], vy[held_out])
    assert agree.top1_agreement >= 0.97, agree
    assert agree.accuracy_drop <= 2.0, agree
    if runner.artifact is not None:  # the file keeps its precision
        assert load_artifact(runner.artifact).precision == precision



def test_deploy_and_analysis_do_not_import_each_other():
    """Both reach the runtimes through cpubone.engines (issue 11)."""
    import ast
    from pathlib import Path

    import cpubone

    root = Path(cpubone.__file__).parent
    for pkg, other in (("deploy", "analysis"), ("analysis", "deploy")):
        for f in (root / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    target = ("." * node.level) + node.module
                    assert not target.startswith((f"..{other}", f"cpubone.{other}")), f"{f.name} imports {target}"
