"""PCLT20K (or the same layout) -> nnU-Net raw dataset: ``pclt20k.convert_pclt20k`` reads the tree (``source``),
checks and writes each slice (``slices``), and publishes the dataset exclusively and crash-safely (``staging``).

The choices of the converter's policies live here, where the CLI can read them without loading the converter."""

BIT_DEPTH_POLICIES = ("shift", "refuse")  # 16-bit CT / PET: one right shift per modality, or refuse values > 255
VAL_LIST_POLICIES = ("refuse", "merge")   # a val.txt: refuse it, or merge its slices into training
