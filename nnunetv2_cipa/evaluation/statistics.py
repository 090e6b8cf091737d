"""Paired comparison of two trainers over patients, and the multiple-comparison adjustment of several."""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap, wilcoxon

BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the interval is reproducible run to run
BOOTSTRAP_MIN_PATIENTS = 5  # fewer: the resamples repeat a handful of values, the interval means nothing

WILCOXON_RULE = ("Trainers are compared with a two-sided paired Wilcoxon signed-rank test (scipy.stats.wilcoxon, "
                 "zero differences dropped) on per-patient Dice, over the patients with a Dice value for both; a "
                 "patient whose ground truth and prediction are both empty has none and is left out (counted in the "
                 "table; its false positives of the other trainer show in the FP area column). The 95% confidence "
                 "interval of the mean per-patient Dice difference is a BCa bootstrap over those patients "
                 f"(scipy.stats.bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}; from "
                 f"{BOOTSTRAP_MIN_PATIENTS} patients on, and too narrow with few). With more than "
                 "two trainers the p-values are also given Holm-adjusted over the tested pairs of a split "
                 "(family-wise error rate; a pair without a test is not counted).")


def paired_wilcoxon(a: dict[str, float | None], b: dict[str, float | None]) -> dict:
    """WILCOXON_RULE on {patient: Dice} of trainers A and B: counts, mean / median difference, statistic, p-value."""
    patients = sorted(p for p in a if p in b and a[p] is not None and b[p] is not None)
    x = np.array([a[p] for p in patients], dtype=float)
    y = np.array([b[p] for p in patients], dtype=float)
    diff = x - y
    out = {"n_patients": len(patients), "n_patients_left_out": len(set(a) | set(b)) - len(patients),
           "n_nonzero_differences": int(np.count_nonzero(diff)),
           "mean_difference": float(diff.mean()) if len(patients) else None,
           "median_difference": float(np.median(diff)) if len(patients) else None,
           "mean_difference_ci95": mean_difference_ci(diff), "statistic": None, "pvalue": None}
    if len(patients) < 2:
        out["note"] = f"not tested: {len(patients)} patient(s) scored by both trainers (need at least 2)"
    elif not diff.any():
        out["note"] = "not tested: identical per-patient Dice for every patient"
    else:
        result = wilcoxon(x, y)
        out.update(statistic=float(result.statistic), pvalue=float(result.pvalue),
                   note="two-sided; zero differences dropped (zero_method='wilcox')")
    return out


def mean_difference_ci(diff: np.ndarray, confidence: float = 0.95) -> list[float] | None:
    """[low, high] BCa bootstrap interval of the mean of the paired differences ``diff`` (one per patient; resampling
    patients); None for fewer than BOOTSTRAP_MIN_PATIENTS, [d, d] when every difference is d."""
    if len(diff) < BOOTSTRAP_MIN_PATIENTS:
        return None
    if np.ptp(diff) == 0:
        return [float(diff[0])] * 2
    result = bootstrap((diff,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=confidence,
                       method="BCa", rng=np.random.default_rng(BOOTSTRAP_SEED))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def holm_adjusted(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of ``pvalues`` (None: not tested, not counted): the k-th smallest of m becomes
    max over j <= k of min(1, (m - j + 1) * p_(j))."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted
