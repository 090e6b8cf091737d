"""Markdown rendering of a compare_trainers report dict (paste-able into a paper supplement)."""

from __future__ import annotations

from nnunetv2_cipa.evaluation.metrics import format_number

METHODS = (
    "**Metrics.** Predictions are nnU-Net label PNGs (0/1) compared with the raw labels of the same case name. "
    "*CIPA protocol* (as in the CIPA paper's evaluation code): true/false positives/negatives are summed over all"
    " pixels of all slices before computing IoU = TP/(TP+FP+FN) and Dice = 2TP/(2TP+FP+FN) (1 if the denominator "
    "is 0); Acc is the balanced accuracy ½(TP/(TP+FN) + TN/(TN+FP)). HD95 is medpy's 95th-percentile symmetric "
    "Hausdorff distance in pixels (borders from a 4-connected erosion), computed per slice and averaged: *HD95* "
    "over slices where prediction and ground truth are both non-empty; *HD95 (paper rule)* over all slices, a "
    "single pixel being planted at the image centre in an empty mask (0 when both are empty). *Patient level*: a "
    "patient is the part of the case name before the first `{sep}`; Dice and IoU are pooled over the patient's "
    "slices (undefined, and left out, when the patient has neither tumour nor prediction); FP / FN area is the "
    "pixel area of 8-connected predicted components that touch no ground truth / ground-truth components that "
    "touch no prediction (2D analogue of autoPET's FPV / FNV). Mean ± sample standard deviation over patients. "
    "Trainers are compared with a two-sided paired Wilcoxon signed-rank test (scipy.stats.wilcoxon, zero "
    "differences dropped) on per-patient Dice."
)


def _mean_std(stat: dict) -> str:
    return "n/a" if stat["mean"] is None else f"{format_number(stat['mean'])} ± {format_number(stat['std'])}"


def _metrics_table(split: dict, trainers: list[str]) -> list[str]:
    lines = ["| Trainer | IoU | Dice | Acc | HD95 (px) | HD95 paper rule (px) | Patient Dice | Patient IoU | "
             "FP area / patient (px) | FN area / patient (px) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for trainer in trainers:
        c, s = split["results"][trainer]["cipa_protocol"], split["results"][trainer]["summary"]
        lines.append(f"| {trainer} | {format_number(c['iou'])} | {format_number(c['dice'])} | {format_number(c['balanced_accuracy'])} | "
                     f"{format_number(c['hd95_px'])} | {format_number(c['hd95_px_paper_rule'])} | {_mean_std(s['dice'])} | "
                     f"{_mean_std(s['iou'])} | {_mean_std(s['fp_area_px'])} | {_mean_std(s['fn_area_px'])} |")
    c = split["results"][trainers[0]]["cipa_protocol"]
    lines += ["", f"IoU, Dice, Acc: pooled over {c['n_slices']} slices; HD95 over the slices where both masks are "
                  f"non-empty (per trainer: " + ", ".join(
                      f"{t} {split['results'][t]['cipa_protocol']['n_slices_hd95']}" for t in trainers)
              + f"); paper rule over all {c['n_slices']}. Patient columns: mean ± std over patients "
                f"(n = {split['results'][trainers[0]]['summary']['dice']['n']} with a defined Dice)."]
    return lines


def _wilcoxon_table(split: dict) -> list[str]:
    lines = ["| A | B | Patients | Median ΔDice (A−B) | Mean ΔDice (A−B) | W | p | Note |",
             "|---|---|---|---|---|---|---|---|"]
    for t in split["wilcoxon_patient_dice"]:
        lines.append(f"| {t['a']} | {t['b']} | {t['n_patients']} | {format_number(t['median_difference'])} | "
                     f"{format_number(t['mean_difference'])} | {format_number(t['statistic'])} | {format_number(t['pvalue'], 3)} | {t['note']} |")
    return lines


def _costs_table(report: dict) -> list[str]:
    lines = ["| Trainer | Parameters | Training time / epoch (s) | Inference time / slice (s) |", "|---|---|---|---|"]
    notes = []
    for trainer in report["trainers"]:
        cost = report["costs"][trainer]
        params = "n/a" if cost["parameters"] is None else f"{cost['parameters']:,}"
        epoch = cost["epoch_time_s"]
        epoch_text = "n/a" if epoch is None else f"{format_number(epoch['mean'])} (mean of {epoch['n_epochs']} epochs)"
        inf = cost["inference"]
        inf_text = "n/a" if inf is None else (f"{format_number(inf['seconds_per_slice'])} ({inf['device']}, "
                                              f"{inf['n_slices_timed']} slices, no mirroring)")
        lines.append(f"| {trainer} | {params} | {epoch_text} | {inf_text} |")
        notes += [f"- {trainer}: {n}" for n in cost["notes"]]
    return lines + ([""] + notes if notes else [])


def _figures(split: dict, title: str) -> list[str]:
    figures = split["figures"]
    lines = [f"![Per-patient Dice, {title}]({figures['dice_distribution']})", ""]
    examples = figures["examples"]
    if "file" in examples:
        cases = ", ".join(f"{label}: {case}" for label, case in examples["cases"].items())
        lines.append(f"![Examples, {title}]({examples['file']})")
        lines.append(f"*Examples ({cases}).* Columns: CT, PET, ground truth, then each trainer's prediction "
                     f"(yellow true positive, red false positive, blue false negative).")
    else:
        lines.append(f"Example figure: {examples['note']}")
    return lines


def render_report(report: dict) -> str:
    """report.md text of a compare_trainers report dict."""
    trainers = report["trainers"]
    splits = report["splits"]
    cv = splits["cross-validation"]
    sep = cv["results"][trainers[0]]["patient_sep"]
    lines = [f"# Trainer comparison on {report['dataset']}", "",
             f"- Trainers: {', '.join(trainers)}",
             f"- Configuration `{report['configuration']}`, plans `{report['plans']}`, folds "
             f"{', '.join(map(str, report['folds']))}"]
    for name, split in splits.items():
        lines.append(f"- {name}: {split['n_cases']} slices from {split['n_patients']} patients "
                     f"(ground truth `{split['gt_dir']}`)")
    lines += ["", "## Methods", "", METHODS.replace("{sep}", sep), ""]
    for name, split in splits.items():
        lines += [f"## {name.capitalize()}", "", *_metrics_table(split, trainers), "",
                  "### Paired Wilcoxon signed-rank test on per-patient Dice", "", *_wilcoxon_table(split), "",
                  *_figures(split, name), ""]
    lines += ["## Costs", "", *_costs_table(report), ""]
    return "\n".join(lines)
