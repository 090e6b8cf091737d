"""Case names: PCLT20K names a slice ``<patient>_<slice>``, and nnU-Net keeps that name as the case identifier; and
the shape of nnU-Net's splits_final.json, which groups them into folds."""

from __future__ import annotations

PATIENT_SEP = "_"


def patient_of(case_id: str, sep: str = PATIENT_SEP) -> str:
    """Patient ID of a case: the part of ``case_id`` before the first ``sep`` (the official CIPA loader's rule)."""
    return case_id.split(sep, 1)[0]


def is_nnunet_splits(content) -> bool:
    """Whether ``content`` (a parsed splits_final.json) is nnU-Net's list of folds {"train": [...], "val": [...]}
    of case names."""
    return isinstance(content, list) and all(
        isinstance(fold, dict) and all(isinstance(fold.get(part), list) and all(isinstance(c, str) for c in fold[part])
                                       for part in ("train", "val"))
        for fold in content)
