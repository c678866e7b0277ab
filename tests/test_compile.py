"""torch.compile at any input size, in training and in eval, with the eager outputs and gradients.

``torch.compile`` compiles a graph for the first input size and, when the size changes, one with
symbolic sizes. That second graph used to crash (inductor: "'TensorReferenceAnalysis' has no attribute
'python_mod'" in eval, "cannot determine truth value of Relational" in training): see
``pad_to_multiple`` and ``Lowtention.forward`` in ``cpubone.models.layers``.

Sizes: stage 3 (stride 16) of 64x64 is 4x4, where Lowtention's stride-2 projection needs no pad; of
72x104 it is 5x7 (padded to 6x8, upsampled and cropped back); 65x67 is odd at every stage; 96x80 mixes
an even height with an odd width. Compiling is slow on small CPUs (tens of seconds a graph), so the
sizes are small and each test compiles two graphs at most (plus backward graphs in training).
"""
from __future__ import annotations

import copy

import pytest
import torch

from cpubone import VARIANTS, create_model
from cpubone.models.reparam import reparameterize

from conftest import trained_like

SIZES = [(64, 64), (72, 104), (65, 67), (96, 80)]

# compiling takes minutes of wall time when the CPUs are shared: more than the suite's default limit
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test starts from a first, static compile
    yield
    torch._dynamo.reset()


def _nano(**kwargs) -> torch.nn.Module:
    # no dropout: compiled and eager code draw different random numbers
    return trained_like(create_model("cpubone_nano", num_classes=10, proj_drop_rate=0.0, **kwargs))


def test_compiled_eval_any_size_matches_eager():
    model = _nano()
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in SIZES:
            x = torch.randn(2, 3, *hw, generator=g)
            out = compiled(x)
            assert out.shape == (2, 10)
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4, msg=lambda m: f"{hw}: {m}")


def test_compiled_training_any_size_matches_eager():
    model = _nano().train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    for hw in SIZES[:3]:
        x = torch.randn(2, 3, *hw, generator=g)
        out, ref = compiled(x), eager(x)
        out.square().mean().backward()
        ref.square().mean().backward()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{hw}: {m}")
        largest = max(q.grad.abs().max().item() for q in eager.parameters())
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            # relative to the tensor's largest gradient, plus float noise where the gradient is zero in
            # exact arithmetic (train-mode BatchNorm removes the shift of the norm before Lowtention)
            allowed = 1e-3 * q.grad.abs().max().item() + 1e-6 * largest
            assert (p.grad - q.grad).abs().max().item() <= allowed, (hw, name)
        model.zero_grad()
        eager.zero_grad()
    # the BatchNorm statistics were updated alike (compiled training mutates the real buffers)
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        if b.is_floating_point():
            torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_compiled_inference_form_any_size_matches_eager():
    model = reparameterize(_nano(), pad_mode="crop")
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in SIZES[:3]:
            x = torch.randn(1, 3, *hw, generator=g)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4, msg=lambda m: f"{hw}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_compiles_with_symbolic_sizes(name):
    # dynamic=True compiles the symbolic-size graph at once (the one that crashed); both sizes pad
    model = trained_like(create_model(name, num_classes=10))
    compiled = torch.compile(model, dynamic=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for hw in [(72, 104), (104, 72)]:
            x = torch.randn(1, 3, *hw, generator=g)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4, msg=lambda m: f"{hw}: {m}")
