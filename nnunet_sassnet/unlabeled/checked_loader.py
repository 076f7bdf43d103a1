"""nnU-Net's data loader and augmenters for the unlabeled patch stream, with two additions, each one overridden hook.

* The loader checks a case against its stamp file's SHA-256 each time it samples it, just before nnU-Net reads it
  (damage written after a first read is found as well; blosc2 decodes a garbled file without an error) and leaves
  a damaged or unreadable case out of the run, named in the training log and noted for repair
  (see :mod:`~nnunet_sassnet.unlabeled.integrity`): one bad file neither reaches the network nor kills nnU-Net's
  worker processes ("background workers are no longer alive").
* The augmenter stops the run with one line when the version it reads is deleted (by hand: nnunet_sassnet keeps a
  version as long as a run leases it).

Module-level classes: nnU-Net's augmenter pickles the loader for its worker processes where they are spawned.
"""
from __future__ import annotations

import os
import time
from datetime import datetime

import numpy as np
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.unlabeled.integrity import check_case, load_records, note_damaged

__all__ = ["UnlabeledDataset", "CheckedDataLoader", "UnlabeledAugmenter", "UnlabeledSingleThreadedAugmenter"]


def _log(log_file: str | None, message: str) -> None:
    """A line in nnU-Net's training log (as ``print_to_log_file`` writes it) and on the console; callable in the
    augmentation processes, which have no trainer."""
    line = f"{datetime.now()}: {message}"
    if log_file is not None:
        with open(log_file, "a+") as f:
            f.write(line + "\n")
    print(line, flush=True)


def _version_gone(folder: str) -> UserInputError:
    return UserInputError(
        f"{folder}: the unlabeled data this run reads was deleted while it trained (nnunet_sassnet keeps a version "
        f"as long as a run leases it: it was deleted by hand); continue the run with nnUNetv2_train ... --c, which "
        f"preprocesses the unlabeled data again")


def _deleted_soon(folder: str, within_s: float = 2.0) -> bool:
    """Whether ``folder`` is gone, or goes within ``within_s`` seconds: a deletion (``rm -r``) removes the files
    before their folder, so a read that failed on a vanished file may still see the folder for a moment."""
    deadline = time.monotonic() + within_s
    while os.path.isdir(folder):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class UnlabeledDataset(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset; once its version is deleted, a stand-in that is never trained on (see
    :class:`_StopsWhenVersionGone`) instead of an error that would kill the augmentation process."""

    _channels = 1

    def load_case(self, identifier):
        try:
            data, seg, seg_prev, properties = super().load_case(identifier)
        except Exception:
            if not _deleted_soon(self.source_folder):
                raise
            return (np.zeros((self._channels, 1, 1, 1), np.float32), np.full((1, 1, 1, 1), -1, np.int16), None,
                    {"class_locations": {}})
        self._channels = data.shape[0]
        return data, seg, seg_prev, properties


class CheckedDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader that checks each case whenever it is drawn and leaves a damaged one out (see the
    module; its cost per read is measured in ``benchmarks/unlabeled_check_cost.py``)."""

    def __init__(self, *args, log_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_file = log_file
        self.folder = self._data.source_folder
        self._records = load_records(self.folder)

    def get_indices(self):
        while True:
            keys = super().get_indices()
            if not os.path.isdir(self.folder):
                return keys  # the version is gone: the augmenter stops the run
            damaged = [k for k in dict.fromkeys(keys) if not self._passes_check(k)]
            if not damaged:
                return keys

    def _passes_check(self, case: str) -> bool:
        problem = check_case(self.folder, case, self._records)
        if problem is not None:  # repaired meanwhile by another run? its stamp file has the new records
            self._records = load_records(self.folder)
            problem = check_case(self.folder, case, self._records)
        if problem is None:
            return True
        # a list of its own: nnU-Net's loader samples from self.indices, the dataset keeps its identifiers
        self.indices = [k for k in self.indices if k != case]
        noted = note_damaged(self.folder, case, problem)
        if noted != "noted already":  # another augmentation process found it first and said so
            repair = "the next run (or nnunet_sassnet_preprocess_unlabeled) preprocesses it again" \
                if noted == "noted" else f"it {noted}: run nnunet_sassnet_preprocess_unlabeled as a user who may " \
                                         f"write there"
            _log(self.log_file, f"Unlabeled case {case} in {self.folder} is damaged ({problem}): left out of this "
                                f"run; {repair}")
        if not self.indices:
            raise UserInputError(f"{self.folder}: every unlabeled case is damaged; run "
                                 f"nnunet_sassnet_preprocess_unlabeled for this dataset, which preprocesses them again")
        return False


class _StopsWhenVersionGone:
    """For nnU-Net's augmenters: a batch is handed out only while the version it was read from exists (checked
    after it was made, so a stand-in of :class:`UnlabeledDataset` is never used)."""

    version_folder: str

    def __next__(self):
        try:
            item = super().__next__()
        except RuntimeError:  # "background workers are no longer alive", after a file vanished under them
            if not os.path.isdir(self.version_folder):
                raise _version_gone(self.version_folder) from None
            raise
        if not os.path.isdir(self.version_folder):
            raise _version_gone(self.version_folder)
        return item


class UnlabeledAugmenter(_StopsWhenVersionGone, NonDetMultiThreadedAugmenter):
    """nnU-Net's augmenter with worker processes, for the unlabeled stream."""


class UnlabeledSingleThreadedAugmenter(_StopsWhenVersionGone, SingleThreadedAugmenter):
    """nnU-Net's in-process augmenter (``nnUNet_n_proc_DA=0``), for the unlabeled stream."""
