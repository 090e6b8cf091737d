"""PCLT20K (``<root>/<patient>/<id>_{CT,PET,mask}.png`` + ``train.txt`` / ``test.txt``) -> nnU-Net v2 raw dataset.

Output ``$nnUNet_raw/Dataset{ID:03d}_{name}/``: ``imagesTr/{id}_0000.png`` = CT, ``{id}_0001.png`` = PET (8-bit
grayscale), ``labelsTr/{id}.png`` = 0/1; test.txt slices go to ``imagesTs`` / ``labelsTs``; ``dataset.json``; a
patient-grouped ``splits_final.json`` (nnU-Net's planner copies it from raw to preprocessed; it is also written to
``$nnUNet_preprocessed/Dataset.../`` when that folder exists).

Accepted PNGs: 8-bit grayscale, RGB/RGBA/LA with equal colour channels (alpha ignored), 1-bit, and 16-bit grayscale.
16-bit files are rescaled per file: kept as is when their maximum is <= 255, otherwise shifted right by 8 bits.
Masks must hold only {0, 255} or only {0, 1} (after that rescaling).
Everything is validated before the dataset appears: the output is built in a hidden temporary folder inside
``$nnUNet_raw`` and renamed into place only when complete; the source tree is only read.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.paths import required_folder

MODALITIES = ("CT", "PET")                     # channel order: _0000 = CT, _0001 = PET
CHANNEL_NAMES = {"rgb": "rgb_to_0_1", "ct": "CT"}  # nnU-Net picks the normalisation from the (casefolded) name
SLICE_ID = re.compile(r"^[^_\s/\\]+_[^\s/\\]+$")
PNG_COMPRESS_LEVEL = 1


def read_split_file(path: Path) -> list[str]:
    """Slice IDs of a train.txt / test.txt (tolerates CRLF, blank lines, surrounding whitespace, a UTF-8 BOM)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read split file ({e})") from e
    ids = []
    for line_no, line in enumerate(text.splitlines(), 1):
        slice_id = line.strip()
        if not slice_id:
            continue
        if not SLICE_ID.match(slice_id):
            raise InputError(f"{path}, line {line_no}: {slice_id!r} is not a slice ID of the form <patient>_<slice>")
        ids.append(slice_id)
    return ids


def patient_of(slice_id: str) -> str:
    """Patient ID = the part before the first underscore (as the official CIPA loader does)."""
    return slice_id.split("_", 1)[0]


def source_files(root: Path, slice_id: str) -> dict[str, Path]:
    """Paths of the CT, PET and mask PNGs of one slice."""
    folder = root / patient_of(slice_id)
    return {kind: folder / f"{slice_id}_{kind}.png" for kind in (*MODALITIES, "mask")}


def patient_folds(case_ids: list[str], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """nnU-Net splits_final.json content: ``folds`` entries {"train": [...], "val": [...]} grouped by exact patient ID.
    Patients are shuffled with ``seed``, sorted by slice count (descending, stable), and each goes to the fold that
    has the fewest slices so far (lowest index on ties)."""
    by_patient: dict[str, list[str]] = {}
    for case in case_ids:
        by_patient.setdefault(patient_of(case), []).append(case)
    if len(by_patient) < folds:
        raise InputError(f"{len(by_patient)} training patients cannot fill {folds} folds (--folds)")
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    patients.sort(key=lambda p: -len(by_patient[p]))
    fold_cases: list[list[str]] = [[] for _ in range(folds)]
    for patient in patients:
        smallest = min(range(folds), key=lambda k: len(fold_cases[k]))
        fold_cases[smallest].extend(by_patient[patient])
    return [{"train": sorted(c for k, cases in enumerate(fold_cases) if k != fold for c in cases),
             "val": sorted(fold_cases[fold])} for fold in range(folds)]


def read_gray_png(path: Path) -> tuple[np.ndarray, bool]:
    """(H, W) uint8 pixels of a PNG and whether the file already is 8-bit grayscale (then it can be copied as is)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise InputError(f"{path}: not a PNG file (format {image.format})")
            mode = image.mode
            pixels = np.asarray(image.convert("RGBA") if mode == "P" else image)
    except InputError:
        raise
    except Exception as e:  # PIL raises many types for truncated/corrupt files
        raise InputError(f"{path}: unreadable PNG ({type(e).__name__}: {e})") from e
    if pixels.ndim == 3:
        colour = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]
        if (colour != colour[..., :1]).any():
            raise InputError(f"{path}: colour image whose channels differ; expected grayscale")
        pixels = colour[..., 0]
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype != np.uint8:
        if pixels.min() < 0 or pixels.max() > 65535:
            raise InputError(f"{path}: pixel values outside 0..65535 (mode {mode})")
        pixels = pixels if pixels.max() <= 255 else pixels >> 8
        pixels = pixels.astype(np.uint8)
    return pixels, mode == "L"


def _convert_case(task: tuple[Path, str, Path, Path]) -> tuple[str, bool, tuple[int, int]]:
    """Read and check one slice's CT, PET and mask; write ``{id}_0000/_0001.png`` and the 0/1 label.
    Returns (slice id, has tumour, (H, W)). Raises InputError naming the file on bad input."""
    root, slice_id, images_dir, labels_dir = task
    files = source_files(root, slice_id)
    arrays, plain = {}, {}
    for kind, path in files.items():
        arrays[kind], plain[kind] = read_gray_png(path)
    shapes = {kind: a.shape for kind, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise InputError(f"{files['mask']}: size mismatch between CT, PET and mask of {slice_id}: "
                         + ", ".join(f"{files[k].name} {s[1]}x{s[0]}" for k, s in shapes.items()))
    values = set(np.unique(arrays["mask"]).tolist())
    if not (values <= {0, 255} or values <= {0, 1}):
        raise InputError(f"{files['mask']}: mask values {sorted(values)[:8]} are not 0/255 (or 0/1)")
    for channel, kind in enumerate(MODALITIES):
        target = images_dir / f"{slice_id}_{channel:04d}.png"
        if plain[kind]:
            shutil.copyfile(files[kind], target)
        else:
            Image.fromarray(arrays[kind]).save(target, compress_level=PNG_COMPRESS_LEVEL)
    label = (arrays["mask"] > 0).astype(np.uint8)
    Image.fromarray(label).save(labels_dir / f"{slice_id}.png", compress_level=PNG_COMPRESS_LEVEL)
    return slice_id, bool(label.any()), shapes["mask"]


def _check_lists(source: Path) -> tuple[list[str], list[str]]:
    """Train and test slice IDs after checking duplicates, patient overlap and file presence."""
    train_file, test_file = source / "train.txt", source / "test.txt"
    if not train_file.is_file():
        raise InputError(f"{train_file}: missing (PCLT20K lists its training slices there)")
    lists = {train_file: read_split_file(train_file), test_file: read_split_file(test_file) if test_file.is_file()
             else []}
    if not lists[train_file]:
        raise InputError(f"{train_file}: lists no slice IDs")
    seen: dict[str, Path] = {}
    for path, ids in lists.items():
        for slice_id, count in Counter(ids).items():
            if count > 1:
                raise InputError(f"{path}: duplicate slice ID {slice_id!r} ({count} times)")
        for slice_id in ids:
            if slice_id in seen:
                raise InputError(f"{path}: slice ID {slice_id!r} is also listed in {seen[slice_id]}")
            seen[slice_id] = path
    shared = sorted({patient_of(i) for i in lists[train_file]} & {patient_of(i) for i in lists[test_file]})
    if shared:
        raise InputError(f"{test_file}: patient(s) {', '.join(shared[:5])} also appear in {train_file}; "
                         "the test set must be patient-disjoint")
    for path, ids in lists.items():
        for slice_id in ids:
            for file in source_files(source, slice_id).values():
                if not file.is_file():
                    raise InputError(f"{file}: missing (slice {slice_id!r} listed in {path})")
    return lists[train_file], lists[test_file]


def _run_parallel(tasks: list, num_processes: int) -> list:
    bar = dict(total=len(tasks), desc="converting slices", unit="slice", smoothing=0.05)
    if num_processes == 1:
        return [_convert_case(t) for t in tqdm(tasks, **bar)]
    chunksize = max(1, min(64, len(tasks) // (num_processes * 8)))
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        return list(tqdm(pool.imap_unordered(_convert_case, tasks, chunksize=chunksize), **bar))


def _write_metadata(folder: Path, source: Path, name: str, normalization: str, num_training: int,
                    num_test: int, splits: list) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    channel = CHANNEL_NAMES[normalization]
    generate_dataset_json(
        str(folder), channel_names={"0": channel, "1": channel}, labels={"background": 0, "tumor": 1},
        num_training_cases=num_training, file_ending=".png", dataset_name=name,
        overwrite_image_reader_writer="NaturalImage2DIO",
        description=f"PET-CT lung tumour slices converted from the PCLT20K layout at {source} by nnunetv2-cipa "
                    "(_0000 = CT, _0001 = PET, label 1 = tumour; splits_final.json groups folds by patient)",
        reference="PCLT20K, CIPA (CVPR 2025), https://github.com/mj129/CIPA", license="see the PCLT20K terms of use",
        converted_by="nnunetv2_cipa convert", channel_roles={"0": "CT", "1": "PET"}, numTest=num_test)
    (folder / "splits_final.json").write_text(json.dumps(splits, indent=1))


def convert_pclt20k(source, dataset_id: int, name: str = "PCLT20K", folds: int = 5, seed: int = 12345,
                    num_processes: int = 1, overwrite: bool = False, normalization: str = "rgb") -> Path:
    """Convert a PCLT20K tree into ``$nnUNet_raw/Dataset{ID:03d}_{name}``; returns that folder."""
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"{source}: source folder does not exist")
    if not 1 <= int(dataset_id) <= 999:
        raise InputError(f"dataset ID must be in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise InputError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-'")
    if folds < 2:
        raise InputError(f"--folds must be >= 2, got {folds}")
    if num_processes < 1:
        raise InputError(f"-np must be >= 1, got {num_processes}")
    if normalization not in CHANNEL_NAMES:
        raise InputError(f"--normalization must be one of {sorted(CHANNEL_NAMES)}, got {normalization!r}")
    raw = required_folder("nnUNet_raw")
    target = raw / f"Dataset{dataset_id:03d}_{name}"
    clashes = sorted(raw.glob(f"Dataset{dataset_id:03d}_*")) if raw.is_dir() else []
    for existing in clashes:
        if existing != target:
            raise InputError(f"{existing}: dataset ID {dataset_id} is already used by another dataset; remove it or "
                             "pick another -d")
        if not overwrite:
            raise InputError(f"{target}: already exists (pass --overwrite to replace it)")

    train_ids, test_ids = _check_lists(source)
    splits = patient_folds(train_ids, folds, seed)

    raw.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=raw))
    try:
        tasks = []
        for ids, suffix in ((train_ids, "Tr"), (test_ids, "Ts")):
            if ids:
                (work / f"images{suffix}").mkdir()
                (work / f"labels{suffix}").mkdir()
            tasks += [(source, i, work / f"images{suffix}", work / f"labels{suffix}") for i in ids]
        results = _run_parallel(tasks, num_processes)
        _write_metadata(work, source, name, normalization, len(train_ids), len(test_ids), splits)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=raw))
            target.rename(old / target.name)
            work.rename(target)
            shutil.rmtree(old)
        else:
            work.rename(target)
    finally:
        if work.exists():
            shutil.rmtree(work)

    preprocessed = os.environ.get("nnUNet_preprocessed")
    if preprocessed and (Path(preprocessed) / target.name).is_dir():
        shutil.copyfile(target / "splits_final.json", Path(preprocessed) / target.name / "splits_final.json")
    print(format_summary(target, results, train_ids, test_ids, folds))
    return target


def format_summary(target: Path, results: list, train_ids: list[str], test_ids: list[str], folds: int) -> str:
    """Human-readable conversion summary: patients, slices per split, tumour-slice fraction, image sizes."""
    tumour = {slice_id: has for slice_id, has, _ in results}
    sizes = sorted({f"{w}x{h}" for _, _, (h, w) in results})
    lines = [f"wrote {target}"]
    for split, ids in (("train", train_ids), ("test", test_ids)):
        if ids:
            with_tumour = sum(tumour[i] for i in ids)
            lines.append(f"  {split:5s}: {len({patient_of(i) for i in ids}):5d} patients {len(ids):7d} slices, "
                         f"{with_tumour / len(ids):.1%} with tumour")
    lines.append(f"  image size: {', '.join(sizes)}; {folds} patient-level folds in splits_final.json")
    return "\n".join(lines)
