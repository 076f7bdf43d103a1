"""The student's dataset: its raw folder, the teacher's plans transferred, its splits, nnU-Net's preprocessing.

The raw folder holds the labeled cases and the pseudo-labeled cases as ``imagesTr``/``labelsTr`` (the images are
hard links of the labeled dataset's files, copies across file systems), and every unlabeled scan again in
``imagesUnlabeled``, where this package's semi-supervised trainers find their unlabeled scans. The plans are the
teacher's own (``plans.json`` of its model folder) as ``nnUNetv2_move_plans_between_datasets`` transfers them:
same plans identifier, configurations and data identifiers, the dataset's name and image reader set for the
student; no new planning, so teacher and student share preprocessing and architecture.

``splits_final.json``: in every fold, the labeled cases keep their fold of the labeled dataset (its own
``splits_final.json``, else the split that nnU-Net would make for it) and the fold's pseudo-labeled cases (those of
its own teacher fold, see :func:`~nnunet_sassnet.selftraining.pseudo_labels.pseudo_labelings`) are training cases,
never validation cases, so nnU-Net's cross-validation of the student scores real labels only.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from nnunet_sassnet.atomic_files import write_json_atomic
from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.selftraining.folders import link_file
from nnunet_sassnet.unlabeled.labeled_copies import PSEUDO_LABELED_CASES_KEY

__all__ = ["labeled_cases", "ignore_label_for", "student_dataset_json", "link_raw_dataset", "transfer_plans",
           "labeled_splits", "student_splits", "preprocess_student"]


def labeled_cases(raw_dataset: Path, dataset_json: dict) -> dict[str, dict]:
    """Case -> ``{"images": [...], "label": ...}`` of the labeled dataset, as nnU-Net lists them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    return get_filenames_of_train_images_and_targets(str(raw_dataset), copy.deepcopy(dataset_json))


def ignore_label_for(dataset_json: dict, ignore_below: float | None) -> int | None:
    """The student's ignore label: the dataset's own, else one past its highest label with ``ignore_below``."""
    labels = dataset_json["labels"]
    if "ignore" in labels:
        return int(labels["ignore"])
    if ignore_below is None:
        return None
    return max(int(v) for v in labels.values()) + 1


def student_dataset_json(dataset_json: dict, num_training: int, ignore_label: int | None,
                         pseudo_labeled_cases: list[str]) -> dict:
    """The labeled dataset's dataset.json for the student: its own case count, the ignore label where used, and
    which cases are pseudo-labeled (so that a semi-supervised student still reads their scans in
    ``imagesUnlabeled``, see :mod:`~nnunet_sassnet.unlabeled.labeled_copies`; nnU-Net ignores the key).

    An explicit ``dataset`` file list is dropped: the student's cases are in its own imagesTr and labelsTr.
    """
    result = {k: v for k, v in dataset_json.items() if k not in ("dataset", PSEUDO_LABELED_CASES_KEY)}
    result["numTraining"] = num_training
    result[PSEUDO_LABELED_CASES_KEY] = sorted(pseudo_labeled_cases)
    if ignore_label is not None and "ignore" not in result["labels"]:
        # nnU-Net requires the ignore label to be the highest one
        result["labels"] = {**result["labels"], "ignore": ignore_label}
    return result


def link_raw_dataset(student_raw: Path, labeled: dict[str, dict], unlabeled: dict[str, list[str]],
                     pseudo_labeled: dict[str, list[str]], dataset_json: dict) -> None:
    """imagesTr, labelsTr (the labeled cases' labels; the pseudo-labels are there already), imagesUnlabeled and
    dataset.json of the student's raw folder; ``pseudo_labeled``: each pseudo-labeled case -> its images (an
    unlabeled scan's files)."""
    ending = dataset_json["file_ending"]
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        (student_raw / sub).mkdir(parents=True, exist_ok=True)
    for case, files in labeled.items():
        for channel, image in enumerate(files["images"]):
            link_file(image, student_raw / "imagesTr" / f"{case}_{channel:04d}{ending}")
        link_file(files["label"], student_raw / "labelsTr" / f"{case}{ending}")
    for case, images in unlabeled.items():
        for channel, image in enumerate(images):
            name = f"{case}_{channel:04d}{ending}"
            link_file(image, student_raw / "imagesUnlabeled" / name)
    for case, images in pseudo_labeled.items():
        for channel, image in enumerate(images):
            link_file(image, student_raw / "imagesTr" / f"{case}_{channel:04d}{ending}")
    write_json_atomic(student_raw / "dataset.json", dataset_json)


def transfer_plans(teacher_folder: Path, student_raw: Path, student_preprocessed: Path,
                   plans_identifier: str) -> Path:
    """The teacher's plans (its model folder's) for the student's dataset, as nnUNetv2_move_plans_between_datasets
    writes them; with the teacher's dataset fingerprint, which nnU-Net's training copies into its model folder
    (the plans were made from it)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    plans = json.loads((teacher_folder / "plans.json").read_text())
    plans["dataset_name"] = student_raw.name
    plans["plans_name"] = plans_identifier
    dataset_json = json.loads((student_raw / "dataset.json").read_text())
    example_image = min((student_raw / "imagesTr").glob(f"*{dataset_json['file_ending']}"))
    plans["image_reader_writer"] = determine_reader_writer_from_dataset_json(
        dataset_json, str(example_image), allow_nonmatching_filename=True, verbose=False).__name__
    student_preprocessed.mkdir(parents=True, exist_ok=True)
    # nnU-Net's preprocessing and training read dataset.json from the preprocessed folder
    write_json_atomic(student_preprocessed / "dataset.json", dataset_json)
    write_json_atomic(student_preprocessed / "dataset_fingerprint.json",
                      json.loads((teacher_folder / "dataset_fingerprint.json").read_text()))
    target = student_preprocessed / f"{plans_identifier}.json"
    write_json_atomic(target, plans)
    return target


#: nnU-Net's cross-validation: the folds it makes where a dataset has no splits_final.json
NNUNET_FOLDS = 5


def labeled_splits(preprocessed_dataset: Path, labeled: list[str]) -> list[dict[str, list[str]]] | None:
    """The labeled dataset's folds: its splits_final.json, else the split nnU-Net's training would create; None
    where there is neither (fewer labeled cases than nnU-Net's 5 folds: only fold "all" can be trained)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits_file = preprocessed_dataset / "splits_final.json"
    if not splits_file.is_file():
        if len(labeled) < NNUNET_FOLDS:
            return None
        return generate_crossval_split(sorted(labeled), seed=12345, n_splits=NNUNET_FOLDS)
    splits = json.loads(splits_file.read_text())
    unknown = sorted({c for s in splits for c in (*s["train"], *s["val"])} - set(labeled))
    if unknown:
        raise UserInputError(f"{splits_file}: names case(s) {', '.join(unknown[:3])} that imagesTr does not hold; "
                             f"correct the file or delete it (nnU-Net then makes its 5-fold split again)")
    return splits


def student_splits(splits: list[dict[str, list[str]]], pseudo_labeled: dict[str, list[str]]
                   ) -> list[dict[str, list[str]]]:
    """Each fold's labeled training and validation cases, plus the fold's pseudo-labeled cases (``pseudo_labeled``:
    fold number as text -> cases) as training cases, never as validation cases."""
    return [{"train": [*s["train"], *pseudo_labeled.get(str(k), [])], "val": list(s["val"])}
            for k, s in enumerate(splits)]


def preprocess_student(dataset_id: int, plans_identifier: str, configuration: str, processes: int) -> None:
    """nnU-Net's preprocessing of the student's dataset with the transferred plans (nnUNetv2_preprocess)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    preprocess_dataset(dataset_id, plans_identifier, [configuration], [max(1, processes)])
