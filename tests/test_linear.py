"""Linear on channels-last features: the oneDNN (1x1 convolution) path equals nn.Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_cipa.modules.linear import Linear, cpu_linear_backend, linear

BACKENDS = ["blas"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, bias", [((7, 12), True), ((2, 9, 12), False), ((2, 5, 6, 12), True)])
def test_linear_equals_torch_linear_with_gradients(monkeypatch, backend, shape, bias):
    monkeypatch.setenv("NNUNETV2_CIPA_CPU_LINEAR", backend)
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    layer = Linear(12, 10, bias=bias)
    reference = torch.nn.Linear(12, 10, bias=bias)
    reference.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    out, expected = layer(x), reference(x_ref)
    assert out.shape == (*shape[:-1], 10) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for p, p_ref in zip(layer.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5)


def test_functional_linear_accepts_a_weight_view_and_rejects_unknown_backends(monkeypatch):
    weight = torch.randn(2, 3, 8)
    x = torch.randn(4, 8)
    torch.testing.assert_close(linear(x, weight.flatten(0, 1)), F.linear(x, weight.flatten(0, 1)))
    monkeypatch.setenv("NNUNETV2_CIPA_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match="NNUNETV2_CIPA_CPU_LINEAR='mkl'"):
        cpu_linear_backend()
