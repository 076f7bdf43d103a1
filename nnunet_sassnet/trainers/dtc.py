"""Dual-task consistency (DTC, Luo et al., AAAI 2021) inside nnU-Net: segmentation and SDM head must agree.

The SDM head that SASSNet trains predicts a signed distance map (negative inside the object, as DTC's
``compute_sdf``); a smooth Heaviside turns it into a soft mask, ``sigmoid(-k * sdm)`` (k = 1500 in the published
code), which must match the segmentation's probability of the same class (or region): ``MSE`` over every patch of
the step, labeled and unlabeled, weighted by the Gaussian ramp. No label is needed, so unlabeled patches teach
through the agreement of the two heads.

* :class:`nnUNetTrainerDTC`: supervised losses + DTC consistency.
* :class:`nnUNetTrainerDTCSASSNet`: SASSNet (with its discriminator) + DTC consistency.

Several classes: the softmax probability of class ``c`` against SDM channel ``c`` (one-vs-rest, as the SDM
targets); regions: the sigmoid of region ``r`` against SDM channel ``r``.
"""
from __future__ import annotations

import torch

from nnunet_sassnet.trainers.mean_teacher import full_resolution, probabilities
from nnunet_sassnet.trainers.sassnet import nnUNetTrainerSASSNet
from nnunet_sassnet.trainers.semisupervised import nnUNetTrainerSemiSupervised

__all__ = ["nnUNetTrainerDTC", "nnUNetTrainerDTCSASSNet", "DTCConsistency", "sdm_to_soft_mask",
           "dual_task_consistency"]


def sdm_to_soft_mask(sdm: torch.Tensor, k: float) -> torch.Tensor:
    """DTC's smooth Heaviside of a signed distance map (negative inside): ~1 inside, ~0 outside, 0.5 on the boundary."""
    return torch.sigmoid(-k * sdm)


def dual_task_consistency(seg_logits: torch.Tensor, sdm: torch.Tensor, channels: slice, has_regions: bool,
                          k: float) -> torch.Tensor:
    """``mean((sigmoid(-k * sdm_c) - p_c)^2)`` over the SDM channels ``channels`` and every voxel and patch.

    ``seg_logits`` (N, C, ...) are full-resolution logits; ``p`` is their softmax (labels) or sigmoid (regions),
    so channel ``c`` of both heads describes the same class or region.
    """
    probs = probabilities(seg_logits.float(), has_regions)[:, channels]
    return torch.mean((sdm_to_soft_mask(sdm[:, channels].float(), k) - probs) ** 2)


class DTCConsistency:
    """The DTC term's settings and value, shared by the two DTC trainers (a mixin for nnU-Net trainers)."""

    #: slope k of the smooth Heaviside sigmoid(-k * sdm) (published code: 1500)
    dtc_heaviside_k: float = 1500.0
    #: maximum weight of the DTC term, reached at the end by the Gaussian ramp (published code: 1.0)
    dtc_weight_max: float = 1.0
    #: whether labeled patches take part too (published code: yes, the whole batch)
    dtc_on_labeled_patches: bool = True

    def dtc_loss(self, seg_output, sdm_output: torch.Tensor, num_labeled: int) -> torch.Tensor:
        """The DTC consistency of the step's one forward (labeled patches first, ``num_labeled`` of them)."""
        first = 0 if self.dtc_on_labeled_patches else num_labeled
        return dual_task_consistency(full_resolution(seg_output)[first:], sdm_output[first:], self.sdm_channels,
                                     self.label_manager.has_regions, self.dtc_heaviside_k)


class nnUNetTrainerDTC(DTCConsistency, nnUNetTrainerSemiSupervised):
    """DTC: the supervised losses plus ``lambda(t) * MSE(sigmoid(-k * sdm), p)`` on labeled and unlabeled patches."""

    @property
    def unlabeled_weight_max(self) -> float:  # the generic name of the base class
        return self.dtc_weight_max

    def unlabeled_loss(self, seg_output, sdm_output, data, num_labeled):
        return self.dtc_loss(seg_output, sdm_output, num_labeled), {}


class nnUNetTrainerDTCSASSNet(DTCConsistency, nnUNetTrainerSASSNet):
    """SASSNet + DTC: ``beta(t) * (-log D(X_u, S_u)) + lambda(t) * DTC`` on top of the supervised losses.

    beta(t) and lambda(t) follow the same Gaussian ramp, so their ratio is the constant
    ``dtc_weight_max / adversarial_weight_max``: the unlabeled term is ``-log D + ratio * DTC``, weighted by beta(t)
    as in SASSNet (and logged as such).
    """

    extra_log_keys = nnUNetTrainerSASSNet.extra_log_keys + ("dtc_losses", "unlabeled_losses")
    step_to_log_keys = {**nnUNetTrainerSASSNet.step_to_log_keys, "gen_loss": "gen_losses",
                        "dtc_loss": "dtc_losses", "unlabeled_loss": "unlabeled_losses"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.adversarial_weight_max <= 0:
            raise ValueError(f"{self.__class__.__name__}: adversarial_weight_max must be > 0 (the DTC weight is "
                             f"expressed relative to it); for DTC alone use nnUNetTrainerDTC")

    def unlabeled_loss(self, seg_output, sdm_output, data, num_labeled):
        generator, _ = super().unlabeled_loss(seg_output, sdm_output, data, num_labeled)
        dtc = self.dtc_loss(seg_output, sdm_output, num_labeled)
        ratio = self.dtc_weight_max / self.adversarial_weight_max
        return generator + ratio * dtc, {"gen_loss": generator, "dtc_loss": dtc}
