"""Where nnU-Net finds this package's trainers: ``export nnUNet_extTrainer=$(nnunet_sassnet_trainer_dir)``."""
from __future__ import annotations

import os
import sys
from typing import Sequence


def trainer_dir() -> str:
    """The folder to put in ``nnUNet_extTrainer`` so that nnUNetv2_train/predict find our trainers."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers_shim")


def trainer_dir_entry(argv: Sequence[str] | None = None) -> int:
    """``nnunet_sassnet_trainer_dir``: print :func:`trainer_dir`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: nnunet_sassnet_trainer_dir\n\nPrints the folder that holds nnunet-sassnet's trainers for "
              "nnU-Net: export nnUNet_extTrainer=$(nnunet_sassnet_trainer_dir)")
        return 0
    print(trainer_dir())
    return 0
