"""Convert the LA 2018 data into an nnU-Net dataset: the dataset conversion script of this repository.

    python dataset_conversion/convert_la2018.py -i PATH -d 601 [-n LA2018] [--num-labeled 16]
                                                [--split uamt|none|FILE.json] [--spacing MM] [--overwrite]

The same as the installed command ``nnunet_sassnet_convert_la2018`` (see ``--help``); it needs the package
installed (``pip install -e .``).
"""
import sys

from nnunet_sassnet.conversion import main

if __name__ == "__main__":
    sys.exit(main())
