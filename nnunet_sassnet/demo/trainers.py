"""The demo's trainers: SASSNet sized for a CPU, with the demo's schedules from :mod:`.config`.

nnU-Net finds them through ``nnunet_sassnet_trainers_demo.py`` in the package's trainer folder (see
:mod:`nnunet_sassnet.discovery`); that lookup imports this module and :mod:`.config` only, not the demo's data
generator or pipeline.
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring)

from nnunet_sassnet.demo.config import QUICK_SCHEDULE, SCHEDULE
from nnunet_sassnet.nnunet_tools import usable_cores
from nnunet_sassnet.progress import SASSNetLocalLogger
from nnunet_sassnet.trainers import nnUNetTrainerSASSNet

# the trainers only: nnU-Net's lookup star-imports this list (ThreadTrials and SparseProgressLogger are helpers)
__all__ = ["nnUNetTrainerSASSNetCPU", "nnUNetTrainerSASSNet_demo", "nnUNetTrainerSASSNet_demo_quick"]


class ThreadTrials:
    """Chooses the torch thread count of each epoch by timing real training steps with every candidate.

    The steps ``first_trial_step``, ``first_trial_step + 1``, ... of an epoch cycle through ``choices``,
    ``trials_per_choice`` times each; the epoch's later steps use the count whose median step was fastest.
    Steps before the trials keep the previous epoch's choice (the first epoch: the smallest count). A trial of a
    count that turns out far slower than the fewest threads (``backoff_ratio``; beside a busy process two threads
    can take several times as long) is costly, so after such a result the next 1, then 2, then 4 epochs run on the
    fewest threads without trials.
    """

    def __init__(self, choices: Sequence[int], trials_per_choice: int, first_trial_step: int,
                 backoff_ratio: float = 1.5, max_epochs_skipped: int = 4):
        self.choices = sorted(set(int(c) for c in choices if c >= 1)) or [1]
        self.trials_per_choice = trials_per_choice
        self.first_trial_step = first_trial_step
        self.backoff_ratio = backoff_ratio
        self.max_epochs_skipped = max_epochs_skipped
        self.current = self.choices[0]
        self._times: dict[int, list[float]] = {}
        self._skip_next = 0  # epochs without trials still to come after a costly one
        self._skipping = 0  # the length of the last such pause
        self._trials_this_epoch = True

    @property
    def num_trial_steps(self) -> int:
        return len(self.choices) * self.trials_per_choice if len(self.choices) > 1 else 0

    def new_epoch(self) -> None:
        """Called at the start of every epoch: whether this one has trials."""
        self._trials_this_epoch = self._skip_next == 0
        self._skip_next = max(0, self._skip_next - 1)

    def _trial(self, step_in_epoch: int) -> int | None:
        trial = step_in_epoch - self.first_trial_step
        return trial if self._trials_this_epoch and 0 <= trial < self.num_trial_steps else None

    def threads_for(self, step_in_epoch: int) -> int:
        """The thread count for this step of the epoch."""
        trial = self._trial(step_in_epoch)
        return self.current if trial is None else self.choices[trial % len(self.choices)]

    def record(self, step_in_epoch: int, threads: int, seconds: float) -> str | None:
        """Note a step's time; after the epoch's last trial step, choose and return a line for the log."""
        trial = self._trial(step_in_epoch)
        if trial is None:
            return None
        if trial == 0:
            self._times = {}
        self._times.setdefault(threads, []).append(seconds)
        if trial < self.num_trial_steps - 1:
            return None
        medians = {n: statistics.median(t) for n, t in self._times.items()}
        self.current = min(medians, key=medians.get)
        # pause only on the fewest threads: that choice costs at most a second thread's gain if the machine gets
        # idle meanwhile, while more threads kept through a pause could cost several times that once it is busy
        if self.current == self.choices[0] and max(medians.values()) > self.backoff_ratio * medians[self.current]:
            self._skipping = min(max(1, 2 * self._skipping), self.max_epochs_skipped)
            self._skip_next = self._skipping
        else:
            self._skipping = self._skip_next = 0
        timed = ", ".join(f"{n}: {medians[n]:.2f} s" for n in sorted(medians))
        pause = f"; no trials in the next {self._skip_next} epoch(s)" if self._skip_next else ""
        return f"torch threads for this epoch: {self.current} (median step with {timed}{pause})"


class SparseProgressLogger(SASSNetLocalLogger):
    """SASSNet's logger drawing ``progress.png`` after every ``plot_every``-th epoch and after the last one only.

    nnU-Net draws the plot after every epoch; its panels are 3000 pixels wide, which costs seconds of CPU time: on
    a short CPU run, a noticeable share of the whole. ``last_epoch`` (0-based) is set once the schedule is known.
    """

    def __init__(self, extra_keys: Sequence[str], plot_every: int, verbose: bool = False):
        super().__init__(extra_keys, verbose)
        self.plot_every = max(1, plot_every)
        self.last_epoch: int | None = None

    def plot_progress_png(self, output_folder: str):
        epoch = len(self.my_fantastic_logging["epoch_end_timestamps"]) - 1
        if (epoch + 1) % self.plot_every == 0 or epoch == self.last_epoch:
            super().plot_progress_png(output_folder)


class nnUNetTrainerSASSNetCPU(nnUNetTrainerSASSNet, nnUNetTrainerNoMirroring):
    """SASSNet for CPU runs such as the demo: a narrower discriminator, one unlabeled patch per step, no mirroring,
    the faster thread count, and fewer progress plots.

    On tiny CPU plans the published discriminator (64 first-layer features) costs more than the U-Net itself;
    with 16 it takes about a tenth of a step. Mirroring is off as in nnU-Net's ``nnUNetTrainerNoMirroring``
    because its test-time part runs every 3D prediction 8 times, which on a CPU takes minutes.
    """

    discriminator_features = 16
    #: one unlabeled patch per step beside nnU-Net's two labeled ones: a step costs about a fifth less, and on the
    #: demo's data the Dice after the same steps did not drop (docs/demo.md)
    unlabeled_batch_size = 1
    #: the gradient ratio (two extra backward passes per probed step) on one step per epoch
    gradient_probe_steps_per_epoch = 1
    #: torch thread counts to choose from on the CPU, capped at the usable cores and at OMP_NUM_THREADS where set.
    #: On small patches, two threads on two idle cores make a step faster, but beside any other busy process
    #: every operation waits for the thread that is not running and one thread is faster
    #: (benchmarks/demo_threads.py, docs/demo.md); so every epoch times both (:class:`ThreadTrials`)
    cpu_thread_choices: tuple[int, ...] = (1, 2)
    #: timed steps per thread count and epoch (the counts differ by far more than a step's noise: 1.6x one way
    #: on an idle machine, 2x or more the other way beside a busy process)
    thread_trials_per_choice: int = 1
    #: progress.png after every this many epochs, and after the last (:class:`SparseProgressLogger`)
    progress_plot_every: int = 4

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnUNetv2_train -device cpu has set one thread per core; the base class has lowered it to OMP_NUM_THREADS
        limit = min(usable_cores(), torch.get_num_threads())
        # the gradient probe's steps (the first ones of every epoch) are slower: the trials come after them
        self.thread_trials = ThreadTrials([n for n in self.cpu_thread_choices if n <= limit],
                                          self.thread_trials_per_choice, self.gradient_probe_steps_per_epoch)
        if self.device.type == "cpu":
            torch.set_num_threads(self.thread_trials.current)
        self.logger.local_logger = SparseProgressLogger(self.extra_log_keys, self.progress_plot_every)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.thread_trials.new_epoch()

    def on_train_start(self):
        super().on_train_start()
        # the schedule is final now (the demo's trainers set it after __init__); epochs count from 0
        self.logger.local_logger.last_epoch = self.num_epochs - 1

    def train_step(self, batch: dict) -> dict:
        if self.device.type != "cpu":
            return super().train_step(batch)
        step = self.current_iteration % self.num_iterations_per_epoch
        threads = self.thread_trials.threads_for(step)
        torch.set_num_threads(threads)
        start = time.perf_counter()
        result = super().train_step(batch)
        message = self.thread_trials.record(step, threads, time.perf_counter() - start)
        if message is not None:
            self.print_to_log_file(message)
        torch.set_num_threads(self.thread_trials.threads_for(step + 1))
        return result


class nnUNetTrainerSASSNet_demo(nnUNetTrainerSASSNetCPU):
    """The demo's training: :data:`.config.SCHEDULE`."""

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
