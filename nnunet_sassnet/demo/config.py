"""The demo's choices: data set sizes, CPU plans and training schedules, sized for a 2-core laptop.

Targets: the whole demo in at most 10 minutes on two CPU cores (including nnU-Net's start-up; other work on
the machine slows it down, so it aims at less), at most 4 GB of memory summed over its processes, and a mean
Dice of at least 0.70 on its own test scans. This module imports nothing heavy:
:mod:`nnunet_sassnet.demo.trainers` holds the demo trainers, with the schedules below.
"""
from __future__ import annotations

from nnunet_sassnet.demo.synthetic_la import SyntheticLAConfig

DATASET_ID = 900
DATASET_NAME = "SyntheticLA"
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlansSmall"

#: 10 labeled scans (nnU-Net's fold 0 trains on 8 and validates on 2), twice as many unlabeled, 6 for testing;
#: 84 x 84 x 60 mm crops around the heart at 1.5 mm, coarser than the LA data's 0.625 mm to keep the CPU work small
DATA = SyntheticLAConfig(num_labeled=10, num_unlabeled=20, num_test=6, shape=(56, 56, 40), shape_jitter=4,
                         spacing_mm=1.5)
#: ``--quick``: the fewest scans every stage takes (nnU-Net's 5-fold split needs 5 labeled ones); the model does
#: not learn in a quick run, so more scans would only cost time
QUICK_DATA = SyntheticLAConfig(num_labeled=5, num_unlabeled=4, num_test=2, shape=(56, 56, 40), shape_jitter=4,
                               spacing_mm=1.5)

#: the CPU plans: a 3-stage U-Net on 32^3 patches (48 mm: an atrium and enough of its neighbours to tell them
#: apart)
PATCH_SIZE = (32, 32, 32)
FEATURES_PER_STAGE = (16, 32, 64)
BATCH_SIZE = 2

#: 400 SASSNet steps (4 patches each: 2 labeled, 2 unlabeled), about 2.5 minutes on two idle cores, the demo
#: about 3.5; few long epochs, because each epoch ends with validation, a plot and possibly a checkpoint
SCHEDULE = dict(num_epochs=16, num_iterations_per_epoch=25, num_val_iterations_per_epoch=4)
#: the same code path in a few seconds of training (the demo's end-to-end test); the model does not learn
QUICK_SCHEDULE = dict(num_epochs=2, num_iterations_per_epoch=4, num_val_iterations_per_epoch=2)

TRAINER = "nnUNetTrainerSASSNet_demo"
QUICK_TRAINER = "nnUNetTrainerSASSNet_demo_quick"
FOLD = "0"
