"""Case names: PCLT20K names a slice ``<patient>_<slice>``, and nnU-Net keeps that name as the case identifier."""

from __future__ import annotations

PATIENT_SEP = "_"


def patient_of(case_id: str, sep: str = PATIENT_SEP) -> str:
    """Patient ID of a case: the part of ``case_id`` before the first ``sep`` (the official CIPA loader's rule)."""
    return case_id.split(sep, 1)[0]
