"""directional_scan: every backend against a per-direction loop over the sequential reference, values and gradients."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from nnunetv2_cipa.ops import backends
from nnunetv2_cipa.ops.backends import available_backends
from nnunetv2_cipa.ops.directional_scan import directional_scan
from nnunetv2_cipa.ops.reference_scan import directional_reference

BACKENDS = [name for name in ("cpu", "torch", "reference") if name in available_backends()]
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def make_inputs(batch=2, length=70, dim=20, n_state=5, n_dirs=3, dtype=torch.float64, seed=0):
    """Random inputs in the order of NAMES (all requiring grad) and K random scan orders."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    tensors = (rand(batch, length, dim), rand(n_dirs, batch, length, dim) * 0.5,
               -torch.rand(n_dirs * dim, n_state, generator=gen, dtype=dtype) * 2 - 0.1,
               rand(batch, length, n_dirs, n_state), rand(batch, length, n_dirs, n_state), rand(n_dirs * dim),
               rand(n_dirs * dim) * 0.1)
    positions = torch.stack([torch.randperm(length, generator=gen) for _ in range(n_dirs)])
    return [t.requires_grad_() for t in tensors], positions


def loop_over_directions(u, delta, A, B, C, D, delta_bias, positions, delta_softplus=True):
    """The definition: scan each direction's order with the reference loop, put outputs back, sum; plus each
    direction's D skip."""
    n_dirs = positions.shape[0]
    return (directional_reference(u, delta, A, B, C, positions, delta_bias, delta_softplus)
            + u * D.view(n_dirs, -1).sum(0))


def with_grads(fn, inputs):
    y = fn()
    weight = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y)
    return y, torch.autograd.grad((y * weight).sum(), inputs)


@pytest.mark.parametrize("backend, gather",
                         [(b, False) for b in BACKENDS] + ([("cpu", True)] if "cpu" in BACKENDS else []))
@pytest.mark.parametrize("dtype, tol, softplus", [(torch.float64, 1e-9, True), (torch.float64, 1e-9, False),
                                                   (torch.float32, 1e-4, True)])
def test_matches_the_per_direction_loop(backend, gather, dtype, tol, softplus, monkeypatch):
    """d = 20 (the cpu kernel pads to 32 lanes), L = 70 (three kernel chunks), 3 random orders; the cpu kernel also
    through gathered copies (``gather=True``: its in-place kernel must not run)."""
    if gather:
        def in_place_called(*args):
            raise AssertionError("gather=True ran the in-place directional kernel")

        monkeypatch.setitem(backends.BACKENDS, backend,
                            dataclasses.replace(backends.BACKENDS[backend], directional_scan=in_place_called))
    inputs, positions = make_inputs(dtype=dtype)
    u, delta, A, B, C, D, bias = inputs
    y_ref, g_ref = with_grads(lambda: loop_over_directions(*inputs, positions, softplus), inputs)
    y, grads = with_grads(lambda: directional_scan(u, delta, A, B, C, positions, D=D, delta_bias=bias,
                                                   delta_softplus=softplus, backend=backend, gather=gather), inputs)
    assert y.dtype == dtype and y.shape == u.shape
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for name, g, g_expected in zip(NAMES, grads, g_ref):
        torch.testing.assert_close(g, g_expected, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_arguments_and_bf16_autocast(backend):
    inputs, positions = make_inputs(dim=16, n_dirs=4, dtype=torch.float32)
    u, delta, A, B, C, _, _ = (t.detach() for t in inputs)
    delta = delta.abs()  # no softplus: keep the decays below 1
    bare = directional_scan(u, delta, A, B, C, positions, backend=backend)
    expected = loop_over_directions(u, delta, A, B, C, torch.zeros(64), torch.zeros(64), positions, False)
    torch.testing.assert_close(bare, expected, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = directional_scan(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), positions,
                                backend=backend)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), bare, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs numba")
@pytest.mark.parametrize("splits", [1, 3])
def test_cpu_backward_channel_blocks(monkeypatch, splits):
    """The numba backward split into 1 or 3 channel blocks per work item (gB, gC summed over the blocks) gives the
    loop's gradients; d = 40 pads to 48 channels, three 16-channel blocks."""
    from nnunetv2_cipa.ops import cpu_scan

    monkeypatch.setattr(cpu_scan, "_backward_splits", lambda dim, items: splits)
    inputs, positions = make_inputs(batch=1, dim=40)
    u, delta, A, B, C, D, bias = inputs
    _, g_ref = with_grads(lambda: loop_over_directions(*inputs, positions), inputs)
    _, grads = with_grads(lambda: directional_scan(u, delta, A, B, C, positions, D=D, delta_bias=bias,
                                                   delta_softplus=True, backend="cpu"), inputs)
    for name, g, g_expected in zip(NAMES, grads, g_ref):
        torch.testing.assert_close(g, g_expected, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs numba")
@pytest.mark.parametrize("threads, dim, items, expected", [
    (2, 192, 2, 1), (2, 192, 3, 2), (2, 192, 1, 2), (2, 192, 512, 1), (2, 1536, 2, 2), (16, 192, 4, 4),
    (16, 48, 1, 3)])
def test_cpu_backward_blocks_spread_the_work_evenly(monkeypatch, threads, dim, items, expected):
    """The fewest channel blocks (at most 768 channels each) that keep every thread equally busy."""
    from nnunetv2_cipa.ops import cpu_scan

    monkeypatch.setattr(cpu_scan.numba, "get_num_threads", lambda: threads)
    assert cpu_scan._backward_splits(dim, items) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [
    "torch",  # the pure-PyTorch path, what runs on a GPU without mamba-ssm
    pytest.param("cuda", marks=pytest.mark.skipif(not importlib.util.find_spec("mamba_ssm"),
                                                  reason="needs mamba-ssm")),  # gathered through mamba-ssm's kernel
    pytest.param("triton", marks=pytest.mark.skipif(not importlib.util.find_spec("triton"),
                                                    reason="needs triton")),  # gathered through the Triton kernels
])
def test_gpu_backends_match_the_per_direction_loop(backend):
    """float32 on the GPU against the loop on the CPU, values and gradients."""
    inputs, positions = make_inputs(dim=32, n_state=16, n_dirs=4, dtype=torch.float32)
    y_ref, g_ref = with_grads(lambda: loop_over_directions(*inputs, positions), inputs)
    gpu = [t.detach().cuda().requires_grad_() for t in inputs]
    u, delta, A, B, C, D, bias = gpu
    y, grads = with_grads(lambda: directional_scan(u, delta, A, B, C, positions.cuda(), D=D, delta_bias=bias,
                                                   delta_softplus=True, backend=backend), gpu)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-4)
    for name, g, g_expected in zip(NAMES, grads, g_ref):
        torch.testing.assert_close(g.cpu(), g_expected, rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("index, bad, message", [
    (0, torch.zeros(2, 70), "u must have shape"),
    (1, torch.zeros(3, 2, 70, 19), r"delta must have shape \(3, 2, 70, 20\)"),
    (2, torch.zeros(59, 5), r"A must have shape \(60, N\)"),
    (3, torch.zeros(2, 70, 2, 5), r"B must have shape \(2, 70, 3, 5\)"),
    (4, torch.zeros(2, 70, 3, 4), "C must have shape"),
    (5, torch.zeros(20), r"D must have shape \(60,\)"),
])
def test_bad_shapes_name_the_argument(index, bad, message):
    inputs, positions = make_inputs(dtype=torch.float32)
    args = [t.detach() for t in inputs]
    args[index] = bad
    u, delta, A, B, C, D, _ = args
    with pytest.raises(ValueError, match=message):
        directional_scan(u, delta, A, B, C, positions, D=D)


def test_positions_must_be_permutations():
    inputs, positions = make_inputs(dtype=torch.float32)
    u, delta, A, B, C = (t.detach() for t in inputs[:5])
    repeated = positions.clone()
    repeated[1, 0] = repeated[1, 1]  # a position visited twice, another never
    with pytest.raises(ValueError, match="permutation"):
        directional_scan(u, delta, A, B, C, repeated)
    with pytest.raises(ValueError, match="positions must be an int64 tensor"):
        directional_scan(u, delta, A, B, C, positions.int())
    with pytest.raises(ValueError, match=r"positions must be an int64 tensor \(K, 70\)"):
        directional_scan(u, delta, A, B, C, positions[:, :69])
