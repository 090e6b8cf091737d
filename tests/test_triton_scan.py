"""The ``triton`` backend's kernels against the sequential reference, values and gradients: on CPU tensors through
Triton's interpreter where there is no GPU (conftest sets TRITON_INTERPRET), compiled on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from nnunetv2_cipa.ops import triton_scan  # noqa: E402  (after the skip: triton is optional)
from nnunetv2_cipa.ops.backends import scan_with_core  # noqa: E402
from nnunetv2_cipa.ops.reference_scan import selective_scan_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NAMES = ("output", "u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, groups, n_state, length, dtype, seed=0, delta_scale=0.5):
    """u, delta, A, B, C (b, G, N, L), D, z, delta_bias on the test device."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    tensors = (rand(batch, dim, length), rand(batch, dim, length) * delta_scale,
               -torch.rand(dim, n_state, generator=gen, dtype=dtype) * 2 - 0.1,
               rand(batch, groups, n_state, length), rand(batch, groups, n_state, length), rand(dim),
               rand(batch, dim, length), rand(dim) * 0.1)
    return [t.to(DEVICE) for t in tensors]


def output_and_grads(fn, inputs, softplus=True, use_bias=True):
    """fn(u, delta, A, B, C, D, z, delta_bias, softplus) and the gradients of a fixed weighting of it."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    used = leaves if use_bias else leaves[:-1]
    y = fn(*leaves[:7], leaves[7] if use_bias else None, softplus)
    weight = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y)
    return [y.detach(), *torch.autograd.grad((y * weight).sum(), used)]


def triton_whole(*args):
    return scan_with_core(triton_scan.triton_selective_scan, *args)


def assert_matches_reference(inputs, tolerance, softplus=True, use_bias=True):
    got = output_and_grads(triton_whole, inputs, softplus, use_bias)
    expected = output_and_grads(selective_scan_reference, [t.cpu() for t in inputs], softplus, use_bias)
    for name, g, e in zip(NAMES, got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        error = ((g.cpu() - e).abs().max() / e.abs().max()).item()
        assert error < tolerance, f"{name}: relative error {error:.1e}"


@pytest.mark.parametrize("batch, dim, groups, n_state, length", [
    (2, 8, 2, 4, 70),   # three tiles, the last one partial
    (1, 6, 3, 3, 33),   # a state size that is no power of two (padded), one step into the second tile
    (1, 4, 1, 1, 32),   # one full tile, one state
])
def test_float64_matches_the_reference(batch, dim, groups, n_state, length):
    assert_matches_reference(make_inputs(batch, dim, groups, n_state, length, torch.float64), 1e-12)


@pytest.mark.parametrize("softplus, use_bias", [(False, False), (False, True), (True, False)])
def test_without_softplus_or_bias(softplus, use_bias):
    assert_matches_reference(make_inputs(2, 4, 2, 2, 40, torch.float64), 1e-12, softplus, use_bias)


def test_channel_blocks_of_a_group_sum_their_gradients(monkeypatch):
    """A group's channels split into several programs (small tiles forced): dB, dC add up across them (atomics),
    dA and delta_bias across the batch."""
    monkeypatch.setitem(triton_scan.MAX_TILE_ELEMENTS, 8, 2 * (4 + 2) * triton_scan.BLOCK_L)
    assert triton_scan._blocks(5, 4, 8) == (2, 4)  # 5 channels per group: blocks of 2, 2 and 1 (masked)
    assert_matches_reference(make_inputs(3, 10, 2, 4, 45, torch.float64), 1e-12)


def test_float32_large_delta_and_ungrouped_B_C():
    """float32 in, float32 out, with delta past softplus' threshold (20) and far below 0; B, C without a group axis
    (b, N, L), as mamba-ssm also takes them."""
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 1, 4, 40, torch.float32, delta_scale=15.0)
    inputs = [u, delta, A, B[:, 0], C[:, 0], D, z, bias]
    got = output_and_grads(triton_whole, inputs)
    expected = output_and_grads(selective_scan_reference, [t.cpu() for t in inputs])
    assert delta.max() > 20 and delta.min() < -20
    for name, g, e in zip(NAMES, got, expected):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        torch.testing.assert_close(g.cpu(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item(), msg=name)


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, triton_scan._softplus(tl.load(x_ptr + offsets, mask=mask)), mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_is_accurate_for_small_steps(dtype):
    """The kernels' softplus against torch's (log1p(exp(x))) in float64, from x = -30 to 30: within a few ulp also
    where dt is tiny (x = -12: a step of 6e-6, which log(1 + exp(x)) in float32 gets 1% wrong). The bound leaves room
    for a GPU's approximate float32 exp, whose error grows with |x|."""
    x = torch.cat([torch.linspace(-30, 30, 1001, dtype=dtype),
                   torch.tensor([-15.0, -14.9, -12.0, -9.2, 19.99, 20.0, 20.01], dtype=dtype)]).to(DEVICE)
    y = torch.empty_like(x)
    _softplus_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = torch.nn.functional.softplus(x.cpu().double())
    error = ((y.cpu().double() - expected).abs() / expected).max().item()
    assert error < 32 * torch.finfo(dtype).eps, f"relative error {error:.1e}"


def test_float32_stays_accurate_over_a_long_sequence():
    """4096 steps (128 tiles, the state carried across each) in float32 against the float64 reference: no drift.
    (At 16384 steps, CIPA-tiny's first stage at 512 x 512, the errors measured 1e-7 as well.)"""
    inputs = make_inputs(1, 2, 2, 2, 4096, torch.float64, delta_scale=0.1)
    got = output_and_grads(triton_whole, [t.float() for t in inputs])
    expected = output_and_grads(selective_scan_reference, [t.cpu() for t in inputs])
    for name, g, e in zip(NAMES, got, expected):
        error = ((g.cpu().double() - e).abs().max() / e.abs().max()).item()
        assert error < 1e-5, f"{name}: relative error {error:.1e}"


def test_no_states_saved_without_gradients(monkeypatch):
    """Prediction (inference mode) and no_grad give the same output without saving the tile states."""
    saved, forward = [], triton_scan.TritonScan.forward

    def recording_forward(ctx, *args):
        saved.append(args[-1])  # save_states
        return forward(ctx, *args)

    monkeypatch.setattr(triton_scan.TritonScan, "forward", staticmethod(recording_forward))
    inputs = make_inputs(1, 4, 2, 3, 40, torch.float64)
    expected = selective_scan_reference(*(t.cpu() for t in inputs), delta_softplus=True)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            torch.testing.assert_close(triton_whole(*inputs, True).cpu(), expected, rtol=1e-12, atol=1e-12)
    triton_whole(*[t.requires_grad_() for t in inputs], True)
    assert saved == [False, False, True]


def test_inputs_left_untouched_and_any_layout_accepted():
    u, delta, A, B, C, D, z, bias = make_inputs(2, 4, 2, 4, 36, torch.float64)
    strided_u = u.transpose(0, 1).contiguous().transpose(0, 1)  # same values, another memory layout
    before = [t.clone() for t in (strided_u, delta, B, C)]
    y = triton_whole(strided_u, delta, A, B, C, D, z, bias, True)
    assert all(torch.equal(a, b) for a, b in zip(before, (strided_u, delta, B, C)))
    torch.testing.assert_close(y.cpu(), selective_scan_reference(*(t.cpu() for t in (u, delta, A, B, C, D, z, bias)),
                                                                 delta_softplus=True))


def test_tile_budgets_and_one_dtype():
    """Channel blocks are powers of two within the register budget (see bench_triton_compile): the float32 shapes
    that compile without spills, half as many channels in float64. Mixed dtypes are refused (the compiled kernels
    would fail on them)."""
    assert [triton_scan._blocks(192, n, 4) for n in (1, 2, 4, 16)] == [(16, 1), (16, 2), (8, 4), (2, 16)]
    assert [triton_scan._blocks(192, n, 8) for n in (1, 2, 4, 16)] == [(8, 1), (8, 2), (4, 4), (1, 16)]
    assert triton_scan._blocks(3, 4, 4) == (4, 4) and triton_scan._blocks(2, 1, 4) == (2, 1)
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 1, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        triton_scan.triton_selective_scan(u, delta, A.double(), B, C, bias, True)


@pytest.mark.parametrize("batch, length, dim, n_state, n_dirs", [
    (2, 40, 6, 4, 4),   # SS2D's four orders, two tiles
    (1, 33, 12, 16, 2),  # N = 16: one channel per float64 block, so 12 blocks sum dB, dC of each direction
])
def test_directional_scan_through_the_triton_backend(monkeypatch, batch, length, dim, n_state, n_dirs):
    """SS2D's operator (K scan orders of one map, summed back in position order) through the triton backend: its
    directional kernels read every input in position order (no gathered copies). Against the per-direction loop;
    the backend's row is made device-agnostic here so that it runs on the interpreter's CPU tensors."""
    from test_directional_scan import NAMES as DIRECTIONAL_NAMES
    from test_directional_scan import loop_over_directions, make_inputs as directional_inputs, with_grads

    from nnunetv2_cipa.ops import backends
    from nnunetv2_cipa.ops.directional_scan import directional_scan

    gathered = []  # calls of the plain kernels, which the gathered path would make
    monkeypatch.setitem(backends.BACKENDS, "triton", backends.ScanBackend(
        None, lambda device: None, lambda *args: gathered.append(1), triton_scan.triton_directional_scan))
    inputs, positions = directional_inputs(batch=batch, length=length, dim=dim, n_state=n_state, n_dirs=n_dirs)
    y_ref, g_ref = with_grads(lambda: loop_over_directions(*inputs, positions), inputs)
    on_device = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    u, delta, A, B, C, D, bias = on_device
    y, grads = with_grads(lambda: directional_scan(u, delta, A, B, C, positions.to(DEVICE), D=D, delta_bias=bias,
                                                   delta_softplus=True, backend="triton"), on_device)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-12, atol=1e-12)
    for name, g, g_expected in zip(DIRECTIONAL_NAMES, grads, g_ref):
        torch.testing.assert_close(g.cpu(), g_expected, rtol=1e-10, atol=1e-12, msg=name)
    assert gathered == []


def test_directional_scan_keeps_what_the_cpu_kernel_keeps():
    """The memory model gives the triton backend the figures measured with the numba (cpu) kernel: both must keep
    the same tensors for backward (the inputs, delta in one float32 copy, A or its transpose, the state entering
    every 32 steps); only triton keeps the bias as well."""
    pytest.importorskip("numba")
    from nnunetv2_cipa.modules.ss2d import cross_scan_positions
    from nnunetv2_cipa.ops.cpu_scan import cpu_directional_scan

    gen = torch.Generator().manual_seed(0)
    k, b, h, w, d, n = 4, 1, 8, 8, 16, 16  # d: a multiple of the numba kernel's 16 lanes (no padding)
    u, delta = torch.randn(b, h * w, d, generator=gen), torch.randn(k, b, h * w, d, generator=gen)
    A, bias = -torch.rand(k * d, n, generator=gen) - 0.1, torch.randn(k * d, generator=gen)
    B, C = torch.randn(b, h * w, k, n, generator=gen), torch.randn(b, h * w, k, n, generator=gen)

    def kept_bytes(scan, device) -> int:
        inputs = [t.to(device).requires_grad_() for t in (u, delta, B, C)]
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scan(inputs[0], inputs[1], A.to(device), inputs[2], inputs[3], cross_scan_positions(h, w, device),
                 bias.to(device), True)
        return sum(kept.values())

    cpu, triton_kept = kept_bytes(cpu_directional_scan, "cpu"), kept_bytes(triton_scan.triton_directional_scan,
                                                                           DEVICE)
    assert cpu >= delta.numel() * 4 + k * b * (h * w // 32) * n * d * 4  # delta and the states at least
    assert triton_kept - cpu == bias.numel() * 4


def test_directional_smoke_call_runs_the_kernels_and_catches_a_wrong_one():
    """The probe's second smoke call (directional layout): passes with the kernels; a kernel that drops one
    direction is reported by name."""
    from nnunetv2_cipa.ops.kernel_probe import directional_smoke_call

    assert directional_smoke_call(triton_scan.triton_directional_scan, DEVICE) is None

    def first_direction_only(u, delta, A, B, C, positions, bias, softplus):
        dim = u.shape[2]
        return triton_scan.triton_directional_scan(u, delta[:1], A[:dim], B[:, :, :1], C[:, :, :1], positions[:1],
                                                   bias[:dim], softplus)

    assert directional_smoke_call(first_direction_only, DEVICE).startswith(
        f"its directional smoke call on {DEVICE} returned a wrong output")


def test_kernels_compile_for_gpus_within_their_registers(tmp_path):
    """Triton's compiler and ptxas (in its Linux wheel) build both kernels in both layouts for sm_90 at the block
    shapes the backend picks for CIPA's state sizes: no compile error, no reverse scan (whose operand order differs
    between Triton versions; the interpreter cannot tell), and at most 8 bytes (2 registers) spilled, which some
    Triton releases spill in some variants (docs/benchmarks.md, "Triton kernels"; the shapes first tried spilled
    32 B to 2 KB). Runs the benchmark without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_triton_compile.py"), "--archs", "90",
                             "--dtypes", "float32", "--states", "2", "4", "16", "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["n_state"], r["layout"], r["kernel"]) for r in rows) == sorted(
        (n, layout, kernel) for n in (2, 4, 16) for layout in ("plain", "directional")
        for kernel in ("forward", "backward"))
    assert all(r["spill_bytes"] <= 8 and 0 < r["registers"] <= 255 and r["reverse_scans"] == 0 for r in rows), rows
    assert "| float32 | 16 | 2 x 16 | sm_90 | directional | backward |" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_state", [1, 2, 4, 16])
def test_compiled_kernels_on_the_gpu_at_an_encoder_shape(n_state):
    """Compiled on the GPU, float32, the four scan directions of a small encoder stage as groups, at every block
    shape CIPA's state sizes give, with a length that ends in a partial tile."""
    assert_matches_reference(make_inputs(2, 4 * 48, 4, n_state, 1000, torch.float32), 1e-3)
