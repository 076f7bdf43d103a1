"""Ready-made trainer variants, made by :func:`~nnunet_sassnet.trainers.trainer_variant` (no copied classes).

``*_smoke``: a few tiny epochs, for tests and a first check that a dataset trains at all.
"""
from nnunet_sassnet.trainers import nnUNetTrainerSASSNet, nnUNetTrainerSDM, trainer_variant

_SMOKE = dict(num_epochs=2, num_iterations_per_epoch=3, num_val_iterations_per_epoch=2)

nnUNetTrainerSDM_smoke = trainer_variant(nnUNetTrainerSDM, "nnUNetTrainerSDM_smoke", __name__, **_SMOKE)
nnUNetTrainerSASSNet_smoke = trainer_variant(nnUNetTrainerSASSNet, "nnUNetTrainerSASSNet_smoke", __name__,
                                             **_SMOKE)

# CPU variants (the demo's); the schedules and the reasons for them are in nnunet_sassnet.demo.config
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (  # noqa: E402
    nnUNetTrainerNoMirroring)

from nnunet_sassnet.demo.config import QUICK_SCHEDULE as _DEMO_QUICK, SCHEDULE as _DEMO  # noqa: E402


class nnUNetTrainerSASSNetCPU(nnUNetTrainerSASSNet, nnUNetTrainerNoMirroring):
    """SASSNet for CPU runs such as the demo: a narrower discriminator, and no mirroring.

    On tiny CPU plans the published discriminator (64 first-layer features) costs more than the U-Net itself;
    with 16 it takes about a tenth of a step. Mirroring is off as in nnU-Net's ``nnUNetTrainerNoMirroring``
    because its test-time part runs every 3D prediction 8 times, which on a CPU takes minutes.
    """

    discriminator_features = 16


nnUNetTrainerSASSNet_demo = trainer_variant(nnUNetTrainerSASSNetCPU, "nnUNetTrainerSASSNet_demo", __name__, **_DEMO)
nnUNetTrainerSASSNet_demo_quick = trainer_variant(nnUNetTrainerSASSNetCPU, "nnUNetTrainerSASSNet_demo_quick",
                                                  __name__, **_DEMO_QUICK)

__all__ = ["nnUNetTrainerSDM_smoke", "nnUNetTrainerSASSNet_smoke", "nnUNetTrainerSASSNetCPU",
           "nnUNetTrainerSASSNet_demo", "nnUNetTrainerSASSNet_demo_quick"]
