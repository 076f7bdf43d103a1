"""Entry point for nnU-Net's external trainer lookup (``nnUNet_extTrainer``).

nnU-Net imports every module of that folder as a top-level module and forgets it afterwards, so this file
only re-exports the package's trainers (absolute imports, no second copy of any class).
"""
from nnunet_sassnet.trainers import nnUNetTrainerSASSNet, nnUNetTrainerSDM  # noqa: F401
from nnunet_sassnet.variants import *  # noqa: F401,F403
