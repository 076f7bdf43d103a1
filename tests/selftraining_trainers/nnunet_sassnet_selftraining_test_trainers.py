"""A trainer for tests/test_selftraining.py: nnU-Net's trainer for one epoch of two steps, and kill points.

nnU-Net finds it through ``nnUNet_extTrainer``. The hooks change nothing that is trained; they let the test stop
``nnunet_sassnet_selftrain`` with SIGKILL (the command and its process group, as a job scheduler stops a job)
at a chosen point:

* ``SELFTRAIN_TEST_KILL=train:DatasetXXX_Name``: at the first training step of a training on that dataset;
* ``SELFTRAIN_TEST_KILL=predict:FOLDER``: at a forward pass of nnU-Net's predictor once FOLDER holds a
  prediction (``*.nii.gz``), that is, while it predicts the second case;
* ``SELFTRAIN_TEST_VALIDATE=DatasetXXX_Name``: nnU-Net's final validation runs for trainings on that dataset
  only (it starts a worker pool: seconds the other tests need not spend).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sassnet.nnunet_tools import cap_torch_threads


def _kill_point() -> tuple[str, str]:
    kind, _, where = os.environ.get("SELFTRAIN_TEST_KILL", "").partition(":")
    return kind, where


def _kill_job() -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _kill_while_predicting(module: torch.nn.Module, args) -> None:
    kind, folder = _kill_point()
    if kind == "predict" and not module.training and any(Path(folder).glob("*.nii.gz")):
        _kill_job()


class nnUNetTrainer_selftrain_test(nnUNetTrainer):
    """nnU-Net's trainer, one epoch of two steps and one validation step, one torch thread per OMP_NUM_THREADS."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        cap_torch_threads()

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        cap_torch_threads()  # nnU-Net's predictor calls no other hook
        network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        network.register_forward_pre_hook(_kill_while_predicting)
        return network

    def train_step(self, batch: dict) -> dict:
        kind, dataset = _kill_point()
        if kind == "train" and dataset == self.plans_manager.dataset_name:
            _kill_job()
        return super().train_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if os.environ.get("SELFTRAIN_TEST_VALIDATE") == self.plans_manager.dataset_name:
            super().perform_actual_validation(save_probabilities)
