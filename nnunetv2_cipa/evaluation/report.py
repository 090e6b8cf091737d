"""Markdown rendering of a compare_trainers report dict (paste-able into a paper supplement)."""

from __future__ import annotations

from nnunetv2_cipa.evaluation.metrics import METRIC_RULES, format_number
from nnunetv2_cipa.evaluation.statistics import WILCOXON_RULE


def _methods(sep: str) -> list[str]:
    """The Methods section: the metric rules the numbers were computed with, and the statistical test."""
    return [f"Predictions are nnU-Net label PNGs (0/1) compared with the raw labels of the same case name; every "
            f"trainer is scored on the same cases. The patient separator is `{sep}`.", "",
            *(f"- {rule}" for rule in (*METRIC_RULES, WILCOXON_RULE))]


def _mean_std(stat: dict, with_n: bool = False) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{format_number(stat['mean'])} ± {format_number(stat['std'])}" + (f" (n={stat['n']})" if with_n else "")


def _metrics_table(split: dict, trainers: list[str]) -> list[str]:
    lines = ["| Trainer | Slices | IoU | Dice | Acc | HD95 (px) | HD95 paper rule (px) | Patient Dice | Patient IoU | "
             "FP area / patient (px) | FN area / patient (px) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for trainer in trainers:
        c, s = split["results"][trainer]["cipa_protocol"], split["results"][trainer]["summary"]
        cells = [trainer, str(c["n_slices"]), *(format_number(c[k]) for k in ("iou", "dice", "balanced_accuracy",
                                                                              "hd95_px", "hd95_px_paper_rule")),
                 _mean_std(s["dice"], with_n=True), *(_mean_std(s[k]) for k in ("iou", "fp_area_px", "fn_area_px"))]
        lines.append(f"| {' | '.join(cells)} |")
    c = split["results"][trainers[0]]["cipa_protocol"]
    lines += ["", f"IoU, Dice, Acc: pooled over {c['n_slices']} slices; HD95 over the slices where both masks are "
                  f"non-empty (per trainer: " + ", ".join(
                      f"{t} {split['results'][t]['cipa_protocol']['n_slices_hd95']}" for t in trainers)
              + f"); paper rule over all {c['n_slices']}. Patient columns: mean ± std over patients, Dice and IoU "
                f"over those with a defined Dice (n, per trainer, in the Dice column), the areas over all "
                f"{split['n_patients']}."]
    return lines


def _wilcoxon_table(split: dict) -> list[str]:
    tests = split["wilcoxon_patient_dice"]
    holm = len(tests) > 1
    header = ["A", "B", "Patients", "Left out", "Nonzero differences", "Median ΔDice (A−B)", "Mean ΔDice (A−B)",
              "95% CI of the mean", "W", "p", *(["p (Holm)"] if holm else []), "Note"]
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for t in tests:
        cells = [t["a"], t["b"], str(t["n_patients"]), str(t["n_patients_left_out"]), str(t["n_nonzero_differences"]),
                 format_number(t["median_difference"]), format_number(t["mean_difference"]),
                 "n/a" if t["mean_difference_ci95"] is None else
                 "[{}, {}]".format(*(format_number(v) for v in t["mean_difference_ci95"])),
                 format_number(t["statistic"]), format_number(t["pvalue"], 3),
                 *([format_number(t["pvalue_holm"], 3)] if holm else []), t["note"]]
        lines.append(f"| {' | '.join(cells)} |")
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
        mirroring = "no mirroring" if inf is None or not inf["mirroring_axes"] else \
            f"mirroring over axes {', '.join(map(str, inf['mirroring_axes']))}, as nnUNetv2_predict by default"
        inf_text = "n/a" if inf is None else (f"{format_number(inf['seconds_per_slice'])} ({inf['device']}, "
                                              f"{inf['n_slices_timed']} slices, {mirroring})")
        lines.append(f"| {trainer} | {params} | {epoch_text} | {inf_text} |")
        notes += [f"- {trainer}: {n}" for n in cost["notes"]]
    lines += ["", "Epoch times are of each trainer's own epoch (its iterations per epoch may differ)."]
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


def _plans_text(plans) -> str:
    """``plans`` for one identifier for every model; several are in the models' names."""
    return f"`{plans}`" if isinstance(plans, str) else "as in each model's name (`TRAINER__PLANS`)"


def render_report(report: dict) -> str:
    """report.md text of a compare_trainers report dict."""
    trainers = report["trainers"]
    splits = report["splits"]
    cv = splits["cross-validation"]
    sep = cv["results"][trainers[0]]["patient_sep"]
    lines = [f"# Trainer comparison on {report['dataset']}", "",
             f"- Trainers: {', '.join(trainers)}",
             f"- Configuration `{report['configuration']}`, plans {_plans_text(report['plans'])}, folds "
             f"{', '.join(map(str, report['folds']))} (validation cases from `{report['splits_file']}`)"]
    for name, split in splits.items():
        per_trainer = ", ".join(f"{t} {n}" for t, n in split["n_cases_per_trainer"].items())
        lines.append(f"- {name}: {split['n_cases']} slices from {split['n_patients']} patients "
                     f"(ground truth `{split['gt_dir']}`); slices scored per trainer: {per_trainer}")
        if name == "test":
            lines.append("- test predictions: " + ", ".join(
                f"{t} `{', '.join(split['results'][t]['pred_dirs'])}`" for t in trainers))
    if report["warnings"]:
        lines += ["", "**Warnings**", "", *(f"- {w}" for w in report["warnings"])]
    lines += ["", "## Methods", "", *_methods(sep), ""]
    for name, split in splits.items():
        lines += [f"## {name.capitalize()}", "", *_metrics_table(split, trainers), "",
                  "### Paired Wilcoxon signed-rank test on per-patient Dice", "", *_wilcoxon_table(split), "",
                  *_figures(split, name), ""]
    lines += ["## Costs", "", *_costs_table(report), ""]
    return "\n".join(lines)
