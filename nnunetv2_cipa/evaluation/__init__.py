"""Evaluation of nnU-Net label predictions, from files nnU-Net wrote: CIPA-protocol and patient-level metrics
(``metrics``), paired statistics (``statistics``), model costs from checkpoints (``costs``), and the trainer comparison
report (``compare``, ``report``, ``figures``)."""
