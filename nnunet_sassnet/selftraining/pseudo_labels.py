"""Pseudo-labels: the teacher's predictions of ``imagesUnlabeled`` through nnU-Net's predictor, and the two
confidence options.

The predictor writes its segmentations (and, for the confidence options, its class probabilities) into
``pseudo_labels/`` of the student's raw dataset folder; each case is then read back, turned into the student's
label file in ``labelsTr/`` and recorded, one case at a time, so that a kill loses at most the cases being
predicted. A case whose prediction cannot be read back (a kill during its export) is predicted again.

A voxel's confidence is the teacher's highest class probability there (softmax). ``ignore_below``: voxels below
it become nnU-Net's ignore label (the student's loss skips them). ``min_case_confidence``: a case whose
confidence (the mean voxel confidence over the voxels the teacher labels as foreground, over all voxels where it
labels none) is below it becomes no training case. Both need the probabilities, which nnU-Net writes as
compressed ``.npz`` files of one float per class and voxel; they are deleted once the case's label is written,
and at most :data:`PROBABILITY_CHUNK` cases' files exist at once.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_sassnet.selftraining.folders import link_file
from nnunet_sassnet.selftraining.state import RoundState
from nnunet_sassnet.selftraining.training import FINAL_CHECKPOINT, TrainedModel

__all__ = ["PREDICTIONS_FOLDER", "PROBABILITY_CHUNK", "ConfidenceOptions", "PredictorSettings", "PseudoLabeling",
           "pseudo_labelings", "case_confidence", "pseudo_label", "make_pseudo_labels"]

#: the predictor's output in the student's raw dataset folder
PREDICTIONS_FOLDER = "pseudo_labels"
#: cases predicted between two rounds of label writing when the probabilities are kept (their disk use)
PROBABILITY_CHUNK = 16


@dataclass(frozen=True)
class ConfidenceOptions:
    """``--ignore-below`` and ``--min-case-confidence`` (None: off)."""

    ignore_below: float | None = None
    min_case_confidence: float | None = None

    @property
    def needs_probabilities(self) -> bool:
        return self.ignore_below is not None or self.min_case_confidence is not None


@dataclass(frozen=True)
class PredictorSettings:
    """How nnU-Net's predictor runs (``nnUNetv2_predict``'s options of the same meaning)."""

    device: str = "cuda"
    tta: bool = True
    step_size: float = 0.5
    preprocessing_processes: int = 3
    export_processes: int = 3


@dataclass(frozen=True)
class PseudoLabeling:
    """One set of pseudo-labels of the unlabeled scans: the teacher folds whose ensemble predicts it, the suffix of
    its case names in the student's dataset, and the student folds that train on it."""

    teacher_folds: tuple[str, ...]
    suffix: str
    student_folds: tuple[str, ...]

    def case(self, unlabeled_case: str) -> str:
        """The pseudo-labeled case's name in the student's dataset."""
        return f"{unlabeled_case}{self.suffix}"


def pseudo_labelings(folds: tuple[str, ...], ensemble: bool) -> list[PseudoLabeling]:
    """Which teacher folds pseudo-label the unlabeled scans for which student folds.

    By default student fold k learns from teacher fold k alone: the other teacher folds were trained on fold k's
    validation cases, so pseudo-labels of theirs would carry those labels into the student's training and make
    its cross-validation optimistic. With several folds the student's dataset then holds each unlabeled scan
    once per fold (``CASE_fold<k>``), and fold k's split trains on teacher k's cases only. ``ensemble``: every
    student fold learns from the ensemble of all teacher folds (one pseudo-label per scan, as
    ``nnUNetv2_predict -f`` makes it; the students' validation is then optimistic).
    """
    if ensemble or len(folds) == 1:
        return [PseudoLabeling(tuple(folds), "", tuple(folds))]
    return [PseudoLabeling((fold,), f"_fold{fold}", (fold,)) for fold in folds]


def case_confidence(voxel_confidence: np.ndarray, segmentation: np.ndarray) -> float:
    """The mean voxel confidence over the voxels labelled as foreground (over all voxels where none is)."""
    foreground = segmentation > 0
    return float(voxel_confidence[foreground].mean() if foreground.any() else voxel_confidence.mean())


def pseudo_label(segmentation: np.ndarray, voxel_confidence: np.ndarray, ignore_below: float,
                 ignore_label: int) -> tuple[np.ndarray, int]:
    """The segmentation with ``ignore_label`` where the confidence is below ``ignore_below``; and how many voxels."""
    uncertain = voxel_confidence < ignore_below
    return np.where(uncertain, np.asarray(ignore_label, dtype=segmentation.dtype), segmentation), int(uncertain.sum())


def _predictor(teacher: TrainedModel, settings: PredictorSettings):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=settings.step_size, use_gaussian=True, use_mirroring=settings.tta,
                                perform_everything_on_device=settings.device == "cuda",
                                device=torch.device(settings.device), allow_tqdm=True)
    predictor.initialize_from_trained_model_folder(str(teacher.folder), list(teacher.folds), FINAL_CHECKPOINT)
    return predictor


def _predict(predictor, inputs: list[list[str]], outputs: list[str], probabilities: bool,
             settings: PredictorSettings) -> None:
    """nnU-Net's predictor on the cases whose output is not there yet (its ``--continue_prediction``)."""
    if settings.preprocessing_processes == 0 and settings.export_processes == 0:
        predictor.predict_from_files_sequential(inputs, outputs, save_probabilities=probabilities, overwrite=False)
    else:
        predictor.predict_from_files(inputs, outputs, save_probabilities=probabilities, overwrite=False,
                                     num_processes_preprocessing=max(1, settings.preprocessing_processes),
                                     num_processes_segmentation_export=max(1, settings.export_processes))


def _label_case(case: str, predictions: Path, labels: Path, file_ending: str, reader_writer,
                options: ConfidenceOptions, ignore_label: int | None) -> dict:
    """Read one case's prediction back, write its label file (unless it is left out); returns its record."""
    prediction = predictions / f"{case}{file_ending}"
    segmentation, properties = reader_writer.read_seg(str(prediction))
    record = {"voxels": int(segmentation.size), "foreground_voxels": int((segmentation > 0).sum()), "kept": True}
    label = None
    if options.needs_probabilities:
        with np.load(predictions / f"{case}.npz") as npz:
            voxel_confidence = npz["probabilities"].max(axis=0)
        confidence = case_confidence(voxel_confidence, segmentation[0])
        record["confidence"] = round(confidence, 5)
        record["kept"] = options.min_case_confidence is None or confidence >= options.min_case_confidence
        if options.ignore_below is not None:
            label, record["ignored_voxels"] = pseudo_label(segmentation[0], voxel_confidence, options.ignore_below,
                                                           ignore_label)
    target = labels / f"{case}{file_ending}"
    if not record["kept"]:
        target.unlink(missing_ok=True)
    elif label is None:
        link_file(prediction, target)
    else:
        # the ending stays last: nnU-Net's writers choose the format by it
        tmp = predictions / f".{case}.partial{file_ending}"
        reader_writer.write_seg(label, str(tmp), properties)
        os.replace(tmp, target)
    return record


def _remove_outputs(predictions: Path, case: str, file_ending: str, prediction_too: bool) -> None:
    names = [f"{case}.npz", f"{case}.pkl"] + ([f"{case}{file_ending}"] if prediction_too else [])
    for name in names:
        (predictions / name).unlink(missing_ok=True)


def make_pseudo_labels(teacher: TrainedModel, cases: dict[str, list[str]], student_raw: Path, dataset_json: dict,
                       ignore_label: int | None, options: ConfidenceOptions, settings: PredictorSettings,
                       state: RoundState) -> None:
    """Predict the unlabeled ``cases`` not yet recorded in ``state`` and write their labels into ``labelsTr``."""
    predictions, labels = student_raw / PREDICTIONS_FOLDER, student_raw / "labelsTr"
    for folder in (predictions, labels):
        folder.mkdir(parents=True, exist_ok=True)
    file_ending = dataset_json["file_ending"]
    todo = [case for case in sorted(cases) if case not in state.cases]
    if not todo:
        return
    predictor = _predictor(teacher, settings)
    reader_writer = predictor.plans_manager.image_reader_writer_class()
    for _ in range(2):  # a prediction cut short by a kill is predicted once more
        unreadable = []
        chunk_size = PROBABILITY_CHUNK if options.needs_probabilities else len(todo)
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            _predict(predictor, [cases[c] for c in chunk], [str(predictions / c) for c in chunk],
                     options.needs_probabilities, settings)
            for case in chunk:
                try:
                    record = _label_case(case, predictions, labels, file_ending, reader_writer, options, ignore_label)
                except (OSError, ValueError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as e:
                    # a file cut short by a kill during its export: predicted again below
                    print(f"pseudo-labels: {case}: the prediction could not be read ({type(e).__name__}); "
                          f"predicting it again")
                    _remove_outputs(predictions, case, file_ending, prediction_too=True)
                    unreadable.append(case)
                    continue
                state.cases[case] = record
                state.save()
                _remove_outputs(predictions, case, file_ending, prediction_too=False)
        todo = unreadable
        if not todo:
            return
    raise RuntimeError(f"pseudo-labels: the predictions of {', '.join(todo)} in {predictions} could not be read "
                       f"even after predicting them again; see the messages above")
