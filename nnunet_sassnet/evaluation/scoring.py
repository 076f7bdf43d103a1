"""Scoring one case: every label of one reference/prediction pair, without and with the largest component."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_sassnet.evaluation.images import check_geometry, present_labels, read_labels
from nnunet_sassnet.evaluation.masks import largest_component
from nnunet_sassnet.evaluation.metrics import distance_scores, overlap
from nnunet_sassnet.evaluation.surface import surface_distances

__all__ = ["METRICS", "DISTANCE_METRICS", "VARIANT_RAW", "VARIANT_LCC", "both_empty", "score_label", "CaseTask",
           "score_case"]

METRICS: tuple[str, ...] = (
    "dice",
    "jaccard",
    "hd95_voxel",
    "hd95_mm",
    "asd_voxel",
    "asd_mm",
    "assd_voxel",
    "assd_mm",
)
DISTANCE_METRICS: tuple[str, ...] = METRICS[2:]
VARIANT_RAW = "raw"
VARIANT_LCC = "largest_component"


def both_empty() -> dict[str, Any]:
    """The scores of a label that neither mask contains: NaN everywhere, left out of the means."""
    return {**{m: math.nan for m in METRICS}, "status": "both_empty"}


def score_label(pred: np.ndarray, ref: np.ndarray, spacing_mm: np.ndarray, threads: int) -> dict[str, Any]:
    """Every metric of :data:`METRICS` for two boolean masks, and a ``status``.

    An empty prediction or reference gets Dice and Jaccard 0 and distances None (undefined, not 0); two empty
    masks get NaN everywhere. ``spacing_mm`` is per array axis.
    """
    counts = overlap(pred, ref)
    if counts.pred == 0 and counts.ref == 0:
        return both_empty()
    scores: dict[str, Any] = {"dice": counts.dice, "jaccard": counts.jaccard}
    if counts.pred == 0 or counts.ref == 0:
        scores.update({m: None for m in DISTANCE_METRICS})
        scores["status"] = "empty_prediction" if counts.pred == 0 else "empty_reference"
        return scores
    for unit, distances in zip(("voxel", "mm"), surface_distances(pred, ref, [None, spacing_mm], threads)):
        scores.update({f"{metric}_{unit}": value for metric, value in distance_scores(distances).items()})
    scores["status"] = "ok"
    return scores


@dataclass(frozen=True)
class CaseTask:
    """One case to score; sent to worker processes, hence plain data."""

    case: str
    ref_path: Path
    pred_path: Path
    labels: tuple[int, ...] | None
    variants: tuple[str, ...]
    threads: int


def score_case(task: CaseTask) -> dict[str, Any]:
    """Read one pair and score every variant; returns the labels present in the reference too.

    Raises:
        UserInputError: a file is unreadable, not an integer label map, or on another grid than its pair.
    """
    ref, ref_spacing = read_labels(task.ref_path, task.case, "reference")
    pred, pred_spacing = read_labels(task.pred_path, task.case, "prediction")
    check_geometry(task.case, ref.shape[::-1], pred.shape[::-1], ref_spacing[::-1], pred_spacing[::-1])
    ref_labels = present_labels(ref) - {0}
    if task.labels is not None:
        labels = sorted(task.labels)
    else:
        # The final label set (all labels of all references) is known only after every case is read, so a
        # label seen in this prediction is scored too in case another reference has it.
        labels = sorted(ref_labels | (present_labels(pred) - {0}))
    scores: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in task.variants}
    for label in labels:
        ref_l = ref == label
        pred_l = pred == label
        raw = None
        if VARIANT_RAW in task.variants:
            raw = score_label(pred_l, ref_l, ref_spacing, task.threads)
            scores[VARIANT_RAW][label] = raw
        if VARIANT_LCC in task.variants:
            kept, changed = largest_component(pred_l)
            if not changed and raw is not None:
                scores[VARIANT_LCC][label] = dict(raw)
            else:
                scores[VARIANT_LCC][label] = score_label(kept, ref_l, ref_spacing, task.threads)
    return {"case": task.case, "ref_labels": sorted(ref_labels), "scores": scores}
