"""CIPA's layers: SS2D/SS1D against the official formulation, the token mixers, DCIM windows, CRM gains, and the
float32 mixer output under fp16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_cipa.modules.crm import ChannelRectification
from nnunetv2_cipa.modules.dcim import RegionGlobalInteraction, window_partition, window_unpartition
from nnunetv2_cipa.modules.ss2d import (SS1D, SS2D, MemorylessMixer, SelectiveScanMixer, cross_scan_positions,
                                        sequence_positions)
from nnunetv2_cipa.ops.backends import available_backends
from nnunetv2_cipa.ops.memoryless_mix import memoryless_mix
from nnunetv2_cipa.ops.reference_scan import selective_scan_reference


def test_cross_scan_positions_are_the_four_vmamba_orders():
    positions = cross_scan_positions(4, 5)  # H = 4, W = 5: position h*W + w
    assert positions.shape == (4, 20) and positions.dtype == torch.int64
    assert positions[0].tolist() == list(range(20))                                   # row-major
    assert positions[1].tolist() == [h * 5 + w for w in range(5) for h in range(4)]   # column-major
    assert positions[2].tolist() == positions[0].flip(0).tolist()
    assert positions[3].tolist() == positions[1].flip(0).tolist()


def test_position_lists_are_cached_objects():
    """The scan checks a GPU position tensor once per object, so each size must give the same tensor every call."""
    assert cross_scan_positions(4, 5) is cross_scan_positions(4, 5)
    assert sequence_positions(7) is sequence_positions(7)
    assert sequence_positions(7).tolist() == [list(range(7))]


def official_ss2d(ssm: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D written out the way the official VMamba code computes it (docs/architecture.md, "SS2D and SS1D"):
    explicit cross-scan copies, per-direction einsum projections in scan order, the sequential reference scan,
    explicit cross-merge."""
    batch, height, width, _ = x.shape
    xi, z = ssm.in_proj(x).chunk(2, dim=-1)
    xi = F.silu(ssm.conv2d(xi.permute(0, 3, 1, 2)))  # (B, D, H, W)
    dim = xi.shape[1]
    rows, cols = xi.flatten(2), xi.transpose(2, 3).flatten(2)
    xs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)  # (B, 4, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, ssm.x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [ssm.dt_rank, ssm.d_state, ssm.d_state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, ssm.dt_projs_weight)
    y = selective_scan_reference(xs.flatten(1, 2), dts.flatten(1, 2), -torch.exp(ssm.A_logs), Bs, Cs, D=ssm.Ds,
                                 delta_bias=ssm.dt_projs_bias.flatten(), delta_softplus=True).view(*xs.shape)
    cols_merged = (y[:, 1] + y[:, 3].flip(-1)).view(batch, dim, width, height).transpose(2, 3).flatten(2)
    y = y[:, 0] + y[:, 2].flip(-1) + cols_merged
    y = ssm.out_norm(y.transpose(1, 2).reshape(batch, height, width, dim))
    return ssm.out_proj(y * F.silu(z))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in available_backends()])
@pytest.mark.parametrize("height, width, ssm_ratio", [(5, 7, 2.0), (6, 4, 1.5)])
def test_ss2d_equals_the_official_cross_scan_formulation(monkeypatch, backend, height, width, ssm_ratio):
    """Values and gradients of SS2D (position-order scan, no cross-scan copies) against the official formulation;
    d_inner 16 and 12 (padded to the kernel's 16 lanes)."""
    monkeypatch.setenv("NNUNETV2_CIPA_SCAN_BACKEND", backend)
    torch.manual_seed(0)
    ssm = SS2D(8, d_state=3, ssm_ratio=ssm_ratio).double()
    with torch.no_grad():
        ssm.A_logs.add_(torch.randn_like(ssm.A_logs) * 0.3)
    x = torch.randn(2, height, width, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (ssm, lambda t: official_ss2d(ssm, t)):
        out = fn(x)
        weight = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
        results.append((out, torch.autograd.grad((out * weight).sum(), [x, *ssm.parameters()])))
    (ours, our_grads), (official, official_grads) = results
    torch.testing.assert_close(ours, official, rtol=1e-9, atol=1e-10)
    for name, g, g_ref in zip(["x"] + [n for n, _ in ssm.named_parameters()], our_grads, official_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-9, msg=name)


def test_ss1d_scans_the_tokens_in_order():
    torch.manual_seed(0)
    ssm = SS1D(8, d_state=3).double()
    tokens = torch.randn(2, 11, 8, dtype=torch.float64)
    with torch.no_grad():
        x, z = F.silu(ssm.in_proj(tokens)).chunk(2, dim=-1)
        u = x.transpose(1, 2)
        x_dbl = torch.einsum("bdl,cd->bcl", u, ssm.x_proj_weight[0])
        dts, Bs, Cs = torch.split(x_dbl, [ssm.dt_rank, ssm.d_state, ssm.d_state], dim=1)
        y = selective_scan_reference(u, torch.einsum("brl,dr->bdl", dts, ssm.dt_projs_weight[0]),
                                     -torch.exp(ssm.A_logs), Bs, Cs, D=ssm.Ds,
                                     delta_bias=ssm.dt_projs_bias.flatten(), delta_softplus=True)
        expected = ssm.out_proj(ssm.out_norm(y.transpose(1, 2)) * z)
        torch.testing.assert_close(ssm(tokens), expected, rtol=1e-9, atol=1e-10)


def test_mixers_name_their_state_parameter_and_skip_weight_decay():
    for mixer, present, absent in ((SelectiveScanMixer, "A_logs", "state_weight"),
                                   (MemorylessMixer, "state_weight", "A_logs")):
        ssm = SS2D(8, d_state=3, ssm_ratio=1.0, mixer=mixer)
        names = dict(ssm.named_parameters())
        assert present in names and absent not in names and ssm.mixer_state is names[present]
        assert names[present].shape == (4 * 8, 3) and names[present]._no_weight_decay
    assert SS2D(8, d_state=3).A_logs[5].tolist() == pytest.approx([0.0, 0.6931472, 1.0986123])
    assert torch.equal(SS2D(8, d_state=3, mixer=MemorylessMixer).state_weight, torch.ones(4 * 16, 3))


def test_memoryless_mixer_is_the_scan_without_memory():
    """With A -> -inf the selective scan forgets every previous state: it must equal the memoryless control."""
    torch.manual_seed(0)
    ssm = SS2D(8, d_state=3, ssm_ratio=1.0)
    control = SS2D(8, d_state=3, ssm_ratio=1.0, mixer=MemorylessMixer)
    control.load_state_dict({k: v for k, v in ssm.state_dict().items() if k != "A_logs"}
                            | {"state_weight": torch.ones_like(ssm.A_logs)})
    with torch.no_grad():
        ssm.A_logs.fill_(30.0)
        x = torch.randn(2, 5, 6, 8)
        torch.testing.assert_close(control(x), ssm(x), rtol=1e-4, atol=1e-5)


def memoryless_mix_by_autograd(u, delta, bc, weight, d_sum, bias):
    """The memoryless mix in autograd's own ops (the op's definition)."""
    dt = F.softplus(delta + bias.view(delta.shape[0], 1, 1, -1))
    return u * (d_sum + (dt * torch.einsum("blkn,kdn->kbld", bc, weight)).sum(0))


def memoryless_mix_inputs(dtype=torch.float64, k=4, b=2, length=7, d=5, n=3):
    torch.manual_seed(0)
    shapes = [(b, length, d), (k, b, length, d), (b, length, k, n), (k, d, n), (d,), (k, d)]
    inputs = [torch.randn(shape, dtype=dtype) for shape in shapes]
    inputs[1] *= 4  # softplus on both sides of its bend
    return [t.requires_grad_() for t in inputs]


def test_memoryless_mix_matches_autograd_in_values_and_gradients():
    inputs = memoryless_mix_inputs()
    assert torch.autograd.gradcheck(memoryless_mix, inputs)
    out, expected = memoryless_mix(*inputs), memoryless_mix_by_autograd(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_memoryless_mix_computes_in_its_inputs_dtype_under_autocast():
    """Forward and backward alike, also when backward is called under autocast; one dtype for all inputs."""
    inputs = memoryless_mix_inputs(torch.float32)
    expected = memoryless_mix_by_autograd(*inputs)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = memoryless_mix(*inputs)
        grads = torch.autograd.grad(out, inputs, grad)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="share one dtype"):
        memoryless_mix(inputs[0], inputs[1].double(), *inputs[2:])


def test_memoryless_mix_keeps_one_directional_tensor_for_backward():
    """Autograd's own ops keep softplus's input and output and the mixed B*C for backward, three (K, B, L, D)
    tensors; the op keeps delta and the (B, L, D) gain besides its inputs (u, B*C and the parameters)."""
    inputs = memoryless_mix_inputs(torch.float32, b=2, length=64, d=16)
    directional = inputs[1].numel() * 4

    def saved_bytes(function) -> int:
        seen = {}

        def pack(t):
            seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            function(*inputs)
        return sum(size for ptr, size in seen.items() if ptr not in {t.data_ptr() for t in inputs})

    assert saved_bytes(memoryless_mix_by_autograd) >= 3 * directional
    assert saved_bytes(memoryless_mix) <= directional // 4 + directional // 8  # the gain only (delta is an input)


@pytest.mark.parametrize("mixer", [SelectiveScanMixer, MemorylessMixer])
@pytest.mark.parametrize("layer", ["ss2d", "ss1d"])
def test_mixer_output_reaches_out_norm_in_float32_under_fp16_autocast(layer, mixer):
    """Ds = 1e4 makes the mixer output exceed fp16's 65504: it must reach out_norm in float32 and the layer output
    must stay finite and close to the float32 computation."""
    torch.manual_seed(0)
    ssm = SS2D(8, d_state=3, ssm_ratio=1.0, mixer=mixer) if layer == "ss2d" else SS1D(8, d_state=3, mixer=mixer)
    with torch.no_grad():
        ssm.Ds.fill_(1e4)
    x = 3 * torch.randn(2, 6, 7, 8) if layer == "ss2d" else 3 * torch.randn(2, 11, 8)
    seen = []
    ssm.out_norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        expected = ssm(x)
        with torch.autocast("cpu", dtype=torch.float16):
            out = ssm(x)
    assert seen[1].dtype == torch.float32 and seen[1].abs().max() > 65504
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_window_partition_layout_and_roundtrip():
    x = torch.randn(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 4, 4, 3)
    torch.testing.assert_close(windows[3 + 2, 1, 3], x[0, 4 + 1, 8 + 3])  # window (1, 2), word (1, 3)
    torch.testing.assert_close(window_unpartition(windows, 8, 12), x)


def test_local_window_scan_does_not_leak_between_windows():
    torch.manual_seed(0)
    block = RegionGlobalInteraction(8, 4, d_state=2, ssm_ratio=1.0, d_conv=3)
    words, tokens = torch.randn(6, 4, 4, 8), torch.randn(1, 2, 3, 8)
    changed = words.clone()
    changed[2] += 1.0
    with torch.no_grad():
        a, b = block(words, tokens), block(changed, tokens)
    differs = (a - b).abs().flatten(1).amax(1) > 0
    assert differs.tolist() == [False, False, True, False, False, False]


def test_channel_rectification_is_a_per_channel_gain_between_one_and_two():
    torch.manual_seed(0)
    crm = ChannelRectification(4, 36, token_dim=8, d_state=2)
    ct, pet = torch.rand(2, 4, 6, 6) + 0.5, torch.rand(2, 4, 6, 6) + 0.5
    ct_out, pet_out = crm(ct, pet)
    for out, inp in ((ct_out, ct), (pet_out, pet)):
        gain = out / inp
        assert ((gain > 1) & (gain < 2)).all()
        torch.testing.assert_close(gain, gain[..., :1, :1].expand_as(gain))
    with pytest.raises(ValueError, match="36 pixels"):
        crm(torch.rand(1, 4, 5, 5), torch.rand(1, 4, 5, 5))
