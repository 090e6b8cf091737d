"""CIPA-protocol, per-slice and per-patient metrics of binary 2D label PNGs (nnU-Net's output format).

The conventions are METRIC_RULES: written into every result under "notes" and into the comparison report.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from nnunetv2_cipa.cases import patient_of, patient_separator_warnings
from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.png_io import read_label_png

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)
PATIENT_METRICS = ("dice", "iou", "balanced_accuracy", "sensitivity", "precision", "hd95_px", "hd95_px_paper_rule",
                   "fp_area_px", "fn_area_px", "n_slices")
METRIC_RULES = (
    "CIPA protocol (as in the CIPA paper's evaluation code): TP/FP/FN/TN pooled over all pixels of all slices; "
    "IoU = TP/(TP+FP+FN), Dice = 2TP/(2TP+FP+FN), both 1.0 when the denominator is 0; \"Acc\" = balanced accuracy "
    "= mean of sensitivity and specificity (a term with a zero denominator counts as 1.0).",
    "HD95 (medpy.metric.binary.hd95, pixel units): borders = mask XOR 4-connected erosion; the 95th percentile of "
    "the pooled distances border(pred)->border(gt) and border(gt)->border(pred). \"hd95_px\" averages it over slices "
    "where both masks are non-empty; \"hd95_px_paper_rule\" averages over all slices with the official rule for an "
    "empty prediction, applied to an empty ground truth too: one pixel is planted at (H//2, W//2) in the empty mask, "
    "both empty = 0.",
    "Per slice: dice/iou are NaN (JSON null) when GT and prediction are both empty; hd95 is NaN when either is empty.",
    "Per patient (ID = case name before the first patient separator): counts pooled over the patient's slices; "
    "Dice/IoU NaN when TP+FP+FN = 0, sensitivity and balanced accuracy NaN when the patient has no tumour pixel "
    "(TP+FN = 0), precision NaN when the prediction is empty (TP+FP = 0); hd95 means over the patient's slices; "
    "fp_area_px / fn_area_px: summed areas of the 8-connected components of the prediction that share no pixel "
    "with the GT (FP) and of the GT that share none with the prediction (FN), the 2D analogue of autoPET's "
    "false-positive / false-negative volumes.",
    "Summary: mean, median and sample std (ddof=1) over patients, ignoring NaN; \"n\" = patients with a finite value.",
)
NOTES = "\n".join(f"- {rule}" for rule in METRIC_RULES)


def _ratio(numerator: float, denominator: float, empty: float) -> float:
    return numerator / denominator if denominator > 0 else empty


def _foreground_window(mask: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of the (H, W) mask plus one background pixel per side (clipped): erosion, border distances and
    connected components of anything inside the box are unchanged by cropping to it. Whole image if empty."""
    if not mask.any():
        return slice(None), slice(None)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2)


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """medpy-equivalent 95th-percentile symmetric Hausdorff distance (px) of two non-empty (H, W) masks: distances
    from each 4-connected border pixel of one mask to the nearest border pixel of the other, both ways."""
    if not pred.any() or not gt.any():
        raise ValueError("hd95 needs two non-empty masks")
    window = _foreground_window(pred | gt)
    pred_border, gt_border = (mask[window] ^ ndimage.binary_erosion(mask[window], structure=FOUR_CONNECTED)
                              for mask in (pred, gt))
    distances = (ndimage.distance_transform_edt(~gt_border)[pred_border],
                 ndimage.distance_transform_edt(~pred_border)[gt_border])
    return float(np.percentile(np.hstack(distances), 95))


def hd95_paper_rule(pred: np.ndarray, gt: np.ndarray) -> float:
    """HD95 (px) with the official rule for an empty prediction, applied to either mask: both empty -> 0; one
    empty -> a pixel at (H//2, W//2) in it."""
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty and gt_empty:
        return 0.0
    centre = (pred.shape[0] // 2, pred.shape[1] // 2)
    if pred_empty:
        pred = np.zeros_like(pred)
        pred[centre] = True
    if gt_empty:
        gt = np.zeros_like(gt)
        gt[centre] = True
    return hd95(pred, gt)


def unmatched_component_area(mask: np.ndarray, other: np.ndarray) -> int:
    """Pixels of the 8-connected components of ``mask`` (H, W) bool that share no pixel with ``other``."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count == 0:
        return 0
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    matched = np.unique(labels[mask & other])
    areas[matched] = 0
    areas[0] = 0
    return int(areas.sum())


def slice_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """All per-slice numbers of one (H, W) bool prediction against its (H, W) bool ground truth."""
    window = _foreground_window(pred | gt)  # every count, border and component lies inside it
    pred_crop, gt_crop = pred[window], gt[window]
    tp = int(np.count_nonzero(pred_crop & gt_crop))
    fp = int(np.count_nonzero(pred_crop)) - tp
    fn = int(np.count_nonzero(gt_crop)) - tp
    both_empty = tp + fp + fn == 0
    both_present = tp + fp > 0 and tp + fn > 0
    distance = hd95(pred_crop, gt_crop) if both_present else math.nan
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": pred.size - tp - fp - fn,
        "dice": math.nan if both_empty else 2 * tp / (2 * tp + fp + fn),
        "iou": math.nan if both_empty else tp / (tp + fp + fn),
        "hd95_px": distance,
        "hd95_px_paper_rule": distance if both_present else hd95_paper_rule(pred, gt),
        "fp_area_px": unmatched_component_area(pred_crop, gt_crop),
        "fn_area_px": unmatched_component_area(gt_crop, pred_crop),
    }


class CasePair(NamedTuple):
    """The ground-truth and the predicted label PNG of one case (a process-pool task)."""
    gt: Path
    pred: Path


def _pair_metrics(pair: CasePair) -> dict:
    gt, pred = read_label_png(pair.gt), read_label_png(pair.pred)
    if gt.shape != pred.shape:
        raise InputError(f"size mismatch: {pair.pred} is {pred.shape[1]}x{pred.shape[0]} (WxH) but "
                         f"{pair.gt} is {gt.shape[1]}x{gt.shape[0]}")
    return slice_metrics(pred, gt)


def list_label_pngs(folder: str | os.PathLike) -> dict[str, Path]:
    """Case name -> path of every *.png in ``folder`` (other files nnU-Net writes are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {'not a folder' if folder.exists() else 'folder does not exist'}")
    cases = {p.name[:-4]: p for p in sorted(folder.glob("*.png"))}
    if not cases:
        raise InputError(f"{folder}: no *.png label files")
    return cases


def _pooled(tp: int, fp: int, fn: int, tn: int, empty: float) -> dict:
    """Ratios of pooled counts; a zero denominator gives ``empty`` (1.0 in the CIPA protocol, NaN per patient)."""
    sensitivity = _ratio(tp, tp + fn, empty)
    specificity = _ratio(tn, tn + fp, empty)
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn, empty), "iou": _ratio(tp, tp + fp + fn, empty),
            "balanced_accuracy": (sensitivity + specificity) / 2, "sensitivity": sensitivity,
            "specificity": specificity, "precision": _ratio(tp, tp + fp, empty)}


def _aggregate(per_case: dict[str, dict], empty: float) -> dict:
    counts = {k: int(sum(c[k] for c in per_case.values())) for k in ("tp", "fp", "fn", "tn")}
    hd = np.array([c["hd95_px"] for c in per_case.values()], dtype=float)
    hd_paper = np.array([c["hd95_px_paper_rule"] for c in per_case.values()], dtype=float)
    finite = np.isfinite(hd)
    return {**_pooled(**counts, empty=empty), **counts,
            "hd95_px": float(hd[finite].mean()) if finite.any() else math.nan,
            "hd95_px_paper_rule": float(hd_paper.mean()),
            "n_slices": len(per_case), "n_slices_hd95": int(finite.sum()),
            "fp_area_px": int(sum(c["fp_area_px"] for c in per_case.values())),
            "fn_area_px": int(sum(c["fn_area_px"] for c in per_case.values()))}


def summarize_patients(per_patient: dict[str, dict]) -> dict:
    """{metric: {mean, median, std (ddof=1), n}} over patients, NaN values left out."""
    summary = {}
    for metric in PATIENT_METRICS:
        values = np.array([p[metric] for p in per_patient.values()], dtype=float)
        values = values[np.isfinite(values)]
        n = len(values)
        summary[metric] = {"mean": float(values.mean()) if n else math.nan,
                           "median": float(np.median(values)) if n else math.nan,
                           "std": float(values.std(ddof=1)) if n > 1 else math.nan, "n": n}
    return summary


def json_safe(value):
    """Recursively replace NaN/inf by None and numpy scalars by Python ones, so json.dumps writes valid JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_pairs(pairs: dict[str, CasePair], patient_sep: str = "_", num_workers: int | None = None) -> dict:
    """Metrics of {case: (gt_png, pred_png)}: "cipa_protocol", "per_case", "per_patient", "summary", "notes".

    NaN values are already replaced by None (valid JSON)."""
    if not patient_sep:
        raise InputError("patient separator must be a non-empty string")
    cases = sorted(pairs)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if len(cases) >= 256 else 1
    if num_workers > 1:
        # fork on Linux: workers only run numpy/scipy/PIL, and spawn would need a __main__ guard in callers; spawn
        # elsewhere (macOS's default: a fork after threads have started, torch's or Accelerate's, can crash there)
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with ProcessPoolExecutor(num_workers, mp_context=get_context(method)) as pool:
            results = list(pool.map(_pair_metrics, [pairs[c] for c in cases], chunksize=32))
    else:
        results = [_pair_metrics(pairs[c]) for c in cases]
    per_case = dict(zip(cases, results))

    by_patient: dict[str, dict[str, dict]] = {}
    for case, metrics in per_case.items():
        by_patient.setdefault(patient_of(case, patient_sep), {})[case] = metrics
    per_patient = {pid: _aggregate(slices, empty=math.nan) for pid, slices in sorted(by_patient.items())}
    pooled = _aggregate(per_case, empty=1.0)
    cipa = {k: pooled[k] for k in ("iou", "dice", "balanced_accuracy", "sensitivity", "specificity", "hd95_px",
                                   "hd95_px_paper_rule", "tp", "fp", "fn", "tn", "n_slices", "n_slices_hd95")}
    cipa.update(n_slices_hd95_paper_rule=len(cases),
                n_slices_gt_empty=sum(c["tp"] + c["fn"] == 0 for c in results),
                n_slices_pred_empty=sum(c["tp"] + c["fp"] == 0 for c in results))
    return json_safe({"cipa_protocol": cipa, "n_patients": len(per_patient), "patient_sep": patient_sep,
                      "summary": summarize_patients(per_patient), "per_patient": per_patient,
                      "per_case": per_case, "notes": NOTES})


def abbreviated(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, comma-separated, with "..." when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def cover_problems(expected, found, expected_from, found_in) -> list[str]:
    """Messages for the cases of ``expected`` that ``found`` lacks and the cases of ``found`` outside ``expected``
    (case names; ``expected_from`` / ``found_in`` name where each set comes from)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"{found_in} lacks {len(missing)} of the {len(set(expected))} cases of {expected_from}: "
                        f"{abbreviated(missing)}")
    if extra:
        problems.append(f"{found_in} holds {len(extra)} case(s) that are not in {expected_from}: {abbreviated(extra)}")
    return problems


def match_cases(gt: dict[str, Path], pred: dict[str, Path], gt_dir, pred_dir) -> dict[str, CasePair]:
    """Pair GT and prediction files by case name; InputError listing a few missing / extra names."""
    problems = cover_problems(gt, pred, gt_dir, pred_dir)
    if problems:
        raise InputError("; ".join(problems))
    return {case: CasePair(gt[case], pred[case]) for case in gt}


def evaluate_folders(gt_dir, pred_dir, patient_sep: str = "_", num_workers: int | None = None) -> dict:
    """Metrics of every *.png in ``pred_dir`` against the same-named *.png in ``gt_dir`` (see ``evaluate_pairs``)."""
    return evaluate_listed(list_label_pngs(gt_dir), list_label_pngs(pred_dir), gt_dir, pred_dir, patient_sep,
                           num_workers)


def evaluate_listed(gt: dict[str, Path], pred: dict[str, Path], gt_dir, pred_dir, patient_sep: str = "_",
                    num_workers: int | None = None, chill: bool = False) -> dict:
    """``evaluate_folders`` for the ``list_label_pngs`` of ``gt_dir`` and ``pred_dir``, with "warnings" (e.g. a
    ``patient_sep`` that no case name holds); ``chill``: only the cases ``pred`` holds (as nnU-Net's ``--chill``),
    e.g. one fold's validation predictions against labelsTr."""
    if os.path.samefile(gt_dir, pred_dir):
        raise InputError(f"{pred_dir}: the prediction folder is the ground-truth folder {gt_dir}")
    if chill:
        gt = {case: path for case, path in gt.items() if case in pred}
    try:
        pairs = match_cases(gt, pred, gt_dir, pred_dir)
    except InputError as e:
        if pred and set(pred) < set(gt):
            raise InputError(f"{e}; pass --chill to score only the cases {pred_dir} holds (e.g. one fold's "
                             "validation predictions against labelsTr)") from None
        raise
    result = evaluate_pairs(pairs, patient_sep=patient_sep, num_workers=num_workers)
    return {"gt_dir": str(gt_dir), "pred_dir": str(pred_dir), **result,
            "warnings": patient_separator_warnings(pairs, patient_sep)}


def format_number(value, digits: int = 4) -> str:
    """A metric for text reports: ``digits`` significant digits (whole numbers from 10**digits on, never an
    exponent), "n/a" for None."""
    if value is None:
        return "n/a"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    if 0 < abs(value) < 1e-4:  # where the g format switches to an exponent
        return np.format_float_positional(value, precision=digits, unique=False, fractional=False, trim="-")
    return f"{value:.{digits}g}"


def format_summary(result: dict) -> str:
    """Two-line headline: CIPA-protocol IoU/Dice/Acc/HD95 and patient-level mean ± std Dice."""
    c, s = result["cipa_protocol"], result["summary"]["dice"]
    n = format_number
    return (f"CIPA protocol ({c['n_slices']} slices): IoU {n(c['iou'])}  Dice {n(c['dice'])}  "
            f"Acc {n(c['balanced_accuracy'])}  HD95 {n(c['hd95_px'])}{' px' if c['hd95_px'] is not None else ''} "
            f"({c['n_slices_hd95']} slices with "
            f"both masks) / {n(c['hd95_px_paper_rule'])} px (paper rule, all slices)\n"
            f"Patients ({s['n']} of {result['n_patients']} with a Dice): Dice {n(s['mean'])} ± {n(s['std'])} "
            f"(mean ± std), "
            f"median {n(s['median'])}")
