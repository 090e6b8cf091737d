"""Compare nnU-Net trainers (e.g. nnUNetTrainerCIPA vs nnUNetTrainer) on their cross-validation and test predictions:
metrics, paired Wilcoxon tests on per-patient Dice, costs, figures, and a paste-able report.md + report.json.

Each split has one case set that every trainer must cover exactly: the validation cases of the requested folds in the
splits_final.json nnU-Net trained with, and every case of labelsTs for the test split. A trainer folder that lacks a
case of the set, or holds one outside it, is an error naming the trainer, the folder and the cases.
"""

from __future__ import annotations

import json
import os
import re
from itertools import combinations
from pathlib import Path

import numpy as np

from nnunetv2_cipa.cases import is_nnunet_splits, patient_of, patient_separator_warnings
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.evaluation.costs import model_costs
from nnunetv2_cipa.evaluation.figures import plot_dice_distribution, plot_examples
from nnunetv2_cipa.evaluation.metrics import (CasePair, abbreviated, cover_problems, evaluate_pairs, json_safe,
                                              list_label_pngs)
from nnunetv2_cipa.evaluation.report import render_report
from nnunetv2_cipa.evaluation.statistics import holm_adjusted, paired_wilcoxon
from nnunetv2_cipa.paths import StagedFolder, check_output_file, read_json, required_folder, write_text_atomically
from nnunetv2_cipa.png_io import read_gray_png, read_label_png


def resolve_dataset(dataset: int | str) -> tuple[str, Path, Path]:
    """Dataset ID or name -> (DatasetXXX_Name, raw folder, results folder)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    raw, results = required_folder("nnUNet_raw"), required_folder("nnUNet_results")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"dataset {dataset!r}: {e}") from e
    if not (raw / name).is_dir():
        raise InputError(f"dataset {name}: raw folder {raw / name} does not exist")
    return name, raw / name, results / name


def read_splits(name: str, raw_dir: Path) -> tuple[Path, list[dict]]:
    """(path, folds) of the splits_final.json nnU-Net trained with: ``$nnUNet_preprocessed/NAME/``, else the
    converter's copy in the raw dataset."""
    preprocessed = os.environ.get("nnUNet_preprocessed")
    candidates = ([Path(preprocessed) / name / "splits_final.json"] if preprocessed else []) + \
        [raw_dir / "splits_final.json"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise InputError(f"dataset {name}: no splits_final.json in {' or '.join(map(str, candidates))}; the "
                         "validation cases of each fold cannot be known")
    splits = read_json(path, "a splits file")
    if not is_nnunet_splits(splits):
        raise InputError(f"{path}: not an nnU-Net splits file (a list of {{'train': [...], 'val': [...]}} of case "
                         "names)")
    return path, splits


def validation_case_set(splits_file: Path, splits: list[dict], folds: tuple[int, ...]) -> dict[int, list[str]]:
    """{fold: its validation cases} for the requested folds; InputError for a fold the file lacks or a case that
    two folds validate."""
    fold_cases, seen = {}, {}
    for fold in folds:
        if not 0 <= fold < len(splits):
            defined = f"folds 0..{len(splits) - 1}" if splits else "no folds"
            raise InputError(f"fold {fold}: {splits_file} defines {defined} (-f)")
        for case in splits[fold]["val"]:
            if case in seen:
                raise InputError(f"{splits_file}: case {case} is a validation case of folds {seen[case]} and {fold}")
            seen[case] = fold
        fold_cases[fold] = list(splits[fold]["val"])
    return fold_cases


def crossval_predictions(trainer: str, model_dir: Path, fold_cases: dict[int, list[str]], splits_file: Path
                         ) -> tuple[dict[str, Path], list[str]]:
    """(case -> validation PNG over ``model_dir``/fold_k/validation, problems): each fold folder must hold exactly
    the validation cases of its fold."""
    if not model_dir.is_dir():
        raise InputError(f"{trainer}: trained model folder {model_dir} does not exist")
    cases, problems = {}, []
    for fold, expected in fold_cases.items():
        folder = model_dir / f"fold_{fold}" / "validation"
        if not folder.is_dir():
            trained = (model_dir / f"fold_{fold}" / "checkpoint_final.pth").is_file()
            todo = f"nnUNetv2_train ... {fold} --val validates it" if trained else \
                f"it has no checkpoint_final.pth: train it (nnUNetv2_train ... {fold})"
            raise InputError(f"fold {fold}: validation folder {folder} does not exist ({todo}, or leave the fold out "
                             "with -f)")
        found = list_label_pngs(folder)
        problems += [f"{trainer}: {p}" for p in
                     cover_problems(expected, found, f"fold {fold}'s validation set in {splits_file}", folder)]
        cases.update(found)
    return cases, problems


def predictions_on_test_set(trainers: list[str], folders: list, gt: dict[str, Path], gt_dir: Path
                            ) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """({trainer: case -> test PNG}, problems): each folder must hold exactly the cases of ``gt_dir``, and be neither
    ``gt_dir`` nor another trainer's folder."""
    preds, problems, owners = {}, [], {}
    gt_key = os.stat(gt_dir)[1:3]  # (inode, device): the same folder under any name
    for trainer, folder in zip(trainers, folders):
        preds[trainer] = list_label_pngs(folder)
        key = os.stat(folder)[1:3]
        if key == gt_key:
            problems.append(f"{trainer}: the test prediction folder {folder} is the ground-truth folder {gt_dir}")
        if key in owners:
            problems.append(f"{trainer}: the test prediction folder {folder} is also {owners[key]}'s")
        owners.setdefault(key, trainer)
        problems += [f"{trainer}: {p}" for p in cover_problems(gt, preds[trainer], f"the test set {gt_dir}", folder)]
    return preds, problems


def patient_split_warnings(splits_file: Path, splits: list[dict], folds: tuple[int, ...], sep: str) -> list[str]:
    """Where the folds are not split by patient (``sep``): patients validated in more than one of ``folds`` (their
    per-patient Dice mixes fold models) or trained and validated in the same fold (leakage: optimistic scores)."""
    val_folds: dict[str, set[int]] = {}
    leaked: dict[int, set[str]] = {}
    for fold in folds:
        val_patients = {patient_of(c, sep) for c in splits[fold]["val"]}
        for patient in val_patients:
            val_folds.setdefault(patient, set()).add(fold)
        both = val_patients & {patient_of(c, sep) for c in splits[fold].get("train", [])}
        if both:
            leaked[fold] = both
    warnings = []
    spread = sorted(p for p, f in val_folds.items() if len(f) > 1)
    if spread:
        warnings.append(f"{splits_file}: {len(spread)} patient(s) have validation cases in more than one fold "
                        f"({abbreviated(spread)}): their per-patient metrics pool predictions of different fold models")
    for fold, patients in leaked.items():
        warnings.append(f"{splits_file}: fold {fold} trains and validates {len(patients)} of the same patient(s) "
                        f"({abbreviated(sorted(patients))}): its validation scores are optimistic (convert with "
                        "nnunetv2_cipa convert for patient-level folds)")
    return warnings


def _split_examples(split: str, trainers: list[str], results: dict[str, dict], preds: dict[str, dict[str, Path]],
                    gt: dict[str, Path], images_dir: Path, path: Path) -> dict:
    """Best / median / worst patient (mean patient Dice over trainers), slice with the largest GT area, plotted."""
    common = [p for p in results[trainers[0]]["per_patient"]
              if all(results[t]["per_patient"].get(p, {}).get("dice") is not None for t in trainers)]
    if not common:
        return {"note": "no patient with a Dice value for every trainer (all masks empty)"}
    ranked = sorted(common, key=lambda p: np.mean([results[t]["per_patient"][p]["dice"] for t in trainers]))
    picks: dict[str, str] = {}
    for label, patient in (("best", ranked[-1]), ("median", ranked[len(ranked) // 2]), ("worst", ranked[0])):
        if patient not in picks.values():  # fewer than 3 patients: one row per distinct patient
            picks[label] = patient
    sep, per_case = results[trainers[0]]["patient_sep"], results[trainers[0]]["per_case"]
    rows = []
    for label, patient in picks.items():
        cases = [c for c in per_case if patient_of(c, sep) == patient]
        case = max(cases, key=lambda c: (per_case[c]["tp"] + per_case[c]["fn"], c))
        images = [images_dir / f"{case}_{channel:04d}.png" for channel in (0, 1)]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            return {"note": f"example figure skipped: missing image(s) {', '.join(missing)}", "patients": picks}
        try:
            ct, pet = (read_gray_png(p)[0].astype(float) for p in images)
        except InputError as e:  # the figure is auxiliary: the scores stand
            return {"note": f"example figure skipped: {e}", "patients": picks}
        rows.append({"label": f"{label} (patient {patient})", "case": case, "ct": ct, "pet": pet,
                     "gt": read_label_png(gt[case]), "preds": {t: read_label_png(preds[t][case]) for t in trainers},
                     "dice": {t: results[t]["per_case"][case]["dice"] for t in trainers}})
    plot_examples(rows, trainers, f"{split}: {', '.join(picks)} patient (mean Dice over trainers); "
                                  f"slice with the largest tumour", path)
    return {"file": path.name, "patients": picks, "cases": {r["label"]: r["case"] for r in rows}}


def _score_split(trainers: list[str], preds: dict[str, dict[str, Path]], gt: dict[str, Path], gt_dir: Path,
                 sep: str) -> dict:
    """Every trainer scored on the same cases, those of ``gt`` (each trainer's ``preds`` cover them exactly), and
    the paired tests of every pair of trainers (p-values also Holm-adjusted over the pairs)."""
    results = {}
    for trainer in trainers:
        results[trainer] = evaluate_pairs({c: CasePair(gt[c], preds[trainer][c]) for c in gt}, patient_sep=sep)
        results[trainer]["pred_dirs"] = sorted({str(p.parent) for p in preds[trainer].values()})
    dice = {t: {p: v["dice"] for p, v in results[t]["per_patient"].items()} for t in trainers}
    stats = [{"a": a, "b": b, **paired_wilcoxon(dice[a], dice[b])} for a, b in combinations(trainers, 2)]
    for test, adjusted in zip(stats, holm_adjusted([t["pvalue"] for t in stats])):
        test["pvalue_holm"] = adjusted
    return {"gt_dir": str(gt_dir), "n_cases": len(gt), "n_patients": results[trainers[0]]["n_patients"],
            "n_cases_per_trainer": {t: results[t]["cipa_protocol"]["n_slices"] for t in trainers},
            "results": results, "wilcoxon_patient_dice": stats}


def _draw_split(split: str, scored: dict, trainers: list[str], preds: dict[str, dict[str, Path]],
                gt: dict[str, Path], images_dir: Path, report_dir: Path) -> dict:
    """The split's figures in ``report_dir``: per-patient Dice distribution and examples; returns their names."""
    results = scored["results"]
    slug = split.lower().replace(" ", "_").replace("-", "_")
    dice_png = report_dir / f"dice_{slug}.png"
    plot_dice_distribution({t: [v["dice"] for v in results[t]["per_patient"].values() if v["dice"] is not None]
                            for t in trainers}, f"Per-patient Dice, {split}", dice_png)
    examples = _split_examples(split, trainers, results, preds, gt, images_dir, report_dir / f"examples_{slug}.png")
    return {"dice_distribution": dice_png.name, "examples": examples}


REPORT_FILE_NAMES = re.compile(r"^(report\.md|report\.json|(dice|examples)_\w+\.png)$")


def check_report_folder(path: Path) -> Path:
    """``path`` if a report can be published there (checked before any work): a new folder, or one holding only a
    previous report's files, which the new report replaces as a whole; InputError naming the problem."""
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path}: report folder exists and is not a folder")
        foreign = sorted(e.name for e in os.scandir(path) if not REPORT_FILE_NAMES.match(e.name))
        if foreign:
            raise InputError(f"{path}: report folder holds files that are not a comparison report's "
                             f"({abbreviated(foreign)}); the report replaces the whole folder: choose a new one")
        StagedFolder.check_replaceable(path, "report folder")
        return path
    check_output_file(path / "report.md")
    return path


def _add_inference_time(cost: dict, model_dir: Path, images_dir: Path, cases: list[str]) -> None:
    """cost["inference"] measured with the cost's checkpoint, or a note saying why not (timing is auxiliary: a
    failure is reported instead of losing the comparison)."""
    if cost["checkpoint"] is None:
        return
    from nnunetv2_cipa.inference_timing import time_inference

    try:
        cost["inference"] = time_inference(model_dir, Path(cost["checkpoint"]), images_dir, cases)
    except Exception as e:
        cost["notes"].append(f"inference timing failed: {type(e).__name__}: {e}")


def named_models(trainers: list[str], plans: list[str]) -> list[tuple[str, str, str]]:
    """(name in the report, trainer, plans identifier) of each model, ``plans`` one for all or one per trainer: the
    names are the trainers', or ``TRAINER__PLANS`` (nnU-Net's folder naming) where the plans differ. InputError
    unless there are two or more distinct models."""
    if len(plans) not in (1, len(trainers)):
        raise InputError(f"-p: give one plans identifier for every trainer, or one per trainer ({len(trainers)}), "
                         f"got {len(plans)}")
    per_model = plans * len(trainers) if len(plans) == 1 else plans
    names = trainers if len(set(per_model)) == 1 else [f"{t}__{p}" for t, p in zip(trainers, per_model)]
    if len(names) < 2 or len(set(names)) != len(names):
        raise InputError(f"trainers: need two or more distinct models (trainer and plans), got {', '.join(names)}")
    return list(zip(names, trainers, per_model))


def compare_trainers(dataset, trainers, report_dir, configuration: str = "2d", plans="nnUNetPlans",
                     folds=(0, 1, 2, 3, 4), test_predictions=None, patient_sep: str = "_",
                     time_inference: bool = False) -> dict:
    """Evaluate each trainer's cross-validation (and optional test) predictions and write REPORT_DIR: report.md,
    report.json and PNG figures, published as a whole once complete (``check_report_folder``); returns the report
    dict (NaN as None). ``plans``: one plans identifier, or a list of one per trainer (the models are then named
    ``TRAINER__PLANS``). ``time_inference`` also measures each model's inference time per slice with nnU-Net's
    predictor. Folds that are not split by patient are reported under "warnings" (and, in the returned dict only, a
    previous report folder that could not be removed)."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    models = named_models(list(trainers), [plans] if isinstance(plans, str) else list(plans))
    trainers, model_plans = [name for name, _, _ in models], [p for _, _, p in models]
    if test_predictions is not None and len(test_predictions) != len(trainers):
        raise InputError(f"test predictions: need one folder per trainer ({len(trainers)}), "
                         f"got {len(test_predictions)}")
    folds = tuple(int(f) for f in folds)
    if len(set(folds)) != len(folds):
        raise InputError(f"-f {' '.join(map(str, folds))}: a fold is given more than once")
    name, raw_dir, results_dir = resolve_dataset(dataset)
    model_dirs = {name: results_dir / convert_trainer_plans_config_to_identifier(t, p, configuration)
                  for name, t, p in models}
    splits_file, splits = read_splits(name, raw_dir)
    fold_cases = validation_case_set(splits_file, splits, folds)

    report_dir = check_report_folder(Path(os.path.abspath(report_dir)))  # "." and ".." get their names
    labels_tr = list_label_pngs(raw_dir / "labelsTr")
    cv_cases = [c for cases in fold_cases.values() for c in cases]
    problems = cover_problems(cv_cases, {c: labels_tr[c] for c in cv_cases if c in labels_tr},
                              f"the validation sets in {splits_file}", raw_dir / "labelsTr")
    cv_preds = {}
    for trainer in trainers:
        cv_preds[trainer], trainer_problems = crossval_predictions(trainer, model_dirs[trainer], fold_cases,
                                                                   splits_file)
        problems += trainer_problems
    if test_predictions is not None:
        labels_ts = list_label_pngs(raw_dir / "labelsTs")
        test_preds, test_problems = predictions_on_test_set(trainers, test_predictions, labels_ts, raw_dir / "labelsTs")
        problems += test_problems
    if problems:
        raise InputError("every trainer must be scored on the same cases:\n  " + "\n  ".join(problems))
    cv_gt = {c: labels_tr[c] for c in sorted(cv_cases)}

    scored = [*cv_cases, *(labels_ts if test_predictions is not None else [])]
    warnings = patient_separator_warnings(scored, patient_sep) + patient_split_warnings(splits_file, splits, folds,
                                                                                         patient_sep)
    splits_out = {"cross-validation": _score_split(trainers, cv_preds, cv_gt, raw_dir / "labelsTr", patient_sep)}
    if test_predictions is not None:
        splits_out["test"] = _score_split(trainers, test_preds, labels_ts, raw_dir / "labelsTs", patient_sep)
    costs = {t: model_costs(model_dirs[t], folds) for t in trainers}
    for trainer in trainers:
        if time_inference:
            _add_inference_time(costs[trainer], model_dirs[trainer], raw_dir / "imagesTr", sorted(cv_cases))
        elif costs[trainer]["checkpoint"] is not None:
            costs[trainer]["notes"].append("inference time not measured (--time-inference measures it)")

    # everything is scored: the report is drawn and written in a staging folder that then replaces REPORT_DIR
    drawn = {"cross-validation": (cv_preds, cv_gt, raw_dir / "imagesTr")}
    if test_predictions is not None:
        drawn["test"] = (test_preds, labels_ts, raw_dir / "imagesTs")
    staged_report = StagedFolder(report_dir)
    with staged_report as folder:
        for split, (preds, gt, images_dir) in drawn.items():
            splits_out[split]["figures"] = _draw_split(split, splits_out[split], trainers, preds, gt, images_dir,
                                                       folder)
        report = json_safe({"dataset": name, "configuration": configuration,
                            "plans": model_plans[0] if len(set(model_plans)) == 1 else model_plans,
                            "folds": list(folds), "splits_file": str(splits_file), "trainers": trainers,
                            "model_dirs": {t: str(d) for t, d in model_dirs.items()}, "warnings": warnings,
                            "splits": splits_out, "costs": costs})
        write_text_atomically(folder / "report.json", json.dumps(report, indent=2, allow_nan=False))
        write_text_atomically(folder / "report.md", render_report(report))
        check_report_folder(report_dir)  # again: files put there while the trainers were scored must not be lost
    report["warnings"] += staged_report.notes  # in the returned dict only
    return report
