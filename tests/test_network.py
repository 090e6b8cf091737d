"""CIPA network: shapes for nnU-Net patch sizes, deep supervision, parameter counts, gradients, ablations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.modules.crm import ChannelRectification
from nnunetv2_cipa.modules.dcim import RegionGlobalInteraction, window_partition, window_unpartition
from nnunetv2_cipa.modules.ss2d import SS1D, SS2D, cross_scan_positions
from nnunetv2_cipa.network import CIPA, DEEP_SUPERVISION_STRIDES, PRESETS
from nnunetv2_cipa.ops.selective_scan import available_backends, selective_scan_reference


def n_params(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("patch", [(64, 64), (80, 80), (96, 96), (112, 112), (160, 96), (256, 256), (72, 40)])
def test_output_shapes_with_and_without_deep_supervision(patch):
    torch.manual_seed(0)
    net = CIPA(3, patch, preset="micro", deep_supervision=True).eval()
    x = torch.rand(1, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
        net.deep_supervision = False
        main = net(x)
    assert isinstance(outputs, list) and len(outputs) == 1 + len(DEEP_SUPERVISION_STRIDES)
    assert outputs[0].shape == (1, 3, *patch)
    for aux, stride in zip(outputs[1:], DEEP_SUPERVISION_STRIDES):  # nnU-Net: round(s * 1/stride) per axis
        assert aux.shape == (1, 3, *(round(s / stride) for s in patch))
    assert isinstance(main, torch.Tensor)
    torch.testing.assert_close(main, outputs[0])


def test_state_dict_keys_do_not_depend_on_deep_supervision():
    on = CIPA(2, (64, 64), preset="micro", deep_supervision=True)
    off = CIPA(2, (64, 64), preset="micro", deep_supervision=False)
    assert list(on.state_dict()) == list(off.state_dict())
    assert off.decoder.deep_supervision is False
    off.deep_supervision = True
    assert off.decoder.deep_supervision is True


def test_smaller_input_is_padded_and_cropped_larger_is_rejected():
    net = CIPA(1, (96, 96), preset="micro").eval()
    with torch.no_grad():
        assert net(torch.rand(1, 2, 80, 70)).shape == (1, 1, 80, 70)
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 2, 128, 96))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 3, 96, 96))


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "huge"}, "unknown preset"),
    ({"ct_channel": 1, "pet_channel": 1}, "must differ"),
    ({"pet_channel": 2}, "pet_channel=2"),
    ({"patch_size": (64, 64, 64)}, "2D patch"),
])
def test_bad_constructor_arguments_raise_input_error(kwargs, message):
    args = {"num_classes": 1, "patch_size": (64, 64), "preset": "micro", **kwargs}
    with pytest.raises(InputError, match=message):
        CIPA(**args)


def test_tiny_parameter_counts_match_the_official_model():
    official = {"encoder": 22_125_792, "crm": 2_404_356, "dcim": 18_252_450, "decoder": 11_789_600}
    with torch.device("meta"):
        net = CIPA(1, (512, 512), preset="tiny")
    for name, expected in official.items():
        assert abs(n_params(getattr(net, name)) - expected) / expected < 0.01, name
    assert abs(n_params(net) - 54_572_198) / 54_572_198 < 0.01
    # exact per-stage counts of the parts that are unchanged from the official code
    assert [n_params(c) for c in net.crm] == [1_673_601, 469_377, 168_321, 93_057]
    assert [n_params(d.interaction) for d in net.dcim] == [213_696, 685_440, 2_403_072, 8_934_912]
    assert [n_params(d.ct_stem) + n_params(d.pet_stem) for d in net.dcim] == [71_406, 284_076, 1_133_208, 4_526_640]
    assert n_params(net.encoder.stages[0].blocks[0]) == 105_408


def test_every_parameter_receives_a_gradient_and_ssm_params_skip_weight_decay():
    torch.manual_seed(0)  # 256 rows: the stage-3 PET token grid (2x1) is longer than one token, so A matters
    net = CIPA(2, (256, 64), preset="micro", deep_supervision=True).train()
    outputs = net(torch.rand(2, 2, 256, 64))
    sum((o * torch.randn_like(o)).mean() for o in outputs).backward()
    missing = [n for n, p in net.named_parameters() if not p.requires_grad or p.grad is None or not p.grad.abs().sum()]
    assert missing == []
    no_decay = {n.rsplit(".", 1)[-1] for n, p in net.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_decay == {"A_logs", "Ds", "dt_projs_bias"}


def test_ablation_flags_change_the_module_set():
    full = CIPA(1, (64, 64), preset="micro")
    no_crm = CIPA(1, (64, 64), preset="micro", use_crm=False)
    no_dcim = CIPA(1, (64, 64), preset="micro", use_dcim=False)
    neither = CIPA(1, (64, 64), preset="micro", use_crm=False, use_dcim=False)
    assert no_crm.crm is None and not any(k.startswith("crm.") for k in no_crm.state_dict())
    assert no_dcim.dcim is None and not any(k.startswith("dcim.") for k in no_dcim.state_dict())
    assert n_params(full) == n_params(neither) + n_params(full.crm) + n_params(full.dcim)
    x = torch.rand(2, 2, 64, 64)
    for net in (no_crm, no_dcim, neither):
        assert net.eval()(x).shape == (2, 1, 64, 64)
    with torch.no_grad():  # neither: the fused feature is ct + pet
        enc = full.encoder(torch.cat([x[:, :1], x[:, 1:]]) * 3.2 - 1.6)
        torch.testing.assert_close(neither.fuse(0, *enc[0].split(2)), sum(enc[0].split(2)))


def test_no_mamba_control_has_no_ssm_state_and_the_same_size():
    with torch.device("meta"):
        full = CIPA(1, (512, 512), preset="tiny")
        control = CIPA(1, (512, 512), preset="tiny", use_mamba=False)
    assert not any("A_logs" in k for k in control.state_dict())
    assert abs(n_params(control) - n_params(full)) / n_params(full) < 0.01
    torch.manual_seed(0)
    net = CIPA(1, (64, 64), preset="micro", use_mamba=False)
    net(torch.rand(2, 2, 64, 64)).sum().backward()
    unused = {n for n, p in net.named_parameters() if p.grad is None}
    assert unused and all(n.startswith("decoder.aux_heads.") for n in unused)  # aux heads idle without DS


def test_fixed_seed_gives_identical_output_and_bf16_autocast_is_finite():
    x = torch.rand(2, 2, 64, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(CIPA(2, (64, 64), preset="micro").eval()(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(123)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = CIPA(2, (64, 64), preset="micro").eval()(x)
    assert torch.isfinite(out).all()


def test_cross_scan_positions_are_the_four_vmamba_orders():
    positions = cross_scan_positions(4, 5)  # H = 4, W = 5: position h*W + w
    assert positions.shape == (4, 20) and positions.dtype == torch.int64
    assert positions[0].tolist() == list(range(20))                                   # row-major
    assert positions[1].tolist() == [h * 5 + w for w in range(5) for h in range(4)]   # column-major
    assert positions[2].tolist() == positions[0].flip(0).tolist()
    assert positions[3].tolist() == positions[1].flip(0).tolist()


def official_ss2d(ssm: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D written out the way the official VMamba code computes it (spec §2.3): explicit cross-scan copies,
    per-direction einsum projections in scan order, the sequential reference scan, explicit cross-merge."""
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


def test_window_partition_layout_and_roundtrip():
    x = torch.randn(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 4, 4, 3)
    torch.testing.assert_close(windows[3 + 2, 1, 3], x[0, 4 + 1, 8 + 3])  # window (1, 2), word (1, 3)
    torch.testing.assert_close(window_unpartition(windows, 8, 12), x)


def test_local_window_scan_does_not_leak_between_windows():
    torch.manual_seed(0)
    block = RegionGlobalInteraction(8, 4, d_state=2, ssm_ratio=1.0, d_conv=3, use_mamba=True)
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


def test_presets_are_frozen_and_tiny_is_faithful():
    tiny = PRESETS["tiny"]
    assert (tiny.embed_dim, tiny.depths, tiny.d_state, tiny.decoder_d_state) == (96, (2, 2, 9, 2), 16, 4)
    assert (tiny.crm_token_dim, tiny.decoder_depth, tiny.drop_path_rate) == (96, 4, 0.0)
    with pytest.raises(AttributeError):
        tiny.embed_dim = 1  # type: ignore[misc]


def test_no_mamba_mixer_is_the_scan_without_memory():
    """With A -> -inf the selective scan forgets every previous state: it must equal the memoryless control."""
    torch.manual_seed(0)
    ssm = SS2D(8, d_state=3, ssm_ratio=1.0)
    control = SS2D(8, d_state=3, ssm_ratio=1.0, use_mamba=False)
    control.load_state_dict({k: v for k, v in ssm.state_dict().items() if k != "A_logs"}
                            | {"state_weight": torch.ones_like(ssm.A_logs)})
    with torch.no_grad():
        ssm.A_logs.fill_(30.0)
        x = torch.randn(2, 5, 6, 8)
        torch.testing.assert_close(control(x), ssm(x), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu_and_fp16_autocast_training_is_finite():
    """CIPA-micro on the GPU with the default backend (cuda with mamba-ssm, else torch): float32 logits equal the
    CPU's (TF32 convolutions off), and fp16 autocast steps with a GradScaler keep the loss and weights finite."""
    torch.manual_seed(0)
    net = CIPA(2, (96, 96), preset="micro", deep_supervision=True)
    x = torch.rand(2, 2, 96, 96)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = net.eval()(x)[0]
        got = net.cuda()(x.cuda())[0].cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    net.train()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")
    target = (x[:, 1] > 0.7).long().cuda()
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(net(x.cuda())[0].float(), target)
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped by the scaler if fp16 gradients overflowed
        scaler.update()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before))
