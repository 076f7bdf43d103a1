"""The published balance between the supervised loss and the unlabeled term, as a mixin for this package's trainers.

nnU-Net's supervised loss is Dice + CE (weights 1 and 1) on every deep-supervision output. The published
semi-supervised codes train a V-Net with one output and a smaller supervised loss: UA-MT's mean teacher and BCP
use (Dice + CE) / 2, DTC Dice alone. Their unlabeled terms (mean teacher, DTC) act on the one output, so at the
published weights they weigh more against the supervised loss there than here. A trainer that mixes in
:class:`PublishedLossBalance` trains with the published balance: nnU-Net's Dice and CE (its own formulations)
with the published weights, on the full-resolution output only (nnU-Net's own deep-supervision switch, which
also drops the lower-resolution targets).
"""
from __future__ import annotations

import torch

__all__ = ["PublishedLossBalance"]


class PublishedLossBalance:
    """Mixin for nnU-Net trainers: the supervised segmentation loss of the published code (see the module)."""

    #: weight of the cross-entropy (regions: BCE) term of the supervised loss (nnU-Net: 1; UA-MT, BCP: 0.5; DTC: 0)
    supervised_ce_weight: float = 0.5
    #: weight of the Dice term of the supervised loss (nnU-Net: 1; UA-MT, BCP: 0.5; DTC: 1)
    supervised_dice_weight: float = 0.5
    #: deep supervision (nnU-Net: yes; the published V-Nets have one output)
    supervised_deep_supervision: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = self.supervised_deep_supervision

    def _build_loss(self):
        loss = super()._build_loss()
        inner = loss.loss if hasattr(loss, "weight_factors") else loss  # under nnU-Net's DeepSupervisionWrapper
        inner.weight_ce = self.supervised_ce_weight
        inner.weight_dice = self.supervised_dice_weight
        return loss
