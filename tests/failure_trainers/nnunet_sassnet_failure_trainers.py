"""A trainer for tests/test_unlabeled_failures.py: the smoke schedule, a checkpoint every epoch, and hooks.

nnU-Net finds it through ``nnUNet_extTrainer``. The hooks do not change what is trained; they let a test start
runs together, stop one at a chosen iteration (to change files or kill it there) and read where a run started:

* ``SASSNET_TEST_DIR``: folder for the marker files below (the hooks are off without it);
* ``SASSNET_TEST_START_TOGETHER=N``: each run waits before it prepares its data until N runs are ready, so that
  they reach the unlabeled data at the same moment (imports take each process a different time);
* ``SASSNET_TEST_PAUSE_AT=1,4``: before these training iterations, write ``paused_<fold>_<it>`` and wait for
  ``resume_<fold>_<it>``;
* ``SASSNET_TEST_SKIP_VALIDATION=1``: no final validation (it predicts with worker processes; a test that only
  needs the run to finish saves their start-up).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from nnunet_sassnet.variants import nnUNetTrainerSASSNet_smoke

WAIT_S = 600


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"failure test trainer: gave up waiting for {what}")
        time.sleep(0.02)


class nnUNetTrainerSASSNet_failures(nnUNetTrainerSASSNet_smoke):
    """SASSNet, 2 epochs of 3 steps, ``checkpoint_latest.pth`` after every epoch, a small discriminator, one
    torch thread."""

    discriminator_features = 16

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1  # nnU-Net's default (50) would leave nothing to continue from
        # nnUNetv2_train -device cpu gives torch one thread per core; several runs at once would fight over them
        torch.set_num_threads(1)
        self.test_dir = os.environ.get("SASSNET_TEST_DIR")

    def get_dataloaders(self):
        together = int(os.environ.get("SASSNET_TEST_START_TOGETHER", "0"))
        if self.test_dir and together:
            Path(self.test_dir, f"ready_{self.fold}").touch()
            _wait_for(lambda: len(list(Path(self.test_dir).glob("ready_*"))) >= together, f"{together} runs")
        return super().get_dataloaders()

    def on_train_start(self):
        super().on_train_start()
        # what --c restored: the iteration (beta's position) and the discriminator optimizer's step count
        steps = [int(s["step"]) for s in self.discriminator_optimizer.state_dict()["state"].values()]
        self.print_to_log_file(f"failure test: starts at iteration {self.current_iteration}, discriminator steps "
                               f"{max(steps, default=0)}, unlabeled folder {self.unlabeled_preprocessed_folder}")

    def train_step(self, batch: dict) -> dict:
        pauses = os.environ.get("SASSNET_TEST_PAUSE_AT", "").split(",")
        if self.test_dir and str(self.current_iteration) in pauses:
            name = f"{self.fold}_{self.current_iteration}"
            Path(self.test_dir, f"paused_{name}").touch()
            _wait_for(lambda: Path(self.test_dir, f"resume_{name}").exists(), f"resume_{name}")
        return super().train_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("SASSNET_TEST_SKIP_VALIDATION") != "1":
            super().perform_actual_validation(save_probabilities)
