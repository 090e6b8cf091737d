"""PCLT20K -> nnU-Net v2 raw dataset, in nnU-Net's dataset_conversion layout. The converter lives in the package
(``nnunetv2_cipa.conversion``); this script is ``nnunetv2_cipa convert`` with the same arguments:

    python dataset_conversion/pclt20k.py /data/PCLT20K -d 501 -np 8
"""

import sys

from nnunetv2_cipa.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
