"""This package's trainers for nnU-Net's external trainer lookup (``nnUNet_extTrainer``).

nnU-Net imports the modules of this folder as top-level modules, in name order, until one has the requested
class, and forgets them afterwards; so this file only re-exports (absolute imports, no second copy of any
class). The demo's trainers are in ``nnunet_sassnet_trainers_demo.py``, which sorts after this file: looking
up one of the trainers below never imports the demo.
"""
from nnunet_sassnet.trainers import nnUNetTrainerAugmentOnDevice, nnUNetTrainerSASSNet, nnUNetTrainerSDM  # noqa: F401
from nnunet_sassnet.variants import *  # noqa: F401,F403
from nnunet_sassnet.trainers import (nnUNetTrainerBCP, nnUNetTrainerDTC, nnUNetTrainerDTCSASSNet,  # noqa: F401
                                     nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacherTwoView)
