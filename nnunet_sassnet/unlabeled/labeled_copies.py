"""Unlabeled scans that are labeled cases: found before any preprocessing and left out of the unlabeled data.

A scan in ``imagesUnlabeled`` that is a case of ``imagesTr`` would, in a fold where that case validates, be trained
on (without its label) and so leak into the validation; in the other folds it would be used twice. Such a scan is
therefore never unlabeled data, whatever the fold.

Pseudo-labeled cases are not labeled cases here: a self-training student's dataset lists them in its dataset.json
(:data:`PSEUDO_LABELED_CASES_KEY`); they never validate, and a semi-supervised student reads their scans as unlabeled
data on purpose (its pseudo-labels are the teacher's guesses, not annotations).
"""
from __future__ import annotations

import copy
import os
from collections import defaultdict

from nnunet_sassnet.unlabeled.cases import list_unlabeled_cases, read_raw_dataset_json
from nnunet_sassnet.unlabeled.raw_fingerprints import FingerprintCache, fingerprint_cache_for

__all__ = ["find_labeled_copies", "describe_labeled_copies", "PSEUDO_LABELED_CASES_KEY"]

#: key of a dataset.json that lists the imagesTr cases whose labels are pseudo-labels (self-training's students)
PSEUDO_LABELED_CASES_KEY = "pseudo_labeled_cases"


def find_labeled_copies(raw_dataset_folder: str, unlabeled_cases: list[str] | None = None,
                        fingerprints: FingerprintCache | None = None) -> dict[str, str]:
    """Unlabeled case identifier -> the ``imagesTr`` case identifier it duplicates.

    The rule: an unlabeled case is a copy of a labeled case when it has the same identifier, or when every channel
    file holds the same voxels (same shape, type and values, as the dataset's nnU-Net reader decodes them) as the
    same channel of that case, whatever the file names or compression. A copy is left out of the unlabeled data for
    every fold: where the labeled case validates it would leak into the validation, elsewhere it would be used
    twice.

    Cheap: the voxels are hashed only for files whose header declares the same grid as a file on the other side,
    and each hash is computed once per version of the file (``fingerprints``; by default the cache of
    :func:`~nnunet_sassnet.unlabeled.raw_fingerprints.fingerprint_cache_for`, saved on return).
    ``unlabeled_cases``: the identifiers to check (default: every case in ``imagesUnlabeled``).
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = read_raw_dataset_json(raw_dataset_folder)
    unlabeled = list_unlabeled_cases(raw_dataset_folder, dataset_json)
    if unlabeled_cases is not None:
        unlabeled = {case: unlabeled[case] for case in unlabeled_cases if case in unlabeled}
    has_labeled = "dataset" in dataset_json or os.path.isdir(os.path.join(raw_dataset_folder, "imagesTr"))
    labeled = {case: files["images"] for case, files in get_filenames_of_train_images_and_targets(
        raw_dataset_folder, copy.deepcopy(dataset_json)).items()} if has_labeled else {}
    for case in dataset_json.get(PSEUDO_LABELED_CASES_KEY, ()):
        labeled.pop(case, None)
    copies = {case: case for case in unlabeled if case in labeled}
    remaining = {case: files for case, files in unlabeled.items() if case not in copies}
    if not remaining or not labeled:
        return copies
    own_cache = fingerprints is None
    fingerprints = fingerprint_cache_for(raw_dataset_folder) if own_cache else fingerprints
    try:
        labeled_by_grid = defaultdict(list)
        for case, files in labeled.items():
            labeled_by_grid[_grid(fingerprints, files[0])].append(case)
        reader = None
        for case, files in sorted(remaining.items()):
            candidates = labeled_by_grid.get(_grid(fingerprints, files[0]), [])
            if not candidates:
                continue
            if reader is None:
                reader = determine_reader_writer_from_dataset_json(dataset_json, files[0], verbose=False)()
            mine = _voxel_hashes(fingerprints, files, reader)
            for other in sorted(candidates):
                if mine is not None and len(labeled[other]) == len(files) and \
                        _voxel_hashes(fingerprints, labeled[other], reader) == mine:
                    copies[case] = other
                    break
    finally:
        if own_cache:
            fingerprints.save()
    return copies


def _voxel_hashes(fingerprints: FingerprintCache, files: list[str], reader) -> list[str] | None:
    """The voxel hash of each channel file; None where one cannot be read (the checks before preprocessing name an
    unreadable unlabeled scan; nnU-Net's own, a labeled one)."""
    try:
        return [fingerprints.voxel_sha256(path, reader) for path in files]
    except Exception:  # the readers raise many types for a damaged file
        return None


def _grid(fingerprints: FingerprintCache, path: str):
    """The header's grid, or None where it cannot be read (such files are compared with each other by voxels)."""
    shape = fingerprints.image_shape(path)
    return tuple(shape) if shape is not None else None


def describe_labeled_copies(raw_dataset_folder: str, copies: dict[str, str]) -> str:
    """One line for the log: which unlabeled scans are left out, and why."""
    folder = os.path.join(raw_dataset_folder, "imagesUnlabeled")
    parts = [f"{case} ({'same name as' if case == other else 'same voxels as'} imagesTr case {other})"
             for case, other in sorted(copies.items())]
    return (f"Unlabeled data: left out {len(copies)} scan(s) of {folder} that are labeled cases: {', '.join(parts)}; "
            f"a labeled case is never unlabeled data (where it validates it would leak into the validation, "
            f"elsewhere it would be used twice): remove them from {folder} to silence this line")
