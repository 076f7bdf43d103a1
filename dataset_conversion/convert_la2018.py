"""Convert the LA 2018 data into an nnU-Net dataset from a checkout, without installing the package.

    python dataset_conversion/convert_la2018.py -i PATH -d 601 [-n LA2018] [--num-labeled 16]
                                                [--split uamt|none|FILE.json] [--spacing MM] [--overwrite]

The same as the installed command ``nnunet_sassnet_convert_la2018`` (see ``--help``).
"""
import sys
from pathlib import Path

# run from a checkout: make the repository's package importable without `pip install`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnunet_sassnet.conversion import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
