"""Trainers for tests/test_cascade.py (nnU-Net finds them through ``nnUNet_extTrainer``): a plain nnU-Net
``3d_lowres`` stage of one short epoch, and SASSNet's smoke trainer as the cascade's second stage on top of it."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sassnet.variants import nnUNetTrainerSASSNet_smoke


class nnUNetTrainer_lowres_smoke(nnUNetTrainer):
    """nnU-Net's own trainer for one epoch of three steps."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1


class nnUNetTrainerSASSNet_cascade_smoke(nnUNetTrainerSASSNet_smoke):
    """SASSNet (one epoch of three steps, a small discriminator) whose previous stage is the plain lowres model."""

    previous_stage_trainer = "nnUNetTrainer_lowres_smoke"
    discriminator_features = 16

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        """No final validation (nnU-Net's own code, unchanged; its export processes cost the test seconds)."""
