"""The demo's choices: data set sizes, CPU plans and training schedules, sized for a 2-core laptop.

Targets: the whole demo in at most 5 minutes on two idle CPU cores (including nnU-Net's start-up) and at most
twice that beside one other busy process, at most 4 GB of memory summed over its processes, and a mean Dice of
at least 0.90 on its own test scans (docs/demo.md has what was measured). This module imports nothing heavy:
nnU-Net's trainer lookup imports it with :mod:`nnunet_sassnet.demo.trainers`, which holds the demo trainers.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticLAConfig:
    """Sizes of a synthetic data set (:mod:`nnunet_sassnet.demo.synthetic_la` draws it)."""

    num_labeled: int = 10
    num_unlabeled: int = 20
    num_test: int = 6
    #: voxels (x, y, z) of a scan; each scan varies by up to ``shape_jitter`` voxels per axis
    shape: tuple[int, int, int] = (56, 56, 40)
    shape_jitter: int = 4
    #: isotropic voxel size in mm (the LA crops of UA-MT are isotropic too, at 0.625 mm)
    spacing_mm: float = 1.5


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

#: the CPU plans (axes z, y, x): 48 x 60 x 60 mm patches, which show an atrium with enough of its neighbours to
#: tell it from the right atrium (with 48 mm, 32^3 voxels, the right atrium was often segmented too; more steps,
#: more features or a larger batch helped less than the wider patch), and a 3-stage U-Net with 8, 16 and 32
#: features and two convolutions per stage (one per stage, even with a fourth stage, lost Dice; docs/demo.md)
PATCH_SIZE = (32, 40, 40)
FEATURES_PER_STAGE = (8, 16, 32)
CONVOLUTIONS_PER_STAGE = 2
BATCH_SIZE = 2

#: 320 SASSNet steps (2 labeled + 1 unlabeled patch each, see demo.trainers); few long epochs, because each
#: epoch ends with validation and possibly a checkpoint
SCHEDULE = dict(num_epochs=8, num_iterations_per_epoch=40, num_val_iterations_per_epoch=4)
#: the same code path in a few seconds of training (the demo's end-to-end test); the model does not learn
QUICK_SCHEDULE = dict(num_epochs=2, num_iterations_per_epoch=4, num_val_iterations_per_epoch=2)

TRAINER = "nnUNetTrainerSASSNet_demo"
QUICK_TRAINER = "nnUNetTrainerSASSNet_demo_quick"
FOLD = "0"
