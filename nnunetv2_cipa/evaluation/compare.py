"""Compare nnU-Net trainers (e.g. nnUNetTrainerCIPA vs nnUNetTrainer) on their cross-validation and test predictions:
metrics, paired Wilcoxon tests on per-patient Dice, costs, figures, and a paste-able report.md + report.json.

Each split has one case set that every trainer must cover exactly: the validation cases of the requested folds in the
splits_final.json nnU-Net trained with, and every case of labelsTs for the test split. A trainer folder that lacks a
case of the set, or holds one outside it, is an error naming the trainer, the folder and the cases.
"""

from __future__ import annotations

import json
import os
from itertools import combinations
from pathlib import Path

import numpy as np

from nnunetv2_cipa.cases import patient_of
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.evaluation.costs import model_costs
from nnunetv2_cipa.evaluation.figures import plot_dice_distribution, plot_examples
from nnunetv2_cipa.evaluation.metrics import CasePair, cover_problems, evaluate_pairs, json_safe, list_label_pngs
from nnunetv2_cipa.evaluation.report import render_report
from nnunetv2_cipa.evaluation.statistics import paired_wilcoxon
from nnunetv2_cipa.paths import output_folder, required_folder, write_text_atomically
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
    try:
        splits = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: unreadable splits file ({e})") from e
    if not isinstance(splits, list) or not all(isinstance(s, dict) and isinstance(s.get("val"), list) for s in splits):
        raise InputError(f"{path}: not an nnU-Net splits file (a list of {{'train': [...], 'val': [...]}})")
    return path, splits


def validation_case_set(splits_file: Path, splits: list[dict], folds: tuple[int, ...]) -> dict[int, list[str]]:
    """{fold: its validation cases} for the requested folds; InputError for a fold the file lacks or a case that
    two folds validate."""
    fold_cases, seen = {}, {}
    for fold in folds:
        if not 0 <= fold < len(splits):
            raise InputError(f"fold {fold}: {splits_file} defines folds 0..{len(splits) - 1} (-f)")
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
            raise InputError(f"fold {fold}: validation folder {folder} does not exist (run nnUNetv2_train "
                             f"... {fold} --val, or leave the fold out with -f)")
        found = list_label_pngs(folder)
        problems += [f"{trainer}: {p}" for p in
                     cover_problems(expected, found, f"fold {fold}'s validation set in {splits_file}", folder)]
        cases.update(found)
    return cases, problems


def predictions_on_test_set(trainers: list[str], folders: list, gt: dict[str, Path], gt_dir: Path
                        ) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """({trainer: case -> test PNG}, problems): each folder must hold exactly the cases of ``gt_dir``."""
    preds, problems = {}, []
    for trainer, folder in zip(trainers, folders):
        preds[trainer] = list_label_pngs(folder)
        problems += [f"{trainer}: {p}" for p in cover_problems(gt, preds[trainer], f"the test set {gt_dir}", folder)]
    return preds, problems


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
        ct, pet = (read_gray_png(p)[0].astype(float) for p in images)
        rows.append({"label": f"{label} (patient {patient})", "case": case, "ct": ct, "pet": pet,
                     "gt": read_label_png(gt[case]), "preds": {t: read_label_png(preds[t][case]) for t in trainers},
                     "dice": {t: results[t]["per_case"][case]["dice"] for t in trainers}})
    plot_examples(rows, trainers, f"{split}: {', '.join(picks)} patient (mean Dice over trainers); "
                                  f"slice with the largest tumour", path)
    return {"file": path.name, "patients": picks, "cases": {r["label"]: r["case"] for r in rows}}


def _evaluate_split(split: str, trainers: list[str], preds: dict[str, dict[str, Path]], gt: dict[str, Path],
                    gt_dir: Path, images_dir: Path, report_dir: Path, sep: str) -> dict:
    """Every trainer scored on the same cases: those of ``gt`` (each trainer's ``preds`` cover them exactly)."""
    results = {}
    for trainer in trainers:
        results[trainer] = evaluate_pairs({c: CasePair(gt[c], preds[trainer][c]) for c in gt}, patient_sep=sep)
        results[trainer]["pred_dirs"] = sorted({str(p.parent) for p in preds[trainer].values()})
    dice = {t: {p: v["dice"] for p, v in results[t]["per_patient"].items()} for t in trainers}
    stats = [{"a": a, "b": b, **paired_wilcoxon(dice[a], dice[b])} for a, b in combinations(trainers, 2)]
    slug = split.lower().replace(" ", "_").replace("-", "_")
    dice_png = report_dir / f"dice_{slug}.png"
    plot_dice_distribution({t: [d for d in dice[t].values() if d is not None] for t in trainers},
                           f"Per-patient Dice, {split}", dice_png)
    examples = _split_examples(split, trainers, results, preds, gt, images_dir, report_dir / f"examples_{slug}.png")
    return {"gt_dir": str(gt_dir), "n_cases": len(gt), "n_patients": results[trainers[0]]["n_patients"],
            "n_cases_per_trainer": {t: results[t]["cipa_protocol"]["n_slices"] for t in trainers},
            "results": results, "wilcoxon_patient_dice": stats,
            "figures": {"dice_distribution": dice_png.name, "examples": examples}}


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


def compare_trainers(dataset, trainers, report_dir, configuration: str = "2d", plans: str = "nnUNetPlans",
                     folds=(0, 1, 2, 3, 4), test_predictions=None, patient_sep: str = "_",
                     time_inference: bool = False) -> dict:
    """Evaluate each trainer's cross-validation (and optional test) predictions, write REPORT_DIR/report.md,
    report.json and PNG figures; returns the report dict (NaN as None). ``time_inference`` also measures each
    model's inference time per slice with nnU-Net's predictor."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    trainers = list(trainers)
    if len(trainers) < 2 or len(set(trainers)) != len(trainers):
        raise InputError(f"trainers: need two or more distinct trainer names, got {trainers}")
    if test_predictions is not None and len(test_predictions) != len(trainers):
        raise InputError(f"test predictions: need one folder per trainer ({len(trainers)}), "
                         f"got {len(test_predictions)}")
    folds = tuple(int(f) for f in folds)
    name, raw_dir, results_dir = resolve_dataset(dataset)
    model_dirs = {t: results_dir / convert_trainer_plans_config_to_identifier(t, plans, configuration)
                  for t in trainers}
    splits_file, splits = read_splits(name, raw_dir)
    fold_cases = validation_case_set(splits_file, splits, folds)

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

    report_dir = output_folder(report_dir, "report folder")
    splits_out = {"cross-validation": _evaluate_split(
        "cross-validation", trainers, cv_preds, {c: labels_tr[c] for c in sorted(cv_cases)}, raw_dir / "labelsTr",
        raw_dir / "imagesTr", report_dir, patient_sep)}
    if test_predictions is not None:
        splits_out["test"] = _evaluate_split("test", trainers, test_preds, labels_ts, raw_dir / "labelsTs",
                                             raw_dir / "imagesTs", report_dir, patient_sep)
    costs = {t: model_costs(model_dirs[t], folds) for t in trainers}
    for trainer in trainers:
        if time_inference:
            _add_inference_time(costs[trainer], model_dirs[trainer], raw_dir / "imagesTr", sorted(cv_cases))
        elif costs[trainer]["checkpoint"] is not None:
            costs[trainer]["notes"].append("inference time not measured (--time-inference measures it)")
    report = json_safe({"dataset": name, "configuration": configuration, "plans": plans, "folds": list(folds),
                        "splits_file": str(splits_file), "trainers": trainers,
                        "model_dirs": {t: str(d) for t, d in model_dirs.items()}, "splits": splits_out,
                        "costs": costs})
    write_text_atomically(report_dir / "report.json", json.dumps(report, indent=2, allow_nan=False))
    write_text_atomically(report_dir / "report.md", render_report(report))
    return report
