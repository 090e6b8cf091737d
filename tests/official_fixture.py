"""Fake official CIPA checkpoints built from tests/data/official_cipa_tiny_keys.tsv (the authors' key list)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nnunetv2_cipa.network import CIPA

KEYS_TSV = Path(__file__).parent / "data" / "official_cipa_tiny_keys.tsv"
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def official_key_table() -> list[tuple[str, tuple[int, ...], torch.dtype, str]]:
    """(official key, shape, dtype, our key) for every entry of the official sigma_tiny state dict."""
    rows = []
    for line in KEYS_TSV.read_text().splitlines()[1:]:
        key, shape, dtype, ours = line.split("\t")
        rows.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x")), DTYPES[dtype], ours))
    return rows


def fake_official_state(seed: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the official names, shapes and dtypes, scaled like a trained network: weights
    N(0, 1/fan_in), norm weights and residual scales near 1, positive BN variances. An unscaled random network is
    chaotic (float32 rounding, e.g. another thread count, moves its logits by 0.1-1); this one changes them by about
    1e-5. With the default seed about 12% of the synthetic test pixels get a positive logit, so both labels occur."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype, _ in official_key_table():
        noise = torch.randn(shape, generator=generator) if dtype != torch.int64 else None
        if dtype == torch.int64:
            state[key] = torch.randint(0, 1000, shape, generator=generator)
        elif key.endswith("running_var"):
            state[key] = noise.abs() + 0.5
        elif len(shape) >= 2:  # conv (out, in, k, k): fan-in in*k*k; linear and SSM projections: the last axis
            fan_in = shape[1] * shape[2] * shape[3] if len(shape) == 4 else shape[-1]
            state[key] = noise / fan_in ** 0.5
        elif ("norm" in key and key.endswith("weight")) or ".scale" in key:  # norms, CVSS residual scales
            state[key] = 1 + 0.1 * noise
        else:
            state[key] = 0.1 * noise
    return state


def official_file_content(state: dict[str, torch.Tensor]) -> dict:
    """What the official train.py saves: the state dict under "model", with optimizer, epoch and argparse args."""
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 6e-5, "params": [0]}]}, "epoch": 49,
            "args": argparse.Namespace(lr=6e-5, batch_size=4, img_dir="data/PCLT20k/")}


def reference_network(state: dict[str, torch.Tensor]) -> CIPA:
    """Our CIPA with the official input convention (one logit, inputs already x/255*3.2-1.6, channels CT, PET),
    loaded through the fixture's own key column, independently of nnunetv2_cipa.official."""
    network = CIPA(num_classes=1, patch_size=(512, 512), preset="tiny", input_scale=1.0, input_shift=0.0).eval()
    tensors = dict(network.named_parameters())
    tensors.update(network.named_buffers())
    with torch.no_grad():
        for key, _, _, ours in official_key_table():
            value = state[key]
            tensors[ours].copy_(value.sum(1, keepdim=True) if ours == "encoder.patch_embed.proj.weight" else value)
    return network
