"""Unlabeled scans: where they live, their preprocessing with the dataset's plans, and their loading.

Raw images go to ``nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/`` named like ``imagesTr``
(``CASE_0000.nii.gz``, one file per channel); nnU-Net's own planning never looks there. They are preprocessed
with the plan's own preprocessor (cropping, resampling, normalisation identical to the labeled scans) into
``nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/``: beside nnU-Net's folder, never inside
it, because nnU-Net wipes ``<data_identifier>/`` when it preprocesses again and treats every case in it as a
labeled training case. A scan that is a case of ``imagesTr`` (by name or by identical voxels) is left out
before any preprocessing (:mod:`~nnunet_sassnet.unlabeled.labeled_copies`). A stamp file there records a hash of
what the data was made from, so a change of plans, dataset.json or input files (their content:
:mod:`~nnunet_sassnet.unlabeled.raw_fingerprints`) is detected, and the size and content hashes of every
file written, so a damaged case is detected (before training, or by the loader while training) and preprocessed again (see
:mod:`~nnunet_sassnet.unlabeled.integrity`). Bad scans are refused before anything is written, one line naming
the file and the fix (:mod:`~nnunet_sassnet.unlabeled.image_checks`).

Several runs (the folds of a dataset trained at once, DDP ranks, a user adding scans while a fold trains) share
that folder, so it is a :class:`~nnunet_sassnet.versioned_folder.VersionedFolder`: ``<data_identifier>_unlabeled``
is a link to ``<data_identifier>_unlabeled_versions/<version>``. One process preprocesses while the others wait
for it; a new version is swapped in whole; a training run leases the version it reads, which is kept until no
run uses it. Folders follow the umask, so a group can share ``nnUNet_preprocessed``; where it may not be written,
up-to-date data is used as it is. The trainer calls :func:`ensure_preprocessed` and :func:`make_unlabeled_loader`,
nothing else.

A preprocessed unlabeled case is an ordinary nnU-Net (blosc2) case whose "segmentation" holds only the
nonzero mask (-1 outside, 0 inside; nnU-Net's mask-based normalisation reads it) and whose
``class_locations`` are empty, so nnU-Net's data loader and augmentation take it unchanged.
"""
from nnunet_sassnet.unlabeled.cases import (CASE_FILE_SUFFIXES, STAMP_FILE, UNLABELED_IMAGES_FOLDER, compute_stamp,
                                            list_unlabeled_cases, unlabeled_data_is_current,
                                            unlabeled_preprocessed_folder)
from nnunet_sassnet.unlabeled.cli import preprocess_unlabeled_entry
from nnunet_sassnet.unlabeled.labeled_copies import find_labeled_copies
from nnunet_sassnet.unlabeled.loader import make_unlabeled_loader
from nnunet_sassnet.unlabeled.preprocessing import UnlabeledData, ensure_preprocessed, preprocess_unlabeled

__all__ = [
    "UNLABELED_IMAGES_FOLDER", "STAMP_FILE", "CASE_FILE_SUFFIXES", "unlabeled_preprocessed_folder",
    "list_unlabeled_cases", "compute_stamp", "unlabeled_data_is_current", "UnlabeledData", "ensure_preprocessed",
    "make_unlabeled_loader", "preprocess_unlabeled", "preprocess_unlabeled_entry", "find_labeled_copies",
]
