"""The authors' trained CIPA (the state dict of the official ``EncoderDecoder``, e.g. ``CIPA.pth``) in our network.

Official key names are derived from our ``CIPA``'s own modules (stage, block and stem-conv counts):
``official_key_prefixes`` pairs each prefix of our state dict with the official one, and ``official_names`` maps
every tensor of the network (parameters and buffers, aliases once) to its official key. Two tensors change form:

- stem ``encoder.patch_embed.proj.weight``: the official (C, 3, p, p) RGB kernel, fed a grayscale image repeated 3
  times, is summed over its input channels (conv(repeat(x, 3), W) == conv(x, W.sum(1)));
- head ``decoder.head.weight``: the official one-logit head z (1, C, 1, 1, sigmoid > 0.5) is copied into a one-logit
  head, or becomes the two-class head [0, z] of a softmax network, whose argmax is then sigmoid(z) > 0.5.

The deep-supervision heads (``decoder.aux_heads.*``) are not in the official model; they keep the network's
initialisation and are unused at inference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunetv2_cipa.checkpoint_file import load_checkpoint_file
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.network import CIPA

STEM_KEY = "encoder.patch_embed.proj.weight"
HEAD_KEY = "decoder.head.weight"
AUX_HEADS_PREFIX = "decoder.aux_heads."
DDP_PREFIX = "module."
OFFICIAL_CHECKPOINT = "official checkpoint"  # how messages name the file
# positions in the official CRM's ``channel_weights.mlp`` Sequential (position 2 is its GELU)
_CRM_LAYERS = {"spatial_norm": 0, "embed": 1, "channel_ssm": 3, "token_norm": 4, "to_weight": 5}
_DCIM_INTERACTION = {"ct_norm": "inner_norm1", "ct_ssm": "inner_attn", "pet_norm": "outer_norm1",
                     "pet_ssm": "outer_attn"}
_DCIM_STEMS = {"ct_stem": "inner_convs", "pet_stem": "outer_convs"}  # official: flat (conv, BN, ReLU) triples
_CHANNEL_ATTENTION = 3  # position of the channel attention in our CAB body and in the official ``conv_blk.cab``


def official_key_prefixes(network: CIPA) -> list[tuple[str, str]]:
    """(our prefix, official prefix) pairs for ``network``, longest first (the first match is the one to use)."""
    pairs = [("encoder.patch_embed.proj.", "backbone.vssm.patch_embed.0."),
             ("encoder.patch_embed.norm.", "backbone.vssm.patch_embed.2."),
             ("encoder.stages.", "backbone.vssm.layers."),
             ("decoder.patch_expand.", "decode_head.layers_up.0."),
             ("decoder.norm_up.", "decode_head.norm_up."),
             ("decoder.final_upsample.", "decode_head.up."),
             ("decoder.head.", "decode_head.output.")]
    pairs += [(f"encoder.downsamples.{i}.", f"backbone.vssm.layers.{i}.downsample.")
              for i in range(len(network.encoder.downsamples))]
    pairs += [(f"encoder.out_norms.{i}.", f"backbone.vssm.outnorm{i}.") for i in range(len(network.encoder.out_norms))]
    for i in range(len(network.crm or ())):
        pairs += [(f"crm.{i}.{ours}.", f"backbone.cross_mamba.{i}.channel_weights.mlp.{position}.")
                  for ours, position in _CRM_LAYERS.items()]
    for i, dcim in enumerate(network.dcim or ()):
        pairs += [(f"dcim.{i}.interaction.{ours}.", f"backbone.channel_attn_mamba.{i}.{theirs}.")
                  for ours, theirs in _DCIM_INTERACTION.items()]
        for stem, theirs in _DCIM_STEMS.items():
            for k in range(len(getattr(dcim, stem).convs)):
                pairs += [(f"dcim.{i}.{stem}.convs.{k}.conv.", f"backbone.region_patch.{i}.{theirs}.{3 * k}."),
                          (f"dcim.{i}.{stem}.convs.{k}.norm.", f"backbone.region_patch.{i}.{theirs}.{3 * k + 1}.")]
    for i, stage in enumerate(network.decoder.stages):
        ours, theirs = f"decoder.stages.{i}.", f"decode_head.layers_up.{i + 1}."
        pairs.append((ours, theirs))
        for j in range(len(stage.blocks)):
            pairs += [(f"{ours}blocks.{j}.cab.body.", f"{theirs}blocks.{j}.conv_blk.cab."),
                      (f"{ours}blocks.{j}.cab.body.{_CHANNEL_ATTENTION}.mlp.",
                       f"{theirs}blocks.{j}.conv_blk.cab.{_CHANNEL_ATTENTION}.fc.")]
    return sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)


def network_tensors(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and state-dict buffer of ``network`` once, under its first name (no module aliases)."""
    state_keys = set(network.state_dict())
    tensors = dict(network.named_parameters())
    tensors.update((name, b) for name, b in network.named_buffers() if name in state_keys)
    return tensors


def official_names(network: CIPA) -> tuple[dict[str, str], list[str]]:
    """(official key -> our key for every tensor of ``network`` the official model has, our keys it lacks)."""
    prefixes = official_key_prefixes(network)
    mapping, absent = {}, []
    for name in network_tensors(network):
        official = next((theirs + name[len(ours):] for ours, theirs in prefixes if name.startswith(ours)), None)
        if official is None:
            absent.append(name)
        elif official in mapping:
            raise RuntimeError(f"official key {official} derived for both {mapping[official]} and {name}")
        else:
            mapping[official] = name
    return mapping, absent


@dataclass(frozen=True)
class OfficialCheckpoint:
    """An official checkpoint file read into memory: its state dict and how it was stored."""

    path: Path
    state: dict[str, torch.Tensor]
    layout: str              # "wrapped" ({"model": state_dict, ...}, the official train.py) or "bare"
    module_prefix: bool      # whether the keys carried DDP's "module." prefix (stripped)
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """Read ``path``: the official ``{"model": state_dict, "optimizer": ..., "args": Namespace, ...}``, a bare state
    dict, or either with ``module.``-prefixed keys, read by ``load_checkpoint_file`` (which allows the Namespace);
    InputError naming the file otherwise."""
    path = Path(path)
    content = load_checkpoint_file(path, OFFICIAL_CHECKPOINT)
    wrapped = isinstance(content, dict) and isinstance(content.get("model"), dict)
    state = content["model"] if wrapped else content
    if not isinstance(state, dict) or not state:
        raise InputError(f"official checkpoint {path}: expected {{'model': state_dict, ...}} or a state dict, got "
                         f"{type(state).__name__}")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise InputError(f"official checkpoint {path}: entries that are not tensors: {_shorten(not_tensors)}")
    prefixed = all(k.startswith(DDP_PREFIX) for k in state)
    if prefixed:
        state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return OfficialCheckpoint(path, state, "wrapped" if wrapped else "bare", prefixed, file_sha256(path))


@dataclass(frozen=True)
class OfficialWeights:
    """What ``load_official_weights`` did."""

    mapped: int                      # official tensors copied, each into exactly one network tensor
    head: str                        # how the one-logit head was placed
    parameters: int                  # network parameters in all
    parameters_not_in_official_model: int
    not_in_official_model: list[str]  # network tensors that keep their initialisation (deep-supervision heads)


def load_official_weights(network: CIPA, state: dict[str, torch.Tensor], source: str) -> OfficialWeights:
    """Copy the official state dict ``state`` into ``network``; InputError naming ``source`` and listing every missing,
    unexpected and wrongly shaped key. ``network`` is left untouched unless everything fits."""
    mapping, absent = official_names(network)
    tensors = network_tensors(network)
    extra = [name for name in absent if not name.startswith(AUX_HEADS_PREFIX)]
    if extra:
        raise InputError(f"{source}: the network has tensors with no counterpart in the official model: "
                         f"{_shorten(extra)}")
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    values, wrong_shape, head = {}, [], ""
    for official, ours in mapping.items():
        if official not in state:
            continue
        value, target = state[official], tensors[ours]
        if ours == STEM_KEY and value.dim() == 4 and value.shape[1] != target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if ours == HEAD_KEY:
            value, head = _place_head(value, tuple(target.shape))
        if value.shape != target.shape:
            wrong_shape.append(f"{official} {_shape(state[official])} (network needs {_shape(target)} for {ours})")
        values[ours] = value
    problems = [f"{len(items)} {what}: {_shorten(items)}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong_shape)) if items]
    if problems:
        raise InputError(f"{source} does not fit the official CIPA network: " + "; ".join(problems))
    with torch.no_grad():
        for ours, value in values.items():
            tensors[ours].copy_(value)
    parameters = dict(network.named_parameters())
    return OfficialWeights(mapped=len(values), head=head, parameters=sum(p.numel() for p in parameters.values()),
                           parameters_not_in_official_model=sum(parameters[n].numel() for n in absent
                                                                if n in parameters),
                           not_in_official_model=absent)


def _place_head(weight: torch.Tensor, target_shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """The official one-logit head in a head of ``target_shape``: copied, or as two-class logits [0, z]."""
    if tuple(weight.shape) == target_shape:
        return weight, "one logit z, copied (label = sigmoid(z) > 0.5)"
    if weight.shape[0] == 1 and target_shape == (2, *weight.shape[1:]):
        return (torch.cat([torch.zeros_like(weight), weight]),
                "one logit z as two-class logits [0, z] (softmax argmax = sigmoid(z) > 0.5)")
    return weight, ""


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def _shorten(items: list[str], shown: int = 10) -> str:
    return ", ".join(items[:shown]) + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")
