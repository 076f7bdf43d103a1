"""``nnunet_sassnet_preprocess_unlabeled``: the command line of the unlabeled preprocessing."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from nnunet_sassnet.errors import run_cli
from nnunet_sassnet.unlabeled.preprocessing import preprocess_unlabeled

__all__ = ["preprocess_unlabeled_entry"]


def preprocess_unlabeled_entry(argv: Sequence[str] | None = None) -> int:
    """``nnunet_sassnet_preprocess_unlabeled``: preprocess imagesUnlabeled with the dataset's plans."""
    parser = argparse.ArgumentParser(
        prog="nnunet_sassnet_preprocess_unlabeled",
        description="Preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with the dataset's plans into "
                    "nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled (for nnUNetTrainerSASSNet).")
    parser.add_argument("-d", required=True, help="dataset ID or name")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default: 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", type=int, default=4, help="number of processes (default: 4)")
    parser.add_argument("--force", action="store_true", help="preprocess again even if the data is current")
    args = parser.parse_args(argv)
    return run_cli(lambda: (preprocess_unlabeled(args.d, args.c, args.p, args.np, force=args.force), 0)[1])


if __name__ == "__main__":
    sys.exit(preprocess_unlabeled_entry())
