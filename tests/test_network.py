"""CIPA network: the structure derived from CIPAConfig (grid of configs, exact output size, no silent crop), the
official state-dict layout, deep supervision, the one-logit head, activation checkpointing, ablations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from nnunetv2_cipa.modules.decoder import ChannelAttention
from nnunetv2_cipa.network import CIPA, PRESETS

OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_cipa_tiny_keys.tsv"
MICRO = PRESETS["micro"]


def n_params(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def ds_size(size, stride):  # nnU-Net's DownsampleSegForDSTransform: round(s * 1/stride) per axis
    return tuple(round(s / stride) for s in size)


@pytest.mark.parametrize("patch", [(64, 64), (80, 80), (96, 96), (112, 112), (160, 96), (256, 256), (72, 40)])
def test_output_shapes_with_and_without_deep_supervision(patch):
    torch.manual_seed(0)
    net = CIPA(3, patch, preset="micro", deep_supervision=True).eval()
    assert net.deep_supervision_strides == (4, 8, 16)
    x = torch.rand(1, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
        net.deep_supervision = False
        main = net(x)
    assert [o.shape for o in outputs] == [(1, 3, *patch)] + [(1, 3, *ds_size(patch, s)) for s in (4, 8, 16)]
    torch.testing.assert_close(main, outputs[0])


GRID = [dict(depths=depths, window=window, patch=patch)
        for depths in ((1, 1, 1), (1, 2, 1, 1)) for window in (4, 8) for patch in (2, 4)]


@pytest.mark.parametrize("fields", GRID, ids=lambda f: f"stages{len(f['depths'])}-w{f['window']}-p{f['patch']}")
def test_config_grid_gives_the_input_size_without_a_silent_crop(fields):
    """Every structure the table accepts: main and aux outputs of exactly nnU-Net's sizes for an odd patch, and a
    locality probe: with the global paths off (memoryless mixer, no CRM, constant channel attention), the logit
    change caused by changing an 8 x 8 block of the input must be centred on that block. A network whose output
    grid is scaled against the input (e.g. a 2x too large map cropped to its top-left quarter) fails it."""
    cfg = dataclasses.replace(MICRO, **fields)
    size = (45, 61)
    strides = cfg.deep_supervision_strides
    assert strides == tuple(cfg.patch * 2 ** i for i in range(len(cfg.depths) - 1))
    torch.manual_seed(0)
    x = torch.rand(1, 2, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = CIPA(2, size, preset=cfg, deep_supervision=True).eval()(x)
    assert [o.shape for o in outputs] == [(1, 2, *size)] + [(1, 2, *ds_size(size, s)) for s in strides]

    local = CIPA(2, size, preset=cfg, use_crm=False, token_mixer="memoryless").eval()
    for module in local.modules():
        if isinstance(module, ChannelAttention):
            torch.nn.init.zeros_(module.mlp[-1].weight)  # gain sigmoid(0) everywhere: no global pooling path
    y = x.clone()
    y[:, :, 12:20, 16:24] += 1.0  # block centre (15.5, 19.5); a 2x scaled output grid would put it at (31, 39)
    with torch.no_grad():
        weight = (local(y) - local(x)).abs().sum(1)[0] ** 2
    rows, cols = torch.arange(size[0])[:, None], torch.arange(size[1])[None]
    centre = ((weight * rows).sum() / weight.sum(), (weight * cols).sum() / weight.sum())
    assert abs(centre[0] - 15.5) < 4 and abs(centre[1] - 19.5) < 4, centre
    assert weight[12:20, 16:24].sqrt().mean() > 3 * weight.sqrt().mean()


def test_config_derives_the_official_structure():
    tiny = PRESETS["tiny"]
    assert tiny.dims == (96, 192, 384, 768) and tiny.strides == (4, 8, 16, 32) and tiny.encoder_stride == 32
    assert tiny.deep_supervision_strides == (4, 8, 16)
    assert tiny.pet_stem_strides == (1, 2, 2, 1)
    assert tiny.pet_stem_widths[0] == (96, 6, 12, 24, 96) and tiny.pet_stem_widths[3] == (768, 48, 96, 192, 768)
    assert tiny.ct_stem_widths[1] == (192, 48, 192)
    assert [len(r) for r in tiny.encoder_drop_paths] == [2, 2, 9, 2]
    rates = tiny.decoder_drop_paths  # the official linspace(0, 0.1, 16): stage i takes slots 4i .. 4i+3
    assert [pytest.approx(r, abs=5e-4) for r in rates] == [(0, 0.0067, 0.0133, 0.02), (0.0267, 0.0333, 0.04, 0.0467),
                                                            (0.0533, 0.06, 0.0667, 0.0733)]
    wide = dataclasses.replace(tiny, window=8, patch=2, depths=(2, 2, 2))
    assert wide.pet_stem_strides == (1, 2, 2, 2, 1) and wide.pet_stem_widths[0] == (96, 6, 12, 24, 48, 96)
    assert wide.strides == (2, 4, 8) and wide.deep_supervision_strides == (2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.embed_dim = 1  # type: ignore[misc]


@pytest.mark.parametrize("field, value", [
    ("depths", (2,)), ("depths", (2, 0, 2)), ("embed_dim", 0), ("window", 6), ("patch", 3), ("d_conv", 4),
    ("pet_stem_reduction", 32), ("ct_stem_reduction", 0), ("drop_path_rate", 1.0), ("ssm_ratio", 0.01),
    ("decoder_depth", 1.5), ("checkpoint", 3),
])
def test_config_refuses_what_cannot_build_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"CIPAConfig\.{field}="):
        dataclasses.replace(MICRO, **{field: value})


def test_tiny_state_dict_has_the_official_keys_and_shapes():
    """Every key of the official sigma_tiny model (tests/data) at its shape in ours (one-channel stem); our extra
    keys are only the aux heads and DNA's ``all_modules`` aliases. The one-logit head gives the same layout."""
    table = [line.split("\t") for line in OFFICIAL_KEYS.read_text().splitlines()[1:]]
    expected = {ours: () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
                for _, shape, _, ours in table}
    expected["encoder.patch_embed.proj.weight"] = (96, 1, 4, 4)  # official 96x3x4x4, summed over RGB on import
    with torch.device("meta"):
        networks = [CIPA(1, (512, 512), preset="tiny"), CIPA(2, (512, 512), preset="tiny", binary_logit=True)]
    for net in networks:
        state = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert {k: state.get(k) for k in expected} == expected
        extra = set(state) - set(expected)
        assert all(k.startswith("decoder.aux_heads.") or ".all_modules." in k for k in extra)
        assert sum(k.startswith("decoder.aux_heads.") for k in extra) == 9
        assert state["decoder.head.weight"] == (1, 96, 1, 1)


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


@pytest.mark.parametrize("kwargs, error, message", [
    ({"preset": "huge"}, ValueError, "unknown preset"),
    ({"preset": 3}, TypeError, "preset must be"),
    ({"token_mixer": "attention"}, ValueError, "unknown token_mixer"),
    ({"num_classes": 2.0}, TypeError, "num_classes must be an int"),
    ({"num_classes": 3, "binary_logit": True}, ValueError, "exactly 2 with binary_logit"),
    ({"ct_channel": 1, "pet_channel": 1}, ValueError, "must differ"),
    ({"pet_channel": 2}, ValueError, "pet_channel=2"),
    ({"patch_size": (64, 64, 64)}, ValueError, "2D patch"),
])
def test_bad_constructor_arguments_raise_value_or_type_error(kwargs, error, message):
    args = {"num_classes": 1, "patch_size": (64, 64), "preset": "micro", **kwargs}
    with pytest.raises(error, match=message):
        CIPA(**args)


def test_binary_logit_head_gives_two_class_logits_zero_and_z():
    """binary_logit: one-channel heads; each output is [0, z] with z the logit a num_classes=1 network with the same
    weights computes, so softmax channel 1 is sigmoid(z) and argmax is z > 0, at every deep-supervision level."""
    torch.manual_seed(0)
    net = CIPA(2, (72, 40), preset="micro", binary_logit=True, deep_supervision=True).eval()
    single = CIPA(1, (72, 40), preset="micro", deep_supervision=True).eval()
    single.load_state_dict(net.state_dict())
    assert net.decoder.head.weight.shape == (1, 16, 1, 1)
    assert all(h.conv.weight.shape[0] == 1 for h in net.decoder.aux_heads)
    x = torch.rand(2, 2, 72, 40)
    with torch.no_grad():
        outputs, logits = net(x), single(x)
    assert [o.shape for o in outputs] == [(2, 2, 72, 40)] + [(2, 2, *ds_size((72, 40), s)) for s in (4, 8, 16)]
    for out, z in zip(outputs, logits):
        assert torch.equal(out[:, :1], torch.zeros_like(z)) and torch.equal(out[:, 1:], z)
        torch.testing.assert_close(out.softmax(1)[:, 1:], torch.sigmoid(z))
        assert torch.equal(out.argmax(1, keepdim=True), (z > 0).long())
    net.deep_supervision = False
    with torch.no_grad():
        assert net(x).shape == (2, 2, 72, 40)


def test_every_parameter_receives_a_gradient_and_ssm_params_skip_weight_decay():
    torch.manual_seed(0)  # 256 rows: the stage-3 PET token grid (2x1) is longer than one token, so A matters
    net = CIPA(2, (256, 64), preset="micro", deep_supervision=True).train()
    outputs = net(torch.rand(2, 2, 256, 64))
    sum((o * torch.randn_like(o)).mean() for o in outputs).backward()
    missing = [n for n, p in net.named_parameters() if not p.requires_grad or p.grad is None or not p.grad.abs().sum()]
    assert missing == []
    no_decay = {n.rsplit(".", 1)[-1] for n, p in net.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_decay == {"A_logs", "Ds", "dt_projs_bias"}


def checkpointing_run(enabled: bool):
    """One float64 training step of micro (drop path on, deep supervision) at 32 x 32: loss, gradients, buffers,
    bytes of the distinct storages autograd keeps after the forward, and the allocator's peak over fwd + bwd."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(MICRO, drop_path_rate=0.3, decoder_drop_path_rate=0.3)
    net = CIPA(2, (32, 32), preset=cfg, deep_supervision=True).double().train()
    net.activation_checkpointing = enabled
    x = torch.rand(2, 2, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(7)  # the DropPath masks
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with saved_tensors_hooks(pack, lambda t: t):
            outputs = net(x)
        loss = sum((o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view_as(o)).mean() for o in outputs)
        loss.backward()
    allocations = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
    live = peak = 0
    for event in allocations:
        live += event.nbytes()
        peak = max(peak, live)
    grads = {n: p.grad for n, p in net.named_parameters()}
    return loss.detach(), grads, dict(net.named_buffers()), sum(kept.values()), peak


def test_activation_checkpointing_gives_the_same_step_with_less_memory():
    plain, ckpt = checkpointing_run(False), checkpointing_run(True)
    torch.testing.assert_close(ckpt[0], plain[0], rtol=1e-12, atol=0)
    assert plain[1].keys() == ckpt[1].keys() and all(g is not None for g in ckpt[1].values())
    for name, grad in plain[1].items():
        torch.testing.assert_close(ckpt[1][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert any("running_mean" in n for n in plain[2])
    for name, buffer in plain[2].items():  # BatchNorm statistics updated once, as without checkpointing
        assert torch.equal(ckpt[2][name], buffer), name
    assert ckpt[3] < 0.25 * plain[3], (ckpt[3], plain[3])
    assert ckpt[4] < 0.8 * plain[4], (ckpt[4], plain[4])


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
        control = CIPA(1, (512, 512), preset="tiny", token_mixer="memoryless")
    keys = list(control.state_dict())
    assert not any("A_logs" in k for k in keys)
    assert keys == [k.replace("A_logs", "state_weight") for k in full.state_dict()]
    assert n_params(control) == n_params(full)
    torch.manual_seed(0)
    net = CIPA(1, (64, 64), preset="micro", token_mixer="memoryless")
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


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_training_after_a_first_prediction_in_inference_mode(backend, monkeypatch):
    """The scan orders are cached per shape: one first built under inference mode (nnUNetv2_predict, or a notebook
    that predicts before it trains) must still serve a training step's backward."""
    from nnunetv2_cipa.modules import ss2d
    from nnunetv2_cipa.ops import backends, cpu_scan

    if backend not in backends.available_backends():
        pytest.skip(f"the {backend} backend is not usable here")
    monkeypatch.setenv(backends.ENV_VAR, backend)
    for cached in (ss2d._cross_scan_positions, ss2d._sequence_positions, cpu_scan._plain_positions):
        cached.cache_clear()
    torch.manual_seed(0)
    net = CIPA(2, (64, 64), preset="micro", deep_supervision=True)
    x = torch.rand(2, 2, 64, 64)
    with torch.inference_mode():
        net.eval()(x)
    sum(out.square().mean() for out in net.train()(x)).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_autocast_dtype_fixes_the_precision_whatever_the_caller():
    torch.manual_seed(0)
    x = torch.rand(1, 2, 64, 64)
    nets = {dtype: CIPA(2, (64, 64), preset="micro", autocast_dtype=dtype).eval() for dtype in (torch.float32,
                                                                                               torch.bfloat16)}
    nets[torch.bfloat16].load_state_dict(nets[torch.float32].state_dict())
    with torch.no_grad():
        plain = nets[torch.float32](x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fixed = nets[torch.float32](x)
        low = nets[torch.bfloat16](x)
    assert fixed.dtype == torch.float32 and torch.equal(fixed, plain)
    assert low.dtype == torch.float32 and not torch.equal(low, plain)  # computed in bf16, returned in float32
    torch.testing.assert_close(low, plain, rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="autocast_dtype"):
        CIPA(2, (64, 64), preset="micro", autocast_dtype=torch.int8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu_and_fp16_autocast_training_is_finite():
    """CIPA-micro on the GPU with the default backend (cuda with mamba-ssm, else triton or torch): float32 logits
    equal the CPU's (TF32 convolutions and matmuls off, whatever the environment sets), and fp16 autocast steps with
    a GradScaler keep the loss and weights finite."""
    torch.manual_seed(0)
    net = CIPA(2, (96, 96), preset="micro", deep_supervision=True)
    x = torch.rand(2, 2, 96, 96)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            expected = net.eval()(x)[0]
            got = net.cuda()(x.cuda())[0].cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
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
