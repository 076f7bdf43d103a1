"""The demo's trainers: SASSNet sized for a CPU, with the demo's schedules from :mod:`.config`.

nnU-Net finds them through ``nnunet_sassnet_trainers_demo.py`` in the package's trainer folder (see
:mod:`nnunet_sassnet.discovery`); nothing outside the demo imports this module.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring)

from nnunet_sassnet.demo.config import QUICK_SCHEDULE, SCHEDULE
from nnunet_sassnet.trainers import nnUNetTrainerSASSNet

__all__ = ["nnUNetTrainerSASSNetCPU", "nnUNetTrainerSASSNet_demo", "nnUNetTrainerSASSNet_demo_quick"]


class nnUNetTrainerSASSNetCPU(nnUNetTrainerSASSNet, nnUNetTrainerNoMirroring):
    """SASSNet for CPU runs such as the demo: a narrower discriminator, and no mirroring.

    On tiny CPU plans the published discriminator (64 first-layer features) costs more than the U-Net itself;
    with 16 it takes about a tenth of a step. Mirroring is off as in nnU-Net's ``nnUNetTrainerNoMirroring``
    because its test-time part runs every 3D prediction 8 times, which on a CPU takes minutes.
    """

    discriminator_features = 16
    #: torch threads on the CPU (nnUNetv2_train -device cpu sets one per core before it makes the trainer). One:
    #: on small patches two threads wait for each other after every operation, and beside any other busy
    #: process each wait costs a scheduler delay (benchmarks/demo_threads.py, README "The demo")
    cpu_threads: int | None = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.device.type == "cpu" and self.cpu_threads is not None:
            torch.set_num_threads(self.cpu_threads)


class nnUNetTrainerSASSNet_demo(nnUNetTrainerSASSNetCPU):
    """The demo's training: :data:`.config.SCHEDULE` (400 steps)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for key, value in SCHEDULE.items():  # nnU-Net assigns its schedule in __init__: set it afterwards
            setattr(self, key, value)


class nnUNetTrainerSASSNet_demo_quick(nnUNetTrainerSASSNetCPU):
    """The demo's ``--quick`` training: :data:`.config.QUICK_SCHEDULE` (a few steps; the model does not learn)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for key, value in QUICK_SCHEDULE.items():
            setattr(self, key, value)
