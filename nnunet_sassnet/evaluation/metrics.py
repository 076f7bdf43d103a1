"""The SASSNet paper's metrics as pure functions on arrays: Dice, Jaccard, 95HD, ASD and ASSD.

Each gives the value of ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``, ``assd``; surfaces with
connectivity 1), except that a metric undefined for empty masks returns NaN where medpy returns 1.0 or
raises. Masks are arrays of any shape; every non-zero value is foreground.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from nnunet_sassnet.evaluation.masks import validate_pair
from nnunet_sassnet.evaluation.surface import SurfaceDistances, surface_distances, validate_spacing

__all__ = ["Overlap", "overlap", "dice", "jaccard", "hd95", "asd", "assd", "distance_scores"]

Spacing = float | Sequence[float] | None


@dataclass(frozen=True)
class Overlap:
    """Foreground voxel counts of a prediction P and a reference R, from which Dice and Jaccard follow."""

    pred: int
    ref: int
    both: int

    @property
    def dice(self) -> float:
        """2|P∩R| / (|P|+|R|); NaN when both masks are empty (nnU-Net's convention; medpy returns 1.0)."""
        total = self.pred + self.ref
        return math.nan if total == 0 else 2.0 * self.both / float(total)

    @property
    def jaccard(self) -> float:
        """|P∩R| / |P∪R|; NaN when both masks are empty."""
        union = self.pred + self.ref - self.both
        return math.nan if union == 0 else self.both / float(union)


def overlap(pred: np.ndarray, ref: np.ndarray) -> Overlap:
    """The voxel counts of two boolean masks of the same shape."""
    return Overlap(int(np.count_nonzero(pred)), int(np.count_nonzero(ref)), int(np.count_nonzero(pred & ref)))


def dice(pred: Any, ref: Any) -> float:
    """Dice coefficient 2|P∩R| / (|P|+|R|), as medpy's ``dc``; NaN when both masks are empty.

    Raises:
        TypeError: a mask is neither numeric nor boolean.
        ValueError: the shapes differ.
    """
    return overlap(*validate_pair(pred, ref)).dice


def jaccard(pred: Any, ref: Any) -> float:
    """Jaccard index |P∩R| / |P∪R|, as medpy's ``jc``; NaN when both masks are empty.

    Raises:
        TypeError: a mask is neither numeric nor boolean.
        ValueError: the shapes differ.
    """
    return overlap(*validate_pair(pred, ref)).jaccard


def distance_scores(distances: SurfaceDistances) -> dict[str, float]:
    """``hd95``, ``asd`` and ``assd`` from the surface distances of both directions.

    hd95 is the 95th percentile of both directions pooled (medpy ``hd95``), asd the mean from the
    prediction's surface to the reference's (medpy ``asd``, the published SASSNet code), assd the mean of both
    directions pooled (medpy ``assd``, what the paper's text names).
    """
    pred_to_ref, ref_to_pred = distances
    pooled = np.concatenate([pred_to_ref, ref_to_pred])
    return {"hd95": float(np.percentile(pooled, 95)), "asd": float(pred_to_ref.mean()),
            "assd": float(pooled.mean())}


def _distance_metric(pred: Any, ref: Any, spacing: Spacing, metric: str) -> float:
    p, r = validate_pair(pred, ref)
    sp = validate_spacing(spacing, p.ndim)
    if not p.any() or not r.any():
        return math.nan
    return distance_scores(surface_distances(p, r, [sp])[0])[metric]


def hd95(pred: Any, ref: Any, spacing: Spacing = None) -> float:
    """95th percentile of the surface distances in both directions, as medpy's ``hd95``; NaN if a mask is empty.

    Args:
        pred, ref: masks of the same shape (non-zero is foreground).
        spacing: per array axis (a scalar means isotropic); None means voxel units.

    Raises:
        TypeError: a mask is neither numeric nor boolean.
        ValueError: the shapes differ, or the spacing has the wrong length or a non-positive value.
    """
    return _distance_metric(pred, ref, spacing, "hd95")


def asd(pred: Any, ref: Any, spacing: Spacing = None) -> float:
    """Mean distance from the prediction's surface to the reference's (one direction), as medpy's
    ``asd(pred, ref)`` and the published SASSNet code; NaN if a mask is empty. Arguments and errors as
    :func:`hd95`."""
    return _distance_metric(pred, ref, spacing, "asd")


def assd(pred: Any, ref: Any, spacing: Spacing = None) -> float:
    """Average symmetric surface distance (both directions pooled), as medpy's ``assd``; NaN if a mask is
    empty. Arguments and errors as :func:`hd95`."""
    return _distance_metric(pred, ref, spacing, "assd")
