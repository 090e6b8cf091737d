"""Loading ImageNet VMamba v0 checkpoints (official key names, RGB stem) into CIPA's shared encoder."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from yacs.config import CfgNode

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.modules.vmamba import VMambaEncoder
from nnunetv2_cipa.network import CIPA, PRESETS
from nnunetv2_cipa.pretrained import load_vmamba_checkpoint, map_checkpoint_key


def official_state_dict(encoder: VMambaEncoder) -> dict[str, torch.Tensor]:
    """Random tensors under the VMamba v0 key names and shapes of ``encoder`` (3-channel stem, classifier)."""
    inverse = ((r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"layers.\1.blocks.\2.ln_1."),
               (r"^stages\.(\d+)\.blocks\.(\d+)\.op\.", r"layers.\1.blocks.\2.self_attention."),
               (r"^downsamples\.(\d+)\.", r"layers.\1.downsample."))
    state = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("out_norms."):
            continue
        for pattern, replacement in inverse:
            key = re.sub(pattern, replacement, key)
        shape = (value.shape[0], 3, *value.shape[2:]) if key == "patch_embed.proj.weight" else value.shape
        state[key] = torch.randn(shape)
    last = encoder.dims[-1]
    state.update({"norm.weight": torch.ones(last), "norm.bias": torch.zeros(last),
                  "head.weight": torch.randn(1000, last), "head.bias": torch.zeros(1000)})
    return state


def test_official_key_names_map_to_the_encoder():
    assert map_checkpoint_key("layers.2.blocks.8.ln_1.weight") == "stages.2.blocks.8.norm.weight"
    assert map_checkpoint_key("layers.0.blocks.1.self_attention.A_logs") == "stages.0.blocks.1.op.A_logs"
    assert map_checkpoint_key("layers.1.downsample.reduction.weight") == "downsamples.1.reduction.weight"
    assert map_checkpoint_key("patch_embed.0.weight") == "patch_embed.proj.weight"
    assert map_checkpoint_key("head.weight") is None and map_checkpoint_key("norm.bias") is None


def test_tiny_checkpoint_layout_loads_into_the_network(tmp_path):
    cfg = PRESETS["tiny"]
    encoder = VMambaEncoder(cfg.dims, cfg.encoder_drop_paths, cfg.d_state, cfg.ssm_ratio, cfg.d_conv, cfg.patch)
    state = official_state_dict(encoder)
    # shapes of the official VMamba-T v0 checkpoint (docs/architecture.md, "Shared VMamba encoder")
    assert state["patch_embed.proj.weight"].shape == (96, 3, 4, 4)
    assert state["layers.0.blocks.0.self_attention.x_proj_weight"].shape == (4, 38, 192)
    assert state["layers.3.blocks.1.self_attention.A_logs"].shape == (4 * 1536, 16)
    path = tmp_path / "vssmtiny.pth"
    torch.save({"model": state, "epoch": 292}, path)
    report = load_vmamba_checkpoint(encoder, path)
    assert report.missing == [f"out_norms.{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert sorted(report.unexpected) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert len(report.loaded) == len(state) - 4
    loaded = encoder.state_dict()
    torch.testing.assert_close(loaded["patch_embed.proj.weight"], state["patch_embed.proj.weight"].sum(1, True))
    torch.testing.assert_close(loaded["stages.2.blocks.8.op.Ds"], state["layers.2.blocks.8.self_attention.Ds"])
    torch.testing.assert_close(loaded["downsamples.0.norm.weight"], state["layers.0.downsample.norm.weight"])


def test_checkpoint_loads_into_a_cipa_model_and_the_stem_sum_is_exact(tmp_path):
    torch.manual_seed(0)
    net = CIPA(1, (64, 64), preset="micro")
    state = official_state_dict(net.encoder)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    load_vmamba_checkpoint(net, tmp_path / "ckpt.pth")
    gray = torch.rand(1, 1, 8, 8)
    rgb_stem = torch.nn.functional.conv2d(gray.repeat(1, 3, 1, 1), state["patch_embed.proj.weight"],
                                          state["patch_embed.proj.bias"], stride=4)
    torch.testing.assert_close(net.encoder.patch_embed.proj(gray), rgb_stem)


def test_bad_files_and_mismatching_checkpoints_raise_input_error(tmp_path):
    net = CIPA(1, (64, 64), preset="micro")
    with pytest.raises(InputError, match="no such file"):
        load_vmamba_checkpoint(net, tmp_path / "absent.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        load_vmamba_checkpoint(net, tmp_path / "notes.pth")
    torch.save({"model": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(InputError, match="'model' state dict"):
        load_vmamba_checkpoint(net, tmp_path / "list.pth")

    state = official_state_dict(net.encoder)
    wrong_shape = dict(state, **{"layers.0.blocks.0.self_attention.Ds": torch.ones(7)})
    torch.save({"model": wrong_shape}, tmp_path / "shape.pth")
    with pytest.raises(InputError, match=r"Ds' has shape \(7,\)"):
        load_vmamba_checkpoint(net, tmp_path / "shape.pth")
    incomplete = {k: v for k, v in state.items() if not k.startswith("layers.3.")}
    torch.save({"model": incomplete}, tmp_path / "incomplete.pth")
    with pytest.raises(InputError, match="missing key 'stages.3.blocks.0"):
        load_vmamba_checkpoint(net, tmp_path / "incomplete.pth")
    deeper = dict(state, **{"layers.0.blocks.5.ln_1.weight": torch.ones(16)})
    torch.save({"model": deeper}, tmp_path / "deeper.pth")
    with pytest.raises(InputError, match="unexpected key 'layers.0.blocks.5.ln_1.weight'"):
        load_vmamba_checkpoint(net, tmp_path / "deeper.pth")


def test_checkpoint_as_vmamba_training_saves_it_loads(tmp_path):
    """VMamba's training code saves the optimiser, scheduler and scaler states, the best accuracy and its yacs
    configuration next to the weights; weights_only refuses the CfgNode (a dict subclass it cannot rebuild)."""
    net = CIPA(1, (64, 64), preset="micro")
    state = official_state_dict(net.encoder)
    config = CfgNode({"MODEL": CfgNode({"TYPE": "vssm", "DROP_PATH_RATE": 0.1}), "TRAIN": CfgNode({"EPOCHS": 300})})
    config.freeze()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": {"last_epoch": 292},
                "max_accuracy": np.float64(82.2), "scaler": {}, "epoch": 292, "config": config}, tmp_path / "v.pth")
    report = load_vmamba_checkpoint(net, tmp_path / "v.pth")
    assert len(report.loaded) == len(state) - 4
    torch.testing.assert_close(net.encoder.state_dict()["stages.0.blocks.0.op.Ds"],
                               state["layers.0.blocks.0.self_attention.Ds"])


class _RunsCode:
    """Pickles as a call of exec: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    net = CIPA(1, (64, 64), preset="micro")
    marker = tmp_path / "ran.txt"
    torch.save({"model": official_state_dict(net.encoder), "config": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match=r"evil.pth: not loaded, it references builtins.exec"):
        load_vmamba_checkpoint(net, tmp_path / "evil.pth")
    assert not marker.exists()


def test_legacy_format_checkpoints_that_reference_classes_are_named_as_such(tmp_path):
    """torch < 1.6's format: weights_only reads it, but its references cannot be listed; a configuration class or
    code is refused with what it references and how to re-save it, and torch's advice to load it unchecked is not
    passed on."""
    net = CIPA(1, (64, 64), preset="micro")
    marker = tmp_path / "ran.txt"
    for name, extra, named in (("namespace", argparse.Namespace(epochs=300), "argparse.Namespace"),
                               ("evil", _RunsCode(marker), "GLOBAL exec")):
        torch.save({"model": official_state_dict(net.encoder), "config": extra}, tmp_path / f"{name}.pth",
                   _use_new_zipfile_serialization=False)
        with pytest.raises(InputError, match=rf"{name}.pth: not loaded, a checkpoint in torch's legacy \(< 1.6\) "
                                             rf"format .*{named}") as error:
            load_vmamba_checkpoint(net, tmp_path / f"{name}.pth")
        assert "Re-running" not in str(error.value) and "add_safe_globals" not in str(error.value)
    assert not marker.exists()
    torch.save({"model": official_state_dict(net.encoder)}, tmp_path / "plain.pth",
               _use_new_zipfile_serialization=False)
    assert load_vmamba_checkpoint(net, tmp_path / "plain.pth").loaded
