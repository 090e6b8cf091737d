"""Case names: PCLT20K names a slice ``<patient>_<slice>``, and nnU-Net keeps that name as the case identifier; and
the shape of nnU-Net's splits_final.json, which groups them into folds."""

from __future__ import annotations

PATIENT_SEP = "_"


def patient_of(case_id: str, sep: str = PATIENT_SEP) -> str:
    """Patient ID of a case: the part of ``case_id`` before the first ``sep`` (the official CIPA loader's rule)."""
    return case_id.split(sep, 1)[0]


def patient_separator_warnings(case_ids, sep: str = PATIENT_SEP) -> list[str]:
    """A warning when ``sep`` occurs in none of several ``case_ids``: every slice would then be its own patient
    (per-patient statistics silently per slice); none otherwise."""
    case_ids = list(case_ids)
    if len(case_ids) < 2 or any(sep in case for case in case_ids):
        return []
    return [f"the patient separator {sep!r} occurs in no case name (e.g. {case_ids[0]!r}): every slice counts as its "
            "own patient, so the per-patient statistics are per slice; pass --patient-sep with the character that "
            "follows the patient ID"]


def is_nnunet_splits(content) -> bool:
    """Whether ``content`` (a parsed splits_final.json) is nnU-Net's list of folds {"train": [...], "val": [...]}
    of case names."""
    return isinstance(content, list) and all(
        isinstance(fold, dict) and all(isinstance(fold.get(part), list) and all(isinstance(c, str) for c in fold[part])
                                       for part in ("train", "val"))
        for fold in content)
