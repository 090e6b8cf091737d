"""Load an ImageNet VMamba v0 checkpoint (e.g. vssmtiny_dp01_ckpt_epoch_292.pth) into CIPA's shared encoder.

Old key names are mapped to ours (docs/architecture.md, "Pretrained encoder"): ``patch_embed.proj/norm`` stay,
``layers.i.blocks.j.ln_1`` -> ``stages.i.blocks.j.norm``, ``self_attention`` -> ``op``, ``layers.i.downsample`` ->
``downsamples.i``; the ImageNet classifier (``norm.*``, ``head.*``) is dropped. The RGB stem kernel (C, 3, p, p) is
summed over its input channels: CIPA feeds each grayscale modality once, and conv(repeat(x, 3), W) == conv(x, W.sum(1)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnunetv2_cipa.checkpoint_file import load_checkpoint_file
from nnunetv2_cipa.errors import InputError

_RENAMES = (
    (re.compile(r"^patch_embed\.0\."), "patch_embed.proj."),  # newer VMamba naming, accepted as well
    (re.compile(r"^patch_embed\.2\."), "patch_embed.norm."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(?:ln_1|norm)\."), r"stages.\1.blocks.\2.norm."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(?:self_attention|op)\."), r"stages.\1.blocks.\2.op."),
    (re.compile(r"^layers\.(\d+)\.downsample\."), r"downsamples.\1."),
)
_CLASSIFIER = re.compile(r"^(?:norm|head|classifier)\.")
_NEW_KEYS = re.compile(r"^out_norms\.")  # stage output norms CIPA adds; never in an ImageNet checkpoint
_STEM = "patch_embed.proj.weight"


@dataclass
class CheckpointLoadReport:
    """What :func:`load_vmamba_checkpoint` did, in encoder key names (``unexpected`` in checkpoint names)."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.path.name}: loaded {len(self.loaded)} tensors; missing (new in CIPA) {self.missing}; "
                f"ignored {len(self.unexpected)} ImageNet classifier tensors")


def map_checkpoint_key(key: str) -> str | None:
    """VMamba checkpoint key -> encoder key; None for the ImageNet classifier (``norm.*``, ``head.*``)."""
    if _CLASSIFIER.match(key):
        return None
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a VMamba checkpoint file (its ``'model'`` entry, or the file itself if it is one). VMamba's
    training code also saves its optimiser state and its yacs configuration there."""
    path = Path(path)
    checkpoint = load_checkpoint_file(path, "VMamba checkpoint")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"VMamba checkpoint {path}: expected a dict with a 'model' state dict of tensors")
    return state


def load_vmamba_checkpoint(model: nn.Module, path: str | Path) -> CheckpointLoadReport:
    """Copy the ImageNet encoder weights at ``path`` into ``model.encoder`` (or ``model`` if it is the encoder).

    Raises InputError if the file is not a checkpoint, a shape differs, an encoder tensor other than the new
    ``out_norms`` is missing, or a non-classifier key has no place in the encoder (a different VMamba size).
    """
    path = Path(path)
    encoder = getattr(model, "encoder", model)
    target = encoder.state_dict()
    report = CheckpointLoadReport(path)
    mapped: dict[str, torch.Tensor] = {}
    problems = []
    for key, value in read_checkpoint(path).items():
        name = map_checkpoint_key(key)
        if name is None:
            report.unexpected.append(key)
            continue
        if name not in target:
            problems.append(f"unexpected key {key!r}")
            continue
        if name == _STEM and value.dim() == 4 and value.shape[1] != target[name].shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != target[name].shape:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, the encoder needs {tuple(target[name].shape)}")
            continue
        mapped[name] = value
    report.loaded = sorted(mapped)
    report.missing = sorted(k for k in target if k not in mapped)
    problems += [f"missing key {k!r}" for k in report.missing if not _NEW_KEYS.match(k)]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise InputError(f"VMamba checkpoint {path} does not fit the CIPA encoder: {shown}")
    with torch.no_grad():
        for name, value in mapped.items():
            target[name].copy_(value)
    return report
