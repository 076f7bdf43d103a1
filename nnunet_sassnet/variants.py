"""Ready-made trainer variants, one explicit class each, as nnU-Net's own ``variants/``.

Settings that are class attributes of the trainers are set as class attributes; nnU-Net's schedule
(``num_epochs``, ``num_iterations_per_epoch``, ...) is assigned in nnU-Net's ``__init__``, so the schedule
variants set it after ``super().__init__``. The demo's CPU trainers are in :mod:`nnunet_sassnet.demo.trainers`.
"""
from __future__ import annotations

import torch

from nnunet_sassnet.trainers import (nnUNetTrainerDTC, nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacherTwoView,
                                     nnUNetTrainerSASSNet, nnUNetTrainerSDM)
from nnunet_sassnet.trainers.published_loss import PublishedLossBalance

__all__ = ["nnUNetTrainerSASSNetPaper", "nnUNetTrainerSASSNetBeta005", "nnUNetTrainerSASSNetBeta015",
           "nnUNetTrainerSASSNetHalfResD", "nnUNetTrainerMeanTeacherW1", "nnUNetTrainerDTCW10",
           "nnUNetTrainerMeanTeacherTwoViewPublishedBalance", "nnUNetTrainerDTCPublishedBalance",
           "nnUNetTrainerSDM_smoke", "nnUNetTrainerSASSNet_smoke"]


# ---- the adversarial weight beta_max --------------------------------------------------------------------------
class nnUNetTrainerSASSNetPaper(nnUNetTrainerSASSNet):
    """SASSNet with beta_max = 0.001, the value in the paper's text (the published code uses 0.01 / 0.015)."""

    adversarial_weight_max = 0.001


class nnUNetTrainerSASSNetBeta005(nnUNetTrainerSASSNet):
    """SASSNet with beta_max = 0.05: a stronger shape constraint, for a sweep over beta_max."""

    adversarial_weight_max = 0.05


class nnUNetTrainerSASSNetBeta015(nnUNetTrainerSASSNet):
    """SASSNet with beta_max = 0.15: ten times the published code's 0.015, the upper end of a sweep."""

    adversarial_weight_max = 0.15


# ---- the discriminator's cost -----------------------------------------------------------------------------------
class nnUNetTrainerSASSNetHalfResD(nnUNetTrainerSASSNet):
    """SASSNet with the discriminator at half resolution (``discriminator_downsampled``): a cheaper step, to
    become the default only if the LA runs show no loss of Dice."""

    discriminator_downsampled = True


# ---- stronger unlabeled terms -----------------------------------------------------------------------------------
# At the published weights, mean teacher's and DTC's weighted gradient on the network was 1-3 % of the supervised
# one at the end of the LA runs (BCP's: 45-80 %): ten times the weight asks whether the terms help once they act.
class nnUNetTrainerMeanTeacherW1(nnUNetTrainerMeanTeacher):
    """Mean teacher with a consistency weight of 1.0, ten times UA-MT's and SSL4MIS's 0.1."""

    unlabeled_weight_max = 1.0


class nnUNetTrainerDTCW10(nnUNetTrainerDTC):
    """Dual-task consistency with lambda_max 10, ten times the published code's 1.0."""

    dtc_weight_max = 10.0


# ---- the published balance of supervised loss and unlabeled term ---------------------------------------------------
class nnUNetTrainerMeanTeacherTwoViewPublishedBalance(PublishedLossBalance, nnUNetTrainerMeanTeacherTwoView):
    """Two-view mean teacher with UA-MT's supervised loss: (Dice + CE) / 2 on the full-resolution output, no SDM
    term."""

    supervised_ce_weight = 0.5
    supervised_dice_weight = 0.5
    sdm_loss_weight = 0.0


class nnUNetTrainerDTCPublishedBalance(PublishedLossBalance, nnUNetTrainerDTC):
    """Dual-task consistency with DTC's supervised loss: Dice alone (+ 0.3 x SDM MSE) on the full-resolution
    output."""

    supervised_ce_weight = 0.0
    supervised_dice_weight = 1.0


# ---- smoke tests: a few tiny epochs -----------------------------------------------------------------------------
def _smoke_schedule(trainer) -> None:
    """Two epochs of three steps: for the tests and a first check that a dataset trains at all."""
    trainer.num_epochs = 2
    trainer.num_iterations_per_epoch = 3
    trainer.num_val_iterations_per_epoch = 2


class nnUNetTrainerSDM_smoke(nnUNetTrainerSDM):
    """:class:`~nnunet_sassnet.trainers.nnUNetTrainerSDM` for 2 epochs of 3 steps (tests, first checks)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _smoke_schedule(self)


class nnUNetTrainerSASSNet_smoke(nnUNetTrainerSASSNet):
    """:class:`~nnunet_sassnet.trainers.nnUNetTrainerSASSNet` for 2 epochs of 3 steps (tests, first checks)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _smoke_schedule(self)
