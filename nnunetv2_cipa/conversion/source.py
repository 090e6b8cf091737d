"""The PCLT20K source layout, only ever read: ``<root>/<patient>/<slice id>_{CT,PET,mask}.png`` and the split lists
``train.txt``, ``test.txt`` (optional) and a third-party ``val.txt`` (optional).

Problems are collected, not raised one by one, so that one run names every bad list line and every missing file.
"""

from __future__ import annotations

import codecs
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2_cipa.cases import patient_of
from nnunetv2_cipa.conversion import VAL_LIST_POLICIES
from nnunetv2_cipa.errors import InputError

MODALITIES = ("CT", "PET")                     # channel order: _0000 = CT, _0001 = PET
KINDS = (*MODALITIES, "mask")
LIST_NAMES = {"train": ("train.txt",), "test": ("test.txt",), "val": ("val.txt", "valid.txt", "validation.txt")}
SLICE_ID = re.compile(r"^[^_\s/\\\x00-\x1f\x7f]+_[^\s/\\\x00-\x1f\x7f]+$")
MAX_NAME_BYTES = 255                           # file-name limit of common file systems
LONGEST_SUFFIX = "_mask.png"                   # as long as the output's "_0000.png"
MAX_LIST_BYTES = 64 * 2 ** 20                  # a split list is slice IDs, one per line


@dataclass
class SourceLists:
    """Slice IDs per split (val already merged into train when asked), the list file read for each split (None when
    absent), notes for the summary and the problems found."""
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    files: dict[str, Path | None] = field(default_factory=dict)
    listed_in: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def decode_list(path: Path) -> str:
    """Text of a split list (UTF-8, with or without BOM); InputError with a hint for UTF-16 or Latin-1 files."""
    try:
        if not path.is_file():  # a FIFO or device (/dev/zero) would block or never end
            raise InputError(f"{path}: split file is not a regular file")
        size = path.stat().st_size
        if size > MAX_LIST_BYTES:
            raise InputError(f"{path}: {size} bytes is not a list of slice IDs (PCLT20K's train.txt is about 300 KB; "
                             f"the limit is {MAX_LIST_BYTES // 2 ** 20} MiB)")
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read split file ({e.strerror or e})") from e
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data:
        raise InputError(f"{path}: looks like UTF-16 text; save the list as UTF-8 (one slice ID per line)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8 (Latin-1 or "
                         "Windows-1252 text?); save the list as UTF-8") from e


def slice_id_problem(slice_id: str) -> str | None:
    """Why ``slice_id`` cannot name a slice of the tree (None if it can)."""
    if not SLICE_ID.match(slice_id):
        return f"{slice_id!r} is not a slice ID of the form <patient>_<slice>"
    if patient_of(slice_id) in (".", ".."):
        return f"{slice_id!r}: patient folder {patient_of(slice_id)!r} would be outside the source folder"
    size = len((slice_id + LONGEST_SUFFIX).encode())
    if size > MAX_NAME_BYTES:
        return (f"slice ID {slice_id[:40]!r}... is too long: its file names would be {size} bytes "
                f"(limit {MAX_NAME_BYTES})")
    return None


def read_split_file(path: Path) -> tuple[list[str], list[str]]:
    """(slice IDs, problems naming each bad line) of a split list; tolerates CRLF, blank lines, surrounding
    whitespace and a UTF-8 BOM. InputError if the file cannot be read as text."""
    ids, problems = [], []
    for line_no, line in enumerate(decode_list(path).splitlines(), 1):
        slice_id = line.strip()
        if not slice_id:
            continue
        problem = slice_id_problem(slice_id)
        if problem:
            problems.append(f"{path}, line {line_no}: {problem}")
        else:
            ids.append(slice_id)
    return ids, problems


def find_list(root: Path, names: list[str], split: str) -> tuple[Path | None, str | None]:
    """(list file of ``split`` in ``root`` or None, note): the exact name, else its one case variant."""
    exact = [n for n in names if n in LIST_NAMES[split]]
    variants = [n for n in names if n.casefold() in LIST_NAMES[split] and n not in exact]
    found = exact or variants
    if len(found) > 1:
        raise InputError(f"{root}: several {split} lists ({', '.join(sorted(found))}); keep one")
    if not found:
        return None, None
    note = None if exact else f"read {found[0]} as the {split} list ({LIST_NAMES[split][0]})"
    return root / found[0], note


def read_source_lists(root: Path, val_list: str = "refuse") -> SourceLists:
    """The split lists of a PCLT20K tree with their problems: bad lines, duplicates, a slice in two lists, a test
    patient also in training, a val.txt (merged into training with ``val_list="merge"``, else refused)."""
    if val_list not in VAL_LIST_POLICIES:
        raise InputError(f"--val-list must be one of {', '.join(VAL_LIST_POLICIES)}, got {val_list!r}")
    try:
        names = os.listdir(root)
    except OSError as e:
        raise InputError(f"{root}: cannot list the source folder ({e.strerror or e})") from e
    lists, ids = SourceLists(), {}
    for split in LIST_NAMES:
        path, note = find_list(root, names, split)
        lists.files[split] = path
        lists.notes += [note] if note else []
        ids[split] = []
        try:
            ids[split], problems = read_split_file(path) if path else ([], [])
            lists.problems += problems
        except InputError as e:
            lists.problems.append(str(e))
    if lists.files["train"] is None:
        lists.problems.append(f"{root / 'train.txt'}: missing (PCLT20K lists its training slices there)")
    elif not ids["train"] and not lists.problems:
        lists.problems.append(f"{lists.files['train']}: lists no slice IDs")
    if lists.files["test"] is None:
        lists.notes.append(f"no test list ({root / 'test.txt'}): no test set (imagesTs / labelsTs) written")
    elif not ids["test"]:
        lists.notes.append(f"{lists.files['test']} lists no slice IDs: no test set (imagesTs / labelsTs) written")
    for split in LIST_NAMES:
        path = lists.files[split]
        for slice_id, count in Counter(ids[split]).items():
            if count > 1:
                lists.problems.append(f"{path}: duplicate slice ID {slice_id!r} ({count} times)")
            if slice_id in lists.listed_in:
                lists.problems.append(f"{path}: slice ID {slice_id!r} is also listed in {lists.listed_in[slice_id]}")
            else:
                lists.listed_in[slice_id] = path
    val_file = lists.files["val"]
    if ids["val"] and val_list == "refuse":
        lists.problems.append(
            f"{val_file}: lists {len(ids['val'])} slices, but nnU-Net validates on the folds of splits_final.json, "
            "not on a fixed list; pass --val-list merge to convert them as training slices (they join the "
            "patient-level folds), or move the file out of the source folder")
    elif ids["val"]:
        lists.notes.append(f"merged {len(ids['val'])} slices of {len({patient_of(i) for i in ids['val']})} "
                           f"patients from {val_file} into the training set")
    lists.train = ids["train"] + (ids["val"] if val_list == "merge" else [])
    lists.test = ids["test"]
    shared = sorted({patient_of(i) for i in lists.train} & {patient_of(i) for i in lists.test})
    if shared:
        lists.problems.append(f"{lists.files['test']}: patient(s) {', '.join(shared[:5])} also appear in the "
                              "training lists; the test set must be patient-disjoint")
    unlisted = unlisted_patient_folders(root, names, {patient_of(i) for split in ids.values() for i in split})
    if unlisted and lists.files["train"] is not None:
        lists.notes.append(f"{len(unlisted)} patient folder(s) in {root} hold slices that no list names, not "
                           f"converted: {', '.join(unlisted[:5])}{', ...' if len(unlisted) > 5 else ''}")
    return lists


def unlisted_patient_folders(root: Path, names: list[str], listed_patients: set[str]) -> list[str]:
    """The folders among ``names`` that hold a CT image (``*_CT.png``) but are no listed patient's, sorted."""
    def holds_slices(folder: Path) -> bool:
        try:
            return any(name.endswith("_CT.png") for name in os.listdir(folder))
        except OSError:  # not a folder, or unreadable: nothing to convert there either way
            return False

    return sorted(name for name in names if name not in listed_patients and holds_slices(root / name))


def locate_files(root: Path, lists: SourceLists) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """({slice id: {kind: path}} of the listed slices whose three files exist, problems for the others): one
    listing per patient folder; a missing name with a case variant in the folder says so."""
    by_patient: dict[str, list[str]] = {}
    for slice_id in dict.fromkeys(lists.train + lists.test):
        by_patient.setdefault(patient_of(slice_id), []).append(slice_id)
    found, problems = {}, []
    folder_variants: dict[str, list[str]] | None = None
    for patient, slice_ids in by_patient.items():
        folder = root / patient
        try:
            names = set(os.listdir(folder))
        except FileNotFoundError:
            folder_variants = folder_variants if folder_variants is not None else _variants(os.listdir(root))
            problems.append(f"{folder}: patient folder missing ({len(slice_ids)} slice(s) listed, e.g. "
                            f"{slice_ids[0]!r} in {lists.listed_in[slice_ids[0]]})"
                            + _variant_hint(folder_variants.get(_name_key(patient), [])))
            continue
        except OSError as e:
            problems.append(f"{folder}: cannot list the patient folder ({e.strerror or e})")
            continue
        variants: dict[str, list[str]] | None = None
        for slice_id in slice_ids:
            files = {kind: f"{slice_id}_{kind}.png" for kind in KINDS}
            missing = [name for name in files.values() if name not in names]
            if not missing:
                found[slice_id] = {kind: folder / name for kind, name in files.items()}
                continue
            variants = variants if variants is not None else _variants(names)
            for name in missing:
                problems.append(f"{folder / name}: missing (slice {slice_id!r} listed in {lists.listed_in[slice_id]})"
                                + _variant_hint(variants.get(_name_key(name), [])))
    return found, problems


def _name_key(name: str) -> str:
    """What two names that look alike share: Unicode NFC form, case folded."""
    return unicodedata.normalize("NFC", name).casefold()


def _variants(names) -> dict[str, list[str]]:
    """{_name_key: names} of a folder listing."""
    variants: dict[str, list[str]] = {}
    for name in names:
        variants.setdefault(_name_key(name), []).append(name)
    return variants


def _variant_hint(found: list[str]) -> str:
    if not found:
        return ""
    return (f"; found {', '.join(sorted(found))}, whose name differs in case or in its Unicode "
            "form (composed vs decomposed accents)")
