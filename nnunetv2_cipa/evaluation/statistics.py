"""Paired comparison of two trainers over patients."""

from __future__ import annotations

import numpy as np
from scipy.stats import wilcoxon

WILCOXON_RULE = ("Trainers are compared with a two-sided paired Wilcoxon signed-rank test (scipy.stats.wilcoxon, "
                 "zero differences dropped) on per-patient Dice, over the patients with a Dice value for both.")


def paired_wilcoxon(a: dict[str, float | None], b: dict[str, float | None]) -> dict:
    """WILCOXON_RULE on {patient: Dice} of trainers A and B: counts, mean / median difference, statistic, p-value."""
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
