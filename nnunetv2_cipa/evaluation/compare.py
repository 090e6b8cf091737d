"""Compare nnU-Net trainers (e.g. nnUNetTrainerCIPA vs nnUNetTrainer) on their cross-validation and test predictions:
metrics, paired Wilcoxon tests on per-patient Dice, costs, figures, and a paste-able report.md + report.json."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.paths import required_folder
from nnunetv2_cipa.evaluation.costs import model_costs
from nnunetv2_cipa.evaluation.figures import plot_dice_distribution, plot_examples
from nnunetv2_cipa.evaluation.metrics import evaluate_pairs, json_safe, list_label_pngs, match_cases, read_label_png
from nnunetv2_cipa.evaluation.report import render_report


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


def crossval_predictions(model_dir: Path, folds: tuple[int, ...]) -> dict[str, Path]:
    """Case -> validation PNG over ``model_dir``/fold_k/validation for every requested fold."""
    if not model_dir.is_dir():
        raise InputError(f"trained model folder {model_dir} does not exist")
    cases: dict[str, Path] = {}
    for fold in folds:
        folder = model_dir / f"fold_{fold}" / "validation"
        if not folder.is_dir():
            raise InputError(f"fold {fold}: validation folder {folder} does not exist (run nnUNetv2_train "
                             f"... {fold} --val, or leave the fold out with -f)")
        for case, path in list_label_pngs(folder).items():
            if case in cases:
                raise InputError(f"case {case} is predicted in two folds: {cases[case]} and {path}")
            cases[case] = path
    return cases


def paired_wilcoxon(a: dict[str, float | None], b: dict[str, float | None]) -> dict:
    """Two-sided paired Wilcoxon signed-rank test (scipy, zero differences dropped) on patients scored in both."""
    patients = sorted(p for p in a if p in b and a[p] is not None and b[p] is not None)
    x = np.array([a[p] for p in patients], dtype=float)
    y = np.array([b[p] for p in patients], dtype=float)
    diff = x - y
    out = {"n_patients": len(patients), "n_nonzero_differences": int(np.count_nonzero(diff)),
           "mean_difference": float(diff.mean()) if len(patients) else None,
           "median_difference": float(np.median(diff)) if len(patients) else None,
           "statistic": None, "pvalue": None}
    if len(patients) < 2:
        out["note"] = f"not tested: {len(patients)} patient(s) scored by both trainers (need at least 2)"
    elif not diff.any():
        out["note"] = "not tested: identical per-patient Dice for every patient"
    else:
        result = wilcoxon(x, y)
        out.update(statistic=float(result.statistic), pvalue=float(result.pvalue),
                   note="two-sided; zero differences dropped (zero_method='wilcox')")
    return out


def _split_examples(split: str, trainers: list[str], results: dict[str, dict], preds: dict[str, dict[str, Path]],
                    gt_dir: Path, images_dir: Path, path: Path) -> dict:
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
        cases = [c for c in per_case if c.split(sep, 1)[0] == patient]
        case = max(cases, key=lambda c: (per_case[c]["tp"] + per_case[c]["fn"], c))
        images = [images_dir / f"{case}_{channel:04d}.png" for channel in (0, 1)]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            return {"note": f"example figure skipped: missing image(s) {', '.join(missing)}", "patients": picks}
        ct, pet = (_read_image(p) for p in images)
        gt = read_label_png(gt_dir / f"{case}.png")
        rows.append({"label": f"{label} (patient {patient})", "case": case, "ct": ct, "pet": pet, "gt": gt,
                     "preds": {t: read_label_png(preds[t][case]) for t in trainers},
                     "dice": {t: results[t]["per_case"][case]["dice"] for t in trainers}})
    plot_examples(rows, trainers, f"{split}: {', '.join(picks)} patient (mean Dice over trainers); "
                                  f"slice with the largest tumour", path)
    return {"file": path.name, "patients": picks, "cases": {r["label"]: r["case"] for r in rows}}


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image, dtype=float)
    return array.mean(-1) if array.ndim == 3 else array


def _evaluate_split(split: str, trainers: list[str], preds: dict[str, dict[str, Path]], gt_dir: Path,
                    images_dir: Path, report_dir: Path, sep: str) -> dict:
    gt = list_label_pngs(gt_dir)
    results = {}
    for trainer in trainers:
        cases = preds[trainer]
        pred_gt = {c: gt[c] for c in cases if c in gt}
        source = sorted({str(p.parent) for p in cases.values()})
        results[trainer] = evaluate_pairs(match_cases(pred_gt, cases, gt_dir, ", ".join(source)), patient_sep=sep)
        results[trainer]["pred_dirs"] = source
    dice = {t: {p: v["dice"] for p, v in results[t]["per_patient"].items()} for t in trainers}
    stats = [{"a": a, "b": b, **paired_wilcoxon(dice[a], dice[b])} for a, b in combinations(trainers, 2)]
    slug = split.lower().replace(" ", "_").replace("-", "_")
    dice_png = report_dir / f"dice_{slug}.png"
    plot_dice_distribution({t: [d for d in dice[t].values() if d is not None] for t in trainers},
                           f"Per-patient Dice, {split}", dice_png)
    examples = _split_examples(split, trainers, results, preds, gt_dir, images_dir, report_dir / f"examples_{slug}.png")
    first = results[trainers[0]]
    return {"gt_dir": str(gt_dir), "n_cases": first["cipa_protocol"]["n_slices"], "n_patients": first["n_patients"],
            "results": results, "wilcoxon_patient_dice": stats,
            "figures": {"dice_distribution": dice_png.name, "examples": examples}}


def compare_trainers(dataset, trainers, report_dir, configuration: str = "2d", plans: str = "nnUNetPlans",
                     folds=(0, 1, 2, 3, 4), test_predictions=None, patient_sep: str = "_",
                     time_inference: bool = True) -> dict:
    """Evaluate each trainer's cross-validation (and optional test) predictions, write REPORT_DIR/report.md,
    report.json and PNG figures; returns the report dict (NaN as None)."""
    trainers = list(trainers)
    if len(trainers) < 2 or len(set(trainers)) != len(trainers):
        raise InputError(f"trainers: need two or more distinct trainer names, got {trainers}")
    if test_predictions is not None and len(test_predictions) != len(trainers):
        raise InputError(f"test predictions: need one folder per trainer ({len(trainers)}), "
                         f"got {len(test_predictions)}")
    folds = tuple(int(f) for f in folds)
    name, raw_dir, results_dir = resolve_dataset(dataset)
    model_dirs = {t: results_dir / f"{t}__{plans}__{configuration}" for t in trainers}
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)

    cv_preds = {t: crossval_predictions(model_dirs[t], folds) for t in trainers}
    splits = {"cross-validation": _evaluate_split("cross-validation", trainers, cv_preds, raw_dir / "labelsTr",
                                                  raw_dir / "imagesTr", report_dir, patient_sep)}
    if test_predictions is not None:
        test_preds = {t: list_label_pngs(folder) for t, folder in zip(trainers, test_predictions)}
        splits["test"] = _evaluate_split("test", trainers, test_preds, raw_dir / "labelsTs", raw_dir / "imagesTs",
                                         report_dir, patient_sep)
    validation_cases = {t: sorted(cv_preds[t]) for t in trainers}
    costs = {t: model_costs(model_dirs[t], folds, raw_dir / "imagesTr", validation_cases[t], time_inference)
             for t in trainers}
    report = json_safe({"dataset": name, "configuration": configuration, "plans": plans, "folds": list(folds),
                        "trainers": trainers, "model_dirs": {t: str(d) for t, d in model_dirs.items()},
                        "splits": splits, "costs": costs})
    (report_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    (report_dir / "report.md").write_text(render_report(report))
    return report

