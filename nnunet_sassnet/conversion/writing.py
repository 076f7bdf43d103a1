"""Writing a planned LA 2018 conversion: the cases in parallel into a hidden folder, then into place."""
from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import SimpleITK as sitk
from tqdm import tqdm

from nnunet_sassnet.conversion.planning import Plan
from nnunet_sassnet.conversion.sources import Case, read_case
from nnunet_sassnet.errors import UserInputError, short_reason
from nnunet_sassnet.unlabeled import UNLABELED_IMAGES_FOLDER

__all__ = ["FILE_ENDING", "LABELS", "write_cases", "dataset_json", "move_into_place"]

FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "left_atrium": 1}
_MAX_WORKERS = 8  # cases converted at once; each holds one scan in memory


def _write(image: sitk.Image, path: Path) -> None:
    try:
        sitk.WriteImage(image, str(path), True)
    except RuntimeError as e:
        raise UserInputError(f"{path}: cannot write ({short_reason(e)}); check free disk space and "
                             f"permissions") from None


def _convert_case(case: Case, folder: Path, image_dir: str, label_dir: str | None) -> None:
    image, label = read_case(case, label_dir is not None)
    _write(image, folder / image_dir / f"{case.case_id}_0000{FILE_ENDING}")
    if label is not None and label_dir is not None:
        _write(label, folder / label_dir / f"{case.case_id}{FILE_ENDING}")


def write_cases(plan: Plan, folder: Path, progress: bool) -> None:
    """Every planned case into ``folder``'s imagesTr/labelsTr, imagesUnlabeled and imagesTs/labelsTs.

    Raises:
        UserInputError: a case cannot be read or written; the first such case in plan order is named.
    """
    jobs: list[tuple[Case, str, str | None]] = (
        [(c, "imagesTr", "labelsTr") for c in plan.labeled]
        + [(c, UNLABELED_IMAGES_FOLDER, None) for c in plan.unlabeled]
        + [(c, "imagesTs", "labelsTs" if c.has_label else None) for c in plan.test])
    for sub in ("imagesTr", "labelsTr", UNLABELED_IMAGES_FOLDER, "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    # SimpleITK releases the GIL while reading and gzip-writing, the bulk of the time for full-size scans
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1, len(jobs)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_convert_case, case, folder, image_dir, label_dir)
                   for case, image_dir, label_dir in jobs]
        try:
            # in submission order, so that with several bad cases the error names the first one
            for future in tqdm(futures, desc="Writing", unit="case", disable=not progress):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def dataset_json(name: str, plan: Plan, layout: str, split: str) -> dict:
    """nnU-Net's dataset.json, with the counts of the extra folders and how the split was made."""
    return {
        "name": name,
        "description": "Left atrium in LGE-MRI (2018 Atrial Segmentation Challenge), converted by "
                       "nnunet_sassnet_convert_la2018; unlabeled training scans are in imagesUnlabeled",
        "reference": "Xiong et al., Medical Image Analysis 2021 (2018 Atrial Segmentation Challenge)",
        "channel_names": {"0": "MRI"},
        "labels": dict(LABELS),
        "numTraining": len(plan.labeled),
        "file_ending": FILE_ENDING,
        "numUnlabeled": len(plan.unlabeled),
        "numTest": len(plan.test),
        "conversion": {"source_layout": "UA-MT h5" if layout == "h5" else "challenge nrrd",
                       "split": split, "rule": plan.rule},
    }


def move_into_place(tmp: Path, final: Path, existing: list[Path]) -> None:
    """Rename the finished folder into place; replaced datasets are parked first so a failure restores them.

    Raises:
        UserInputError: the rename failed (the replaced datasets are back in place).
    """
    parked: list[tuple[Path, Path]] = []
    try:
        for old in existing:
            spot = old.with_name(f".{old.name}.replaced-{uuid.uuid4().hex[:8]}")
            old.rename(spot)
            parked.append((old, spot))
        tmp.rename(final)
    except OSError as e:
        for old, spot in reversed(parked):
            spot.rename(old)
        raise UserInputError(f"{final}: cannot move the converted dataset into place ({short_reason(e)})") from None
    for _, spot in parked:
        shutil.rmtree(spot, ignore_errors=True)
