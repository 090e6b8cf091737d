"""selective_scan: the torch (and numba cpu) backends against the sequential reference, values and gradients."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect

import pytest
import torch

from nnunetv2_cipa.ops import backends, chunked_scan
from nnunetv2_cipa.ops.backends import available_backends, resolve_backend
from nnunetv2_cipa.ops.reference_scan import selective_scan_reference
from nnunetv2_cipa.ops.selective_scan import selective_scan

FAST_BACKENDS = [name for name in ("torch", "cpu") if name in available_backends()]
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch=2, dim=4, length=37, n_state=3, groups=None, dtype=torch.float64, seed=0, delta_scale=0.5):
    """Random scan inputs (all requiring grad) in the order of INPUT_NAMES; B, C grouped when ``groups``."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    tensors = (rand(batch, dim, length), rand(batch, dim, length) * delta_scale,
               -torch.rand(dim, n_state, generator=gen, dtype=dtype) * 2 - 0.1, rand(*bc_shape), rand(*bc_shape),
               rand(dim), rand(batch, dim, length), rand(dim) * 0.1)
    return [t.requires_grad_() for t in tensors]


def run_with_grads(inputs, backend, use_optional=(True, True, True), delta_softplus=True):
    """Output and gradients w.r.t. every input used, for a fixed non-uniform output weighting."""
    u, delta, A, B, C, D, z, bias = inputs
    use_d, use_z, use_bias = use_optional
    y = selective_scan(u, delta, A, B, C, D=D if use_d else None, z=z if use_z else None,
                       delta_bias=bias if use_bias else None, delta_softplus=delta_softplus, backend=backend)
    used = [t for t, keep in zip(inputs, (True,) * 5 + (use_d, use_z, use_bias)) if keep]
    weight = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y)
    grads = torch.autograd.grad((y * weight).sum(), used)
    return y, grads


def assert_close_rel(actual, expected, tol, name):
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@functools.lru_cache(maxsize=1)
def long_sequence_case():
    """Inputs with L = 16384 and the reference's results, computed once for all backends (the loop takes ~15 s)."""
    inputs = make_inputs(batch=1, dim=2, length=16384, n_state=2, groups=2, delta_scale=0.1)
    return inputs, run_with_grads(inputs, "reference")


def compare_to_reference(backend, inputs, tol, expected=None, **kwargs):
    y_ref, g_ref = expected or run_with_grads(inputs, "reference", **kwargs)
    y, grads = run_with_grads(inputs, backend, **kwargs)
    assert y.dtype == inputs[0].dtype and y.shape == inputs[0].shape
    assert_close_rel(y, y_ref, tol, "output")
    for name, g, g_expected in zip(INPUT_NAMES, grads, g_ref):
        assert_close_rel(g, g_expected, tol, f"grad {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "length, groups, use_optional, delta_softplus",
    [(1, None, (True, True, True), True),
     (37, None, (True, True, True), True),
     (37, 2, (True, True, True), True),
     (64, 4, (False, False, False), False),
     (200, 2, (True, False, True), False),
     (129, None, (False, True, False), True)],
)
def test_matches_reference_float64(backend, length, groups, use_optional, delta_softplus):
    inputs = make_inputs(length=length, groups=groups, dim=8 if groups == 4 else 4)
    compare_to_reference(backend, inputs, 1e-6, use_optional=use_optional, delta_softplus=delta_softplus)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_matches_reference_long_sequence(backend):
    inputs, expected = long_sequence_case()
    compare_to_reference(backend, inputs, 1e-6, expected)


def test_torch_backend_channel_blocks(monkeypatch):
    """The torch backend cutting the 8 channels of each group into 4 blocks (its state budget forced down to 2
    channels of both groups) gives the loop's values and gradients."""
    monkeypatch.setattr(chunked_scan, "_BLOCK_ELEMENTS", {"cpu": 2 * 2 * 2 * 104 * 16})  # b * G * c * padded L * N
    compare_to_reference("torch", make_inputs(batch=2, dim=16, length=100, n_state=16, groups=2), 1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_matches_reference_float32(backend):
    inputs = make_inputs(dim=6, length=300, groups=3, dtype=torch.float32)
    compare_to_reference(backend, inputs, 1e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_extreme_decays(backend, dtype, tol):
    """delta * |A| from 1e-6 to 100 per step: no overflow, no 0 * inf, same as the loop."""
    inputs = make_inputs(dim=4, length=300, n_state=4, groups=2, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    log_delta = torch.empty(2, 4, 300, dtype=dtype).uniform_(-6 * 2.3026, 2 * 2.3026, generator=gen)
    log_delta[:, :, 100:140] = 2 * 2.3026  # a run of full decays
    log_delta[:, :, 200:260] = -6 * 2.3026  # a run with almost no decay
    with torch.no_grad():
        inputs[1].copy_(log_delta.exp())
        inputs[2].copy_(-torch.ones(4, 4, dtype=dtype))
    y_ref, _ = run_with_grads(inputs, "reference", use_optional=(True, True, False), delta_softplus=False)
    assert torch.isfinite(y_ref).all()
    compare_to_reference(backend, inputs, tol, use_optional=(True, True, False), delta_softplus=False)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bfloat16_autocast(backend):
    """Half-precision inputs under autocast: computed in float32, finite, bf16 output close to the float32 result."""
    inputs = [t.detach() for t in make_inputs(dim=8, length=256, n_state=16, groups=4, dtype=torch.float32)]
    u, delta, A, B, C, D, z, bias = inputs
    expected = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend=backend)
        half = [t.to(torch.bfloat16) for t in (u, delta, B, C, z)]
        out = selective_scan(half[0], half[1], A, half[2], half[3], D, half[4], bias, delta_softplus=True,
                             backend=backend)
    assert same.dtype == torch.float32 and torch.equal(same, expected)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close_rel(out.float(), expected, 5e-2, "bf16 output")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm")),
                    reason="needs CUDA and mamba-ssm")
@pytest.mark.parametrize("groups", [None, 4])
def test_torch_matches_cuda(groups):
    cpu_inputs = make_inputs(dim=16, length=500, n_state=16, groups=groups, dtype=torch.float32)
    inputs = [t.detach().cuda().requires_grad_() for t in cpu_inputs]
    y_cuda, g_cuda = run_with_grads(inputs, "cuda")
    y_torch, g_torch = run_with_grads(inputs, "torch")
    assert_close_rel(y_torch, y_cuda, 1e-4, "output")
    for name, g, g_expected in zip(INPUT_NAMES, g_torch, g_cuda):
        assert_close_rel(g, g_expected, 1e-3, f"grad {name}")


@pytest.mark.parametrize(
    "name, bad_index, bad_shape",
    [("u", 0, (2, 4)), ("delta", 1, (2, 4, 36)), ("A", 2, (5, 3)), ("B", 3, (2, 3, 36)), ("C", 4, (2, 3, 3, 37)),
     ("D", 5, (3,)), ("z", 6, (2, 4, 36)), ("delta_bias", 7, (4, 1))],
)
def test_bad_shapes_name_the_argument(name, bad_index, bad_shape):
    inputs = [t.detach() for t in make_inputs()]
    inputs[bad_index] = torch.zeros(bad_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"\b{name} must"):
        selective_scan(*inputs[:5], D=inputs[5], z=inputs[6], delta_bias=inputs[7])


def test_integer_input_rejected():
    inputs = [t.detach() for t in make_inputs()]
    with pytest.raises(ValueError, match="u must be a floating-point"):
        selective_scan(inputs[0].long(), *inputs[1:5])


def test_backend_from_environment(monkeypatch):
    u, delta, A, B, C = (t.detach() for t in make_inputs()[:5])
    monkeypatch.setenv("NNUNETV2_CIPA_SCAN_BACKEND", "reference")
    assert resolve_backend(None, u.device) == "reference"
    assert resolve_backend("torch", u.device) == "torch"  # the argument wins
    calls = []
    counted = dataclasses.replace(backends.BACKENDS["reference"], selective_scan=lambda *a: calls.append(1) or a[0])
    monkeypatch.setitem(backends.BACKENDS, "reference", counted)
    selective_scan(u, delta, A, B, C)
    assert calls == [1]
    monkeypatch.setenv("NNUNETV2_CIPA_SCAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus.*NNUNETV2_CIPA_SCAN_BACKEND"):
        selective_scan(u, delta, A, B, C)


def test_ops_modules_are_not_shadowed():
    """The ops package re-exports nothing, so its submodules import as modules."""
    import nnunetv2_cipa.ops.directional_scan as directional_module
    import nnunetv2_cipa.ops.selective_scan as scan_module

    assert inspect.ismodule(scan_module) and inspect.ismodule(directional_module)
    assert scan_module.selective_scan is selective_scan and callable(directional_module.directional_scan)


def test_unknown_backend_and_auto(monkeypatch):
    u, delta, A, B, C = (t.detach() for t in make_inputs()[:5])
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        selective_scan(u, delta, A, B, C, backend="fast")
    with pytest.raises(ValueError, match="cuda"):
        selective_scan(u, delta, A, B, C, backend="cuda")
    monkeypatch.delenv("NNUNETV2_CIPA_SCAN_BACKEND", raising=False)
    expected = "cpu" if "cpu" in available_backends() else "torch"
    assert resolve_backend(None, u.device) == expected
    assert torch.allclose(selective_scan(u, delta, A, B, C), selective_scan_reference(u, delta, A, B, C))


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
def test_cpu_backend_uses_torch_thread_count():
    """numba follows torch's thread count (forward and backward), so the two never oversubscribe the cores."""
    import numba

    previous = torch.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            torch.set_num_threads(threads)
            u = torch.randn(1, 4, 16, requires_grad=True)
            y = selective_scan(u, torch.rand(1, 4, 16), -torch.rand(4, 2), torch.randn(1, 2, 16),
                               torch.randn(1, 2, 16), backend="cpu")
            assert numba.get_num_threads() == threads
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS if threads == 1 else 1)
            y.sum().backward()
            assert numba.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
@pytest.mark.parametrize(
    "batch, dim, groups, length",
    [(1, 64, None, 100),  # one group of 4 blocks: the backward splits it across work items
     (2, 96, 2, 70),      # 3 blocks per group, several chunks, L not a multiple of the chunk
     (2, 40, 2, 33)],     # 20 channels per group: zero-padded to 32 lanes
)
def test_cpu_kernel_block_layouts_match_reference(batch, dim, groups, length):
    """The numba kernel with whole lane blocks, split work items and padding, from channels-innermost inputs (as SS2D
    passes them): values and gradients equal the reference, and the output keeps the channels-innermost layout."""
    inputs = make_inputs(batch=batch, dim=dim, length=length, n_state=5, groups=groups)
    for i in (0, 1):  # u, delta: (b, d, L) views of (b, L, d) memory
        inputs[i] = inputs[i].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    compare_to_reference("cpu", inputs, 1e-6)
    y, _ = run_with_grads(inputs, "cpu", use_optional=(True, False, True))
    assert y.transpose(1, 2).is_contiguous()


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
def test_cpu_kernel_float32_exp_and_softplus_accuracy():
    """The vectorisable float32 exp and softplus of the numba kernels: decays within 1e-7 absolute, about 1 float32
    ulp relative near 0, at most 1.2e-38 (finite) below float32's normal range; softplus' derivative from its output
    within 5e-7 relative; float64 keeps numpy's functions."""
    import numba
    import numpy as np

    from nnunetv2_cipa.ops.numba_math import exp as _exp
    from nnunetv2_cipa.ops.numba_math import sigmoid_of_softplus as _sigmoid_of_softplus
    from nnunetv2_cipa.ops.numba_math import softplus as _softplus

    @numba.njit(error_model="numpy")
    def apply(x, softplus):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = _softplus(x[i]) if softplus else _exp(x[i])
        return out

    @numba.njit(error_model="numpy")
    def apply_sigmoid(s):
        out = np.empty_like(s)
        for i in range(s.size):
            out[i] = _sigmoid_of_softplus(s[i])
        return out

    x = np.linspace(-87.0, 0.0, 200001).astype(np.float32)  # decays exp(delta * A) lie in (0, 1]
    assert np.max(np.abs(apply(x, False) - np.exp(x.astype(np.float64)))) < 1e-7
    x = np.linspace(-1.0, 1.0, 20001).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(apply(x, False) - exact) / exact) < 2e-7
    tiny = apply(np.array([-100.0, -1e4], dtype=np.float32), False)
    assert np.all(np.isfinite(tiny)) and np.all(tiny <= 1.2e-38)
    x = np.linspace(-10.0, 10.0, 20001).astype(np.float32)
    exact = np.log1p(np.exp(x.astype(np.float64)))
    assert np.max(np.abs(apply(x, True) - exact) / exact) < 1e-6
    # softplus' derivative from softplus' output: sigmoid(x) = 1 - exp(-softplus(x)), relative, also where it is tiny
    x = np.linspace(-30.0, 30.0, 60001)
    softplus = np.log1p(np.exp(x)).astype(np.float32)
    sigmoid = apply_sigmoid(softplus)
    assert sigmoid.dtype == np.float32
    assert np.max(np.abs(sigmoid - 1 / (1 + np.exp(-x))) * (1 + np.exp(-x))) < 5e-7
    assert abs(apply_sigmoid(np.array([1e-3]))[0] + np.expm1(-1e-3)) < 1e-18  # float64 keeps np.expm1
    assert apply(np.array([0.5], dtype=np.float64), False)[0] == np.exp(0.5)  # float64 keeps np.exp
    assert abs(apply(np.array([0.5], dtype=np.float64), True)[0] - np.log1p(np.exp(0.5))) < 1e-15
