"""Ready-made trainer variants, made by :func:`~nnunet_sassnet.trainers.trainer_variant` (no copied classes).

``*_smoke``: a few tiny epochs, for tests and a first check that a dataset trains at all.
"""
from nnunet_sassnet.trainers import nnUNetTrainerSASSNet, nnUNetTrainerSDM, trainer_variant

_SMOKE = dict(num_epochs=2, num_iterations_per_epoch=3, num_val_iterations_per_epoch=2)

nnUNetTrainerSDM_smoke = trainer_variant(nnUNetTrainerSDM, "nnUNetTrainerSDM_smoke", __name__, **_SMOKE)
nnUNetTrainerSASSNet_smoke = trainer_variant(nnUNetTrainerSASSNet, "nnUNetTrainerSASSNet_smoke", __name__,
                                             **_SMOKE)

__all__ = ["nnUNetTrainerSDM_smoke", "nnUNetTrainerSASSNet_smoke"]
