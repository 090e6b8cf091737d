"""PCLT20K (``<root>/<patient>/<id>_{CT,PET,mask}.png`` + ``train.txt`` / ``test.txt``) -> nnU-Net v2 raw dataset.

Output ``$nnUNet_raw/Dataset{ID:03d}_{name}/``: ``imagesTr/{id}_0000.png`` = CT, ``{id}_0001.png`` = PET (8-bit
grayscale), ``labelsTr/{id}.png`` = 0/1; test.txt slices go to ``imagesTs`` / ``labelsTs``; ``dataset.json`` (with
the 8-bit scale of each modality under "source_bit_depth"); a patient-grouped ``splits_final.json`` (nnU-Net's
planner copies it from raw to preprocessed; it is also written to ``$nnUNet_preprocessed/Dataset.../`` when that
folder exists).

Everything is checked before the dataset appears, and every problem is reported in one run: the lists and the files
they name (``source``), each slice's pixels (``slices``). The dataset is built in a staging folder under a lock per
dataset ID and published in one step (``staging``); the source tree is only read.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from nnunetv2_cipa.cases import is_nnunet_splits, patient_of
from nnunetv2_cipa.conversion import BIT_DEPTH_POLICIES, VAL_LIST_POLICIES
from nnunetv2_cipa.conversion.slices import (ModalityScale, SliceResult, SliceTask, WriteError, convert_slice,
                                             decide_scales, scale_tasks, size_mismatch_summary, write_scaled)
from nnunetv2_cipa.conversion.source import locate_files, read_source_lists
from nnunetv2_cipa.conversion.staging import DatasetLock, recover_interrupted, stop_point, worker_init
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.paths import (NNUNET_FOLDERS, StagedFolder, check_output_file, output_folder, read_json,
                                 required_folder, sigterm_as_interrupt, write_text_atomically)

CHANNEL_NAMES = {"rgb": "rgb_to_0_1", "ct": "CT"}  # nnU-Net picks the normalisation from the (casefolded) name
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


@dataclass
class ConversionReport:
    """What a conversion wrote: the dataset folder, slice IDs per split, tumour slices, image sizes, the 8-bit scale
    of each modality, notes (lists read, slices merged, leftovers of interrupted runs cleaned up) and warnings (what
    nnU-Net's folders still hold of an earlier conversion, and what to do about it)."""
    folder: Path
    train_ids: list[str]
    test_ids: list[str]
    tumour_slices: set[str]
    sizes: list[str]
    folds: int
    scales: dict[str, ModalityScale]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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


def _check_arguments(source: Path, dataset_id: int, name: str, folds: int, num_processes: int, normalization: str,
                     high_bit_depth: str, val_list: str) -> None:
    if not source.is_dir():
        raise InputError(f"{source}: {'not a folder' if source.exists() else 'source folder does not exist'} (give "
                         "the folder that holds train.txt and the patient folders)")
    if not 1 <= int(dataset_id) <= 999:
        raise InputError(f"dataset ID must be in 1..999, got {dataset_id}")
    if not NAME.fullmatch(name):
        raise InputError(f"dataset name {name!r} must be 1-200 letters, digits, '.', '_' or '-'")
    if folds < 2:
        raise InputError(f"--folds must be >= 2, got {folds}")
    if num_processes < 1:
        raise InputError(f"-np must be >= 1, got {num_processes}")
    for option, value, choices in (("--normalization", normalization, CHANNEL_NAMES),
                                   ("--high-bit-depth", high_bit_depth, BIT_DEPTH_POLICIES),
                                   ("--val-list", val_list, VAL_LIST_POLICIES)):
        if value not in choices:
            raise InputError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def check_dataset_id(dataset_id: int, target: Path, overwrite: bool) -> None:
    """InputError if the ID is taken by another dataset name in nnUNet_raw, _preprocessed or _results (nnU-Net then
    refuses the ID), or if ``target`` exists and ``overwrite`` is off."""
    clashes = []
    for variable in NNUNET_FOLDERS:
        folder = Path(os.environ[variable]) if os.environ.get(variable) else None
        if folder is not None and folder.is_dir():
            clashes += [f"{p} ({variable})" for p in sorted(folder.glob(f"Dataset{dataset_id:03d}_*"))
                        if p.is_dir() and p.name != target.name]
    if clashes:
        raise InputError(f"dataset ID {dataset_id} is already used by another dataset: {', '.join(clashes)}; remove "
                         "it or pick another -d")
    if target.exists() and not overwrite:
        raise InputError(f"{target}: already exists (pass --overwrite to replace it)")


def check_source_apart(source: Path, target: Path) -> None:
    """InputError if the conversion would write into the source tree or replace it: ``source`` is the dataset
    folder ``target``, lies inside it, or holds it (nnUNet_raw inside the source)."""
    source_path, target_path = source.resolve(), target.resolve()
    if source_path == target_path or target_path in source_path.parents:
        raise InputError(f"{source}: the source lies in the dataset folder {target}, which the conversion replaces; "
                         "move or copy the source elsewhere first")
    if source_path in target_path.parents:
        raise InputError(f"{target}: the dataset folder would lie inside the source tree {source}, which is only "
                         "ever read; set nnUNet_raw to a folder outside it")


# an empty file in a converted dataset while the planned copy of its folds is not yet written (a conversion killed
# between the swap and that write leaves it for the next one, which writes the copy)
PENDING_SPLITS_FILE = ".planned_splits_pending"


def preprocessed_splits_file(target: Path) -> Path | None:
    """``$nnUNet_preprocessed/<dataset>/splits_final.json`` if that dataset folder exists (the dataset was planned:
    nnU-Net trains with the folds there), checked writable; else None."""
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed or not (Path(preprocessed) / target.name).is_dir():
        return None
    return check_output_file(Path(preprocessed) / target.name / "splits_final.json")


def write_planned_splits(path: Path | None, splits: list[dict], target: Path) -> None:
    """Write ``splits`` to ``preprocessed_splits_file``'s ``path`` (if any) once ``target`` holds the new dataset,
    then remove ``target``'s PENDING_SPLITS_FILE."""
    if path is None:
        return
    try:
        write_text_atomically(path, json.dumps(splits, indent=1))
    except InputError as e:
        raise InputError(f"{e}; {target} was converted, but nnU-Net would train on the old folds: copy its "
                         f"splits_final.json to {path}") from None
    (target / PENDING_SPLITS_FILE).unlink(missing_ok=True)


def complete_planned_splits(target: Path) -> list[str]:
    """Under the dataset's lock: when ``target`` still holds PENDING_SPLITS_FILE, the conversion that wrote it died
    between the swap and the planned copy of its folds: copy them now (nothing when the dataset is no longer
    planned). Returns a note saying so."""
    pending = target / PENDING_SPLITS_FILE
    if not pending.is_file():
        return []
    try:
        path = preprocessed_splits_file(target)
        if path is not None:
            write_planned_splits(path, read_json(target / "splits_final.json", "the dataset's folds", list), target)
    except InputError as e:
        raise InputError(f"{e} ({pending} says an interrupted conversion left them unwritten; remove it to go on "
                         "without)") from None
    pending.unlink(missing_ok=True)
    return [] if path is None else \
        [f"{path}: wrote the folds of {target} that an interrupted conversion left unwritten there"]


# what nnU-Net's preprocessing reads from dataset.json: when one of these changes, the preprocessed data is stale
PREPROCESSING_KEYS = ("channel_names", "labels", "file_ending", "overwrite_image_reader_writer", "source_bit_depth")


def _read_json(path: Path | None):
    """The JSON content of ``path``, or None when there is no such file or it cannot be read."""
    try:
        return read_json(path, "a JSON file") if path is not None and path.is_file() else None
    except InputError:
        return None


def read_planned_splits(path: Path | None) -> list[dict] | None:
    """The folds nnU-Net trains with now (``preprocessed_splits_file``), before the conversion replaces them; None
    when there are none or they are not nnU-Net's list of {"train": [...], "val": [...]}."""
    splits = _read_json(path)
    return splits if is_nnunet_splits(splits) else None


def _split_cases(splits: list[dict]) -> set[str]:
    return {case for fold in splits for part in ("train", "val") for case in fold[part]}


def planned_dataset_warnings(dataset_id: int, target: Path, splits_file: Path | None, earlier: list[dict] | None,
                             splits: list[dict]) -> list[str]:
    """What a conversion of an already planned dataset (``splits_file``: nnU-Net's copy of the folds, read as
    ``earlier`` before) leaves stale in nnU-Net's folders: preprocessed data of other slices or settings (training
    would fail on missing files, or train on the old normalisation), and trained models of other folds. The
    images themselves are not compared."""
    if splits_file is None:
        return []
    reasons = []
    if earlier is not None:
        before, now = _split_cases(earlier), _split_cases(splits)
        added, removed = len(now - before), len(before - now)
        reasons += [f"{added} training slices added, {removed} removed"] if added or removed else []
    planned, converted = (_read_json(folder / "dataset.json") or {} for folder in (splits_file.parent, target))
    changed = [key for key in PREPROCESSING_KEYS if planned.get(key) != converted.get(key)]
    reasons += [f"dataset.json's {', '.join(changed)} changed"] if planned and changed else []
    warnings = []
    if reasons or earlier is None:
        because = f" ({'; '.join(reasons)})" if reasons else ""
        warnings.append(f"{splits_file.parent} holds nnU-Net's plan and preprocessed data of an earlier conversion"
                        f"{because}: run `nnUNetv2_plan_and_preprocess -d {dataset_id}` again before training")
    elif earlier != splits:
        warnings.append(f"{splits_file} now holds the new folds (the slices are the same; their assignment to folds "
                        "changed)")
    results = Path(os.environ["nnUNet_results"]) / target.name if os.environ.get("nnUNet_results") else None
    trained = sorted(p.name for p in results.iterdir()  # TRAINER__PLANS__CONFIGURATION folders with a checkpoint
                     if p.is_dir() and p.name.count("__") == 2 and any(p.glob("fold_*/checkpoint_*.pth"))) \
        if warnings and results is not None and results.is_dir() else []
    if trained:
        warnings.append(f"models in {results} ({', '.join(trained)}) were trained before this conversion: train "
                        "them again before comparing or ensembling (`nnunetv2_cipa compare` refuses folds whose "
                        "validation cases differ)")
    return warnings


def source_problems(problems: list[str]) -> InputError:
    """One error listing every problem found in the source."""
    return InputError(f"{len(problems)} problem(s) in the source; nothing was written:\n  - " + "\n  - ".join(problems))


def _run_pool(function, tasks: list, num_processes: int, desc: str, stop_after_first: str | None = None) -> list:
    """[function(task) for task in tasks] (in any order) over ``num_processes`` spawned workers, with a progress bar;
    ``stop_after_first`` names the test-hook point reached after the first result."""
    bar = dict(total=len(tasks), desc=desc, unit="file" if desc.startswith("writing") else "slice", smoothing=0.05)
    results = []
    if num_processes == 1:
        iterator = map(function, tasks)
        for result in tqdm(iterator, **bar):
            results.append(result)
            if stop_after_first and len(results) == 1:
                stop_point(stop_after_first)
        return results
    chunksize = max(1, min(64, len(tasks) // (num_processes * 8)))
    with multiprocessing.get_context("spawn").Pool(num_processes, initializer=worker_init,
                                                   initargs=(os.getpid(),)) as pool:
        for result in tqdm(pool.imap_unordered(function, tasks, chunksize=chunksize), **bar):
            results.append(result)
            if stop_after_first and len(results) == 1:
                stop_point(stop_after_first)
    return results


def _convert_slices(slices: dict[str, dict[str, Path]], test_ids: set[str], work: Path, num_processes: int,
                    high_bit_depth: str, problems: list[str]) -> tuple[list[SliceResult], dict[str, ModalityScale]]:
    """Every slice written into ``work``; InputError listing ``problems`` and all the slices' own ones, if any."""
    tasks = {}
    for slice_id, files in slices.items():
        suffix = "Ts" if slice_id in test_ids else "Tr"
        tasks[slice_id] = SliceTask(slice_id, files, work / f"images{suffix}", work / f"labels{suffix}")
    for folder in {t.images_dir for t in tasks.values()} | {t.labels_dir for t in tasks.values()}:
        folder.mkdir()
    results = _run_pool(convert_slice, list(tasks.values()), num_processes, "converting slices", "converting")
    problems = problems + [p for r in results for p in r.problems] + size_mismatch_summary(results)
    scales, scale_problems = decide_scales(tasks, [r for r in results if not r.problems], high_bit_depth)
    problems += scale_problems
    deferred = [] if problems else scale_tasks(tasks, results, scales)
    if deferred:
        problems += [p for p in _run_pool(write_scaled, deferred, num_processes, "writing 16-bit slices") if p]
    if problems:
        raise source_problems(problems)
    return results, scales


def _write_metadata(folder: Path, source: Path, name: str, normalization: str, num_training: int,
                    num_test: int, splits: list, scales: dict[str, ModalityScale], policy: str) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    channel = CHANNEL_NAMES[normalization]
    bit_depth = {"policy": policy, **{kind: {"bits": s.bits, "right_shift": s.right_shift,
                                            "files_16_bit": s.files_16_bit} for kind, s in scales.items()}}
    try:
        generate_dataset_json(
            str(folder), channel_names={"0": channel, "1": channel}, labels={"background": 0, "tumor": 1},
            num_training_cases=num_training, file_ending=".png", dataset_name=name,
            overwrite_image_reader_writer="NaturalImage2DIO",
            description=f"PET-CT lung tumour slices converted from the PCLT20K layout at {source.resolve()} by "
                        "nnunetv2-cipa (_0000 = CT, _0001 = PET, label 1 = tumour; splits_final.json groups folds by "
                        "patient)",
            reference="PCLT20K, CIPA (CVPR 2025), https://github.com/mj129/CIPA",
            license="see the PCLT20K terms of use", converted_by="nnunetv2_cipa convert",
            channel_roles={"0": "CT", "1": "PET"}, numTest=num_test, source_bit_depth=bit_depth)
    except OSError as e:
        raise InputError(f"{folder / 'dataset.json'}: cannot write ({e.strerror or e})") from e
    write_text_atomically(folder / "splits_final.json", json.dumps(splits, indent=1))


def convert_pclt20k(source, dataset_id: int, name: str = "PCLT20K", folds: int = 5, seed: int = 12345,
                    num_processes: int = 1, overwrite: bool = False, normalization: str = "rgb",
                    high_bit_depth: str = "shift", val_list: str = "refuse") -> ConversionReport:
    """Convert a PCLT20K tree into ``$nnUNet_raw/Dataset{ID:03d}_{name}``. ``high_bit_depth``: BIT_DEPTH_POLICIES
    (see ``slices``); ``val_list``: what to do with a val.txt ("merge" into training, or "refuse")."""
    source = Path(source)
    _check_arguments(source, dataset_id, name, folds, num_processes, normalization, high_bit_depth, val_list)
    raw = required_folder("nnUNet_raw")
    target = raw / f"Dataset{dataset_id:03d}_{name}"
    check_source_apart(source, target)  # before nnUNet_raw is created: it may lie inside the source
    lists = read_source_lists(source, val_list)
    slices, missing = locate_files(source, lists)
    if not slices:  # nothing to check besides the lists' problems: stop before nnUNet_raw is created
        raise source_problems(lists.problems + missing)
    output_folder(raw, "nnUNet_raw folder")
    with sigterm_as_interrupt(), DatasetLock(raw, dataset_id):
        try:
            notes = recover_interrupted(raw, dataset_id) + complete_planned_splits(target)
        except OSError as e:
            raise InputError(f"{e.filename or raw}: cannot complete the replacement an interrupted conversion left "
                             f"half done ({e.strerror or e})") from e
        check_dataset_id(dataset_id, target, overwrite)
        planned_splits = preprocessed_splits_file(target)
        earlier_splits = read_planned_splits(planned_splits)
        splits = None if lists.problems else patient_folds(lists.train, folds, seed)
        # the planned splits are written together with the swap (interrupts held back): raw and preprocessed agree
        dataset = StagedFolder(target, on_swap=lambda: stop_point("swap"),
                               on_replaced=lambda: write_planned_splits(planned_splits, splits, target))
        try:
            with dataset as work:
                # the slices are checked even when the lists have problems: every problem is reported in one run
                results, scales = _convert_slices(slices, set(lists.test), work, num_processes, high_bit_depth,
                                                  lists.problems + missing)
                _write_metadata(work, source, name, normalization, len(lists.train), len(lists.test), splits,
                                scales, high_bit_depth)
                if planned_splits is not None:
                    (work / PENDING_SPLITS_FILE).touch()
        except WriteError as e:
            raise InputError(f"{raw}: cannot write the converted dataset there ({e}); nothing was written (the "
                             "source is not the problem)") from None
        notes += dataset.notes
    return ConversionReport(folder=target, train_ids=lists.train, test_ids=lists.test,
                            tumour_slices={r.slice_id for r in results if r.has_tumour},
                            sizes=sorted({f"{r.shape[1]}x{r.shape[0]}" for r in results}), folds=folds, scales=scales,
                            notes=notes + lists.notes,
                            warnings=planned_dataset_warnings(dataset_id, target, planned_splits, earlier_splits,
                                                              splits))


def format_summary(report: ConversionReport) -> str:
    """Human-readable conversion summary: patients, slices per split, tumour-slice fraction, image sizes, scales."""
    lines = [f"wrote {report.folder}"]
    for split, ids in (("train", report.train_ids), ("test", report.test_ids)):
        if ids:
            with_tumour = len(report.tumour_slices.intersection(ids))
            lines.append(f"  {split:5s}: {len({patient_of(i) for i in ids}):5d} patients {len(ids):7d} slices, "
                         f"{with_tumour / len(ids):.1%} with tumour")
    lines.append(f"  image size: {', '.join(report.sizes)}; {report.folds} patient-level folds in splits_final.json")
    high = [f"{kind}: {s.files_16_bit} 16-bit file(s), values within {s.bits} bits, every {kind} slice shifted "
            f"right by {s.right_shift} bit(s)" for kind, s in report.scales.items() if s.files_16_bit]
    lines += ["  16-bit sources (one scale per modality): " + "; ".join(high)] if high else []
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)
