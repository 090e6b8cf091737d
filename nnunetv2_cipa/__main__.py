"""``python -m nnunetv2_cipa``: the ``nnunetv2_cipa`` console script."""

import sys

from nnunetv2_cipa.cli import main

sys.exit(main())
