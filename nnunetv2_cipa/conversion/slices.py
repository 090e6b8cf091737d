"""One slice's CT, PET and mask: read, checked and written as nnU-Net inputs; and the 8-bit scale of each modality,
decided once for the whole dataset.

Accepted PNGs: 8-bit grayscale (copied as is), RGB/RGBA/LA with equal colour channels (alpha ignored), 1-bit, and
16-bit grayscale. Masks hold only {0, 255} or only {0, 1} (or {0, 65535} in a 16-bit file). 16-bit CT / PET files
are written only once the whole dataset has been read: with the "shift" policy, every slice of a modality is shifted
right by the same number of bits, from the modality's dataset-wide bit depth (the bit length of its largest value;
0 bits when it is at most 255). The "refuse" policy rejects values above 255 instead.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunetv2_cipa.conversion.source import MODALITIES
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.png_io import read_gray_png, write_png

MASK_VALUES = {np.dtype(np.uint8): ({0, 1}, {0, 255}), np.dtype(np.uint16): ({0, 1}, {0, 255}, {0, 65535})}
EXAMPLES = 3


@dataclass(frozen=True)
class SliceTask:
    """Pool task: the source files {CT, PET, mask} of one slice and the folders its outputs go to."""
    slice_id: str
    files: dict[str, Path]
    images_dir: Path
    labels_dir: Path

    def image_path(self, kind: str) -> Path:
        return self.images_dir / f"{self.slice_id}_{MODALITIES.index(kind):04d}.png"


class WriteError(InputError):
    """A converted file could not be written (a full disk, lost permissions): the conversion stops at once."""


@dataclass
class SliceResult:
    """What the pass over one slice found: problems (then nothing else is set; ``size_mismatch`` describes a size
    problem and its fix, e.g. ("PET 256x256, CT and mask 512x512", "resample the PET onto the CT and mask grid"),
    shared by slices with the same one), the (H, W) size, whether the mask has tumour, and the maximum of each 16-bit
    modality file (those are written later, see ``ScaleTask``)."""
    slice_id: str
    problems: list[str] = field(default_factory=list)
    size_mismatch: tuple[str, str] | None = None
    shape: tuple[int, int] | None = None
    has_tumour: bool = False
    high_bit_maxima: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ScaleTask:
    """Pool task: write a 16-bit modality file as 8 bits, shifted right by ``right_shift``."""
    source: Path
    target: Path
    right_shift: int


@dataclass(frozen=True)
class ModalityScale:
    """The 8-bit scale of one modality: the source's bit depth and the right shift applied to every slice."""
    bits: int
    right_shift: int
    files_16_bit: int


def _mask_problem(path: Path, mask: np.ndarray) -> str | None:
    values = set(np.unique(mask).tolist())
    allowed = MASK_VALUES[mask.dtype]
    if any(values <= a for a in allowed):
        return None
    return f"{path}: mask values {sorted(values)[:8]} are not 0/255 (or 0/1" + \
        (", or 0/65535 in a 16-bit file)" if len(allowed) > 2 else ")")


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


def _size_problem(task: SliceTask, shapes: dict[str, tuple[int, ...]]) -> tuple[str, tuple[str, str]]:
    """(problem, (mismatch, fix)) for a slice whose CT, PET and mask differ in size: the problem names the file whose
    size differs from the other two (the slice's folder when all three differ)."""
    common, count = Counter(shapes.values()).most_common(1)[0]
    if count == 2:
        odd = next(kind for kind, shape in shapes.items() if shape != common)
        others = " and ".join(kind for kind in shapes if kind != odd)
        return (f"{task.files[odd]}: {_size(shapes[odd])}, but the {others} of {task.slice_id} are {_size(common)}",
                (f"{odd} {_size(shapes[odd])}, {others} {_size(common)}", f"resample the {odd} onto the {others} grid"))
    mismatch = ", ".join(f"{kind} {_size(shape)}" for kind, shape in shapes.items())
    return (f"{task.files['mask'].parent}: CT, PET and mask of {task.slice_id} differ in size: {mismatch}",
            (mismatch, "resample them onto one grid"))


def size_mismatch_summary(results: list[SliceResult]) -> list[str]:
    """One line per size mismatch that several slices share (a modality stored at another resolution throughout)."""
    counts = Counter(r.size_mismatch for r in results if r.size_mismatch)
    return [f"{n} slices have {mismatch}: nnU-Net needs CT, PET and mask of a slice on one pixel grid; {fix} before "
            "converting" for (mismatch, fix), n in counts.most_common() if n > 1]


def convert_slice(task: SliceTask) -> SliceResult:
    """Read and check one slice; write its 8-bit CT / PET (16-bit ones are left for ``write_scaled``) and its 0/1
    label. Every problem of the source becomes a message in the result, naming the file; a file that cannot be
    written raises WriteError."""
    result = SliceResult(task.slice_id)
    arrays, plain = {}, {}
    for kind, path in task.files.items():
        try:
            arrays[kind], plain[kind] = read_gray_png(path)
        except InputError as e:
            result.problems.append(str(e))
    if result.problems:
        return result
    shapes = {kind: a.shape for kind, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        problem, result.size_mismatch = _size_problem(task, shapes)
        result.problems.append(problem)
        return result
    problem = _mask_problem(task.files["mask"], arrays["mask"])
    if problem:
        result.problems.append(problem)
        return result
    label = (arrays["mask"] > 0).astype(np.uint8)
    try:
        for kind in MODALITIES:
            if arrays[kind].dtype == np.uint16:
                result.high_bit_maxima[kind] = int(arrays[kind].max())
            elif plain[kind]:
                _copy(task.files[kind], task.image_path(kind))
            else:
                write_png(task.image_path(kind), arrays[kind])
        write_png(task.labels_dir / f"{task.slice_id}.png", label)
    except InputError as e:
        raise WriteError(str(e)) from None
    result.shape, result.has_tumour = shapes["mask"], bool(label.any())
    return result


def _copy(source: Path, target: Path) -> None:
    try:
        shutil.copyfile(source, target)
    except OSError as e:
        raise InputError(f"{target}: cannot write ({e})") from e


def write_scaled(task: ScaleTask) -> str | None:
    """Write one 16-bit modality file as 8 bits; the source's problem message, or None (WriteError if the file
    cannot be written)."""
    try:
        pixels, _ = read_gray_png(task.source)
    except InputError as e:
        return str(e)
    try:
        write_png(task.target, (pixels >> task.right_shift).astype(np.uint8))
    except InputError as e:
        raise WriteError(str(e)) from None
    return None


def _examples(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths[:EXAMPLES]) + (", ..." if len(paths) > EXAMPLES else "")


def decide_scales(tasks: dict[str, SliceTask], results: list[SliceResult], policy: str
                  ) -> tuple[dict[str, ModalityScale], list[str]]:
    """({modality: scale}, problems) from every slice's 16-bit maxima, with ``policy`` ("shift" or "refuse")."""
    scales, problems = {}, []
    for kind in MODALITIES:
        high = {tasks[r.slice_id].files[kind]: r.high_bit_maxima[kind] for r in results if kind in r.high_bit_maxima}
        low = [tasks[r.slice_id].files[kind] for r in results if kind not in r.high_bit_maxima]
        peak = max(high.values(), default=0)
        over = sorted(p for p, m in high.items() if m > 255)
        if not over:
            scales[kind] = ModalityScale(bits=8, right_shift=0, files_16_bit=len(high))
        elif policy == "refuse":
            problems.append(f"{kind}: {len(over)} 16-bit PNG(s) hold values above 255 (up to {peak}), e.g. "
                            f"{_examples(over)}; --high-bit-depth shift maps every {kind} slice to 8 bits with one "
                            "shift from the dataset's bit depth")
        elif low:
            problems.append(f"{kind}: {len(high)} PNG(s) are 16-bit with values up to {peak} (e.g. "
                            f"{_examples(over)}) but {len(low)} are 8-bit (e.g. {_examples(sorted(low))}): one "
                            f"{kind} scale cannot hold both; save every {kind} PNG with the same bit depth")
        else:
            bits = peak.bit_length()
            scales[kind] = ModalityScale(bits=bits, right_shift=bits - 8, files_16_bit=len(high))
    return scales, problems


def scale_tasks(tasks: dict[str, SliceTask], results: list[SliceResult], scales: dict[str, ModalityScale]
                ) -> list[ScaleTask]:
    """The deferred 16-bit modality files, with their modality's shift."""
    return [ScaleTask(tasks[r.slice_id].files[kind], tasks[r.slice_id].image_path(kind), scales[kind].right_shift)
            for r in results for kind in r.high_bit_maxima]
