"""Evaluation of nnU-Net label predictions: CIPA-protocol and patient-level metrics (``metrics``) and the
trainer comparison report (``compare``)."""
