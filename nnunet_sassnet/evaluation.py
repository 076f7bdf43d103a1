"""Score segmentations with the metrics of the SASSNet paper (Dice, Jaccard, 95HD, ASD, ASSD).

Command line::

    nnunet_sassnet_evaluate -ref labelsTs -pred pred [-o report.json] [--largest-component | --both] [-l 1 2 ...]

The metric functions (:func:`dice`, :func:`jaccard`, :func:`hd95`, :func:`asd`, :func:`assd`) give the
values of ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``, ``assd``; surfaces with
connectivity 1) but crop both masks to their joint bounding box and use the exact, multi-threaded ``edt``
distance transform, so that large volumes are scored in seconds.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "METRICS",
    "IMAGE_ENDINGS",
    "EvaluationError",
    "dice",
    "jaccard",
    "hd95",
    "asd",
    "assd",
    "keep_largest_component",
    "evaluate_folders",
    "write_report",
    "format_table",
    "main",
]

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
# Longest ending first, so that "a.nii.gz" is case "a" and not "a.nii".
IMAGE_ENDINGS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tif", ".tiff", ".png", ".bmp"
)
SPACING_RTOL = 1e-4
VARIANT_RAW = "raw"
VARIANT_LCC = "largest_component"
VARIANT_TITLES = {VARIANT_RAW: "w/o NMS", VARIANT_LCC: "w/ NMS (largest component)"}

EMPTY_HANDLING_NOTE = (
    "Prediction empty, reference not: Dice 0 and Jaccard 0; the distances are undefined and reported as null, "
    "left out of the means and standard deviations and counted under counts.empty_prediction. The published "
    "SASSNet code scored such cases with distance 0, which flatters the mean 95HD and ASD; these values are "
    "therefore not directly comparable when predictions are empty. Reference empty, prediction not: Dice 0, "
    "Jaccard 0, distances null (counts.empty_reference). Both empty: NaN for every metric, left out of the "
    "means (as nnU-Net does), counted under counts.both_empty. A case's top-level metrics are the mean over "
    "the evaluated labels that have a value; means and std (population, ddof=0) are over cases."
)


class EvaluationError(ValueError):
    """Bad input to the evaluator; the message is one line that names the case and the fix."""


# ----------------------------------------------------------------------------------------------------------
# metric functions
# ----------------------------------------------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS / Windows
        return max(1, os.cpu_count() or 1)


def _as_mask(array: Any, name: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a numeric or boolean array, got dtype {arr.dtype}")
    # Like medpy: every non-zero value is foreground.
    return np.atleast_1d(arr if arr.dtype == bool else arr != 0)


def _validate_pair(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_mask(pred, "pred")
    r = _as_mask(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref differ in shape: {p.shape} vs {r.shape}")
    return p, r


def _validate_spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray | None:
    if spacing is None:
        return None
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.shape != (ndim,):
        raise ValueError(f"spacing needs one value per array axis ({ndim}), got {tuple(np.atleast_1d(spacing))}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be positive and finite, got {tuple(sp.tolist())}")
    return sp


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the foreground (one pass in C), None if the mask is empty."""
    found = ndimage.find_objects(mask.view(np.uint8), max_label=1)
    return found[0] if found else None


def _surface(mask: np.ndarray) -> np.ndarray:
    """The mask minus its erosion by the connectivity-1 cross, voxels outside the array being background.

    This is medpy's surface (``mask ^ binary_erosion(mask, generate_binary_structure(ndim, 1))``, whose
    border value is 0), written with shifted slices because that is several times faster.
    """
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = mask.copy()
    inner = [slice(1, -1)] * mask.ndim
    for axis in range(mask.ndim):
        for start in (0, 2):
            window = list(inner)
            window[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(window)]
    return mask & ~interior


def _distance_to(border: np.ndarray, spacing: np.ndarray | None, threads: int) -> np.ndarray:
    """Exact Euclidean distance of every voxel to the nearest voxel of ``border``."""
    target = ~border
    if border.ndim <= 3:
        import edt

        if spacing is None:
            anisotropy: Any = 1.0 if border.ndim == 1 else (1.0,) * border.ndim
        else:
            anisotropy = float(spacing[0]) if border.ndim == 1 else tuple(float(s) for s in spacing)
        return edt.edt(target, anisotropy=anisotropy, black_border=False, parallel=threads)
    return ndimage.distance_transform_edt(target, sampling=spacing)


def _surface_distances(
    pred: np.ndarray,
    ref: np.ndarray,
    spacings: Sequence[np.ndarray | None],
    threads: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per spacing: (distances pred surface -> ref surface, distances ref surface -> pred surface).

    Both masks must be non-empty. Cropping to the joint bounding box keeps the values exact: every surface
    voxel of either mask lies inside it, and outside it both masks are background, which the zero padding in
    :func:`_surface` reproduces.
    """
    threads = threads or _cpu_count()
    box = _bbox(pred | ref)
    assert box is not None  # callers check emptiness first
    pred_surface = _surface(pred[box])
    ref_surface = _surface(ref[box])

    unit: tuple[np.ndarray, np.ndarray] | None = None
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for spacing in spacings:
        isotropic = spacing is None or bool(np.all(spacing == spacing[0]))
        if isotropic:
            # One transform in voxel units serves every isotropic spacing (a pure scale).
            if unit is None:
                unit = (
                    _distance_to(ref_surface, None, threads)[pred_surface].astype(np.float64),
                    _distance_to(pred_surface, None, threads)[ref_surface].astype(np.float64),
                )
            scale = 1.0 if spacing is None else float(spacing[0])
            out.append((unit[0] * scale, unit[1] * scale))
        else:
            out.append(
                (
                    _distance_to(ref_surface, spacing, threads)[pred_surface].astype(np.float64),
                    _distance_to(pred_surface, spacing, threads)[ref_surface].astype(np.float64),
                )
            )
    return out


def dice(pred: Any, ref: Any) -> float:
    """Dice coefficient 2|P∩R| / (|P|+|R|) of two masks (non-zero = foreground), as medpy's ``dc``.

    Returns NaN when both masks are empty (nnU-Net's convention; medpy returns 1.0 there).
    """
    p, r = _validate_pair(pred, ref)
    n_p, n_r = np.count_nonzero(p), np.count_nonzero(r)
    if n_p + n_r == 0:
        return math.nan
    return 2.0 * np.count_nonzero(p & r) / float(n_p + n_r)


def jaccard(pred: Any, ref: Any) -> float:
    """Jaccard index |P∩R| / |P∪R| of two masks, as medpy's ``jc``; NaN when both are empty."""
    p, r = _validate_pair(pred, ref)
    union = np.count_nonzero(p | r)
    if union == 0:
        return math.nan
    return np.count_nonzero(p & r) / float(union)


def _distances_or_nan(
    pred: Any, ref: Any, spacing: float | Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    p, r = _validate_pair(pred, ref)
    sp = _validate_spacing(spacing, p.ndim)
    if not p.any() or not r.any():
        return None
    return _surface_distances(p, r, [sp])[0]


def hd95(pred: Any, ref: Any, spacing: float | Sequence[float] | None = None) -> float:
    """95th percentile of the surface distances in both directions, as medpy's ``hd95``.

    ``spacing`` is per array axis (a scalar means isotropic); None means voxel units. NaN if a mask is empty.
    """
    d = _distances_or_nan(pred, ref, spacing)
    if d is None:
        return math.nan
    return float(np.percentile(np.concatenate(d), 95))


def asd(pred: Any, ref: Any, spacing: float | Sequence[float] | None = None) -> float:
    """Mean distance from the prediction's surface to the reference's surface (one direction), as medpy's
    ``asd(pred, ref)`` and the published SASSNet code. NaN if a mask is empty."""
    d = _distances_or_nan(pred, ref, spacing)
    if d is None:
        return math.nan
    return float(d[0].mean())


def assd(pred: Any, ref: Any, spacing: float | Sequence[float] | None = None) -> float:
    """Average symmetric surface distance: mean over the surface distances of both directions pooled, as
    medpy's ``assd``. NaN if a mask is empty."""
    d = _distances_or_nan(pred, ref, spacing)
    if d is None:
        return math.nan
    return float(np.concatenate(d).mean())


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """(largest 26-connected component, whether anything was removed)."""
    box = _bbox(mask)
    if box is None:
        return mask, False
    sub = mask[box]
    # Full connectivity (26 in 3D) like the paper's NMS and nnU-Net's post-processing.
    labels, n = ndimage.label(sub, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if n <= 1:
        return mask, False
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = np.zeros(mask.shape, dtype=bool)
    # argmax takes the first of equally large components, so the result is deterministic.
    out[box] = labels == int(sizes.argmax())
    return out, True


def keep_largest_component(mask: Any) -> np.ndarray:
    """Boolean mask of the largest 26-connected (full connectivity) component of ``mask`` (non-zero =
    foreground); an empty mask stays empty."""
    m = _as_mask(mask, "mask")
    out, changed = _largest_component(m)
    return out.copy() if not changed else out


# ----------------------------------------------------------------------------------------------------------
# scoring a case
# ----------------------------------------------------------------------------------------------------------


def _score_label(pred: np.ndarray, ref: np.ndarray, spacing_mm: np.ndarray, threads: int) -> dict[str, Any]:
    n_p = int(np.count_nonzero(pred))
    n_r = int(np.count_nonzero(ref))
    if n_p == 0 and n_r == 0:
        return {**{m: math.nan for m in METRICS}, "status": "both_empty"}
    inter = int(np.count_nonzero(pred & ref))
    scores: dict[str, Any] = {
        "dice": 2.0 * inter / (n_p + n_r),
        "jaccard": inter / float(n_p + n_r - inter),
    }
    if n_p == 0 or n_r == 0:
        scores.update({m: None for m in DISTANCE_METRICS})
        scores["status"] = "empty_prediction" if n_p == 0 else "empty_reference"
        return scores
    (v_pr, v_rp), (m_pr, m_rp) = _surface_distances(pred, ref, [None, spacing_mm], threads)
    for unit, (d_pr, d_rp) in (("voxel", (v_pr, v_rp)), ("mm", (m_pr, m_rp))):
        both = np.concatenate([d_pr, d_rp])
        scores[f"hd95_{unit}"] = float(np.percentile(both, 95))
        scores[f"asd_{unit}"] = float(d_pr.mean())
        scores[f"assd_{unit}"] = float(both.mean())
    scores["status"] = "ok"
    return scores


def _short_itk_error(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def _read_header(path: Path, case: str, role: str) -> tuple[tuple[int, ...], tuple[float, ...], int]:
    """(size in x,y,z order, spacing in x,y,z order, components per pixel) without reading the pixels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise EvaluationError(
            f"case {case}: cannot read the {role} {path} ({_short_itk_error(exc)}); replace it with a "
            "readable image"
        ) from None
    return tuple(reader.GetSize()), tuple(reader.GetSpacing()), reader.GetNumberOfComponents()


def _read_labels(path: Path, case: str, role: str) -> tuple[np.ndarray, np.ndarray]:
    """(label array in numpy (z,y,x) order, spacing per array axis)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise EvaluationError(
            f"case {case}: cannot read the {role} {path} ({_short_itk_error(exc)}); replace it with a "
            "readable image"
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(
            f"case {case}: the {role} {path} has {image.GetNumberOfComponentsPerPixel()} components per "
            "voxel; save a single-component label map"
        )
    arr = sitk.GetArrayFromImage(image)
    # SimpleITK's spacing is (x, y, z); the array is (z, y, x).
    spacing = np.asarray(image.GetSpacing()[::-1], dtype=np.float64)
    return _integer_labels(arr, path, case, role), spacing


def _integer_labels(arr: np.ndarray, path: Path, case: str, role: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            example = arr[bad].flat[0]
            raise EvaluationError(
                f"case {case}: the {role} {path} has non-integer label values (e.g. {example:g}); save label "
                "maps with integer labels (argmax or threshold probabilities first)"
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise EvaluationError(f"case {case}: the {role} {path} has pixel type {arr.dtype}; save integer labels")
    if arr.size == 0:
        raise EvaluationError(f"case {case}: the {role} {path} is empty (size 0); replace it")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise EvaluationError(
            f"case {case}: the {role} {path} has a negative label ({lo:g}); labels must be integers >= 0"
        )
    if np.issubdtype(arr.dtype, np.floating) or hi > np.iinfo(np.int32).max:
        if hi > np.iinfo(np.int32).max:
            raise EvaluationError(f"case {case}: the {role} {path} has a label > 2^31 ({hi:g}); relabel it")
        return arr.astype(np.uint8 if hi < 256 else np.int32)
    return arr


def _present_labels(arr: np.ndarray) -> set[int]:
    hi = int(arr.max())
    if hi <= 65535:
        # bincount is one pass; np.unique sorts the whole volume.
        return {int(v) for v in np.flatnonzero(np.bincount(arr.ravel(), minlength=1))}
    return {int(v) for v in np.unique(arr)}


@dataclass(frozen=True)
class _CaseTask:
    case: str
    ref_path: Path
    pred_path: Path
    labels: tuple[int, ...] | None
    variants: tuple[str, ...]
    threads: int


def _score_case(task: _CaseTask) -> dict[str, Any]:
    """Read one pair and score every variant; returns the labels present in the reference too."""
    ref, ref_spacing = _read_labels(task.ref_path, task.case, "reference")
    pred, pred_spacing = _read_labels(task.pred_path, task.case, "prediction")
    _check_geometry(task.case, ref.shape[::-1], pred.shape[::-1], ref_spacing[::-1], pred_spacing[::-1])
    ref_labels = _present_labels(ref) - {0}
    if task.labels is not None:
        labels = sorted(task.labels)
    else:
        # The final label set (all labels of all references) is known only after every case is read, so a
        # label seen in this prediction is scored too in case another reference has it.
        labels = sorted(ref_labels | (_present_labels(pred) - {0}))
    scores: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in task.variants}
    for label in labels:
        ref_l = ref == label
        pred_l = pred == label
        raw = None
        if VARIANT_RAW in task.variants:
            raw = _score_label(pred_l, ref_l, ref_spacing, task.threads)
            scores[VARIANT_RAW][label] = raw
        if VARIANT_LCC in task.variants:
            kept, changed = _largest_component(pred_l)
            if not changed and raw is not None:
                scores[VARIANT_LCC][label] = dict(raw)
            else:
                scores[VARIANT_LCC][label] = _score_label(kept, ref_l, ref_spacing, task.threads)
    return {"case": task.case, "ref_labels": sorted(ref_labels), "scores": scores}


def _check_geometry(
    case: str,
    ref_size: Sequence[int],
    pred_size: Sequence[int],
    ref_spacing: Sequence[float],
    pred_spacing: Sequence[float],
) -> None:
    """Sizes and spacings in the header's (x, y, z) order, as users see them in ITK tools."""
    if tuple(ref_size) != tuple(pred_size):
        raise EvaluationError(
            f"case {case}: prediction size {tuple(int(s) for s in pred_size)} differs from reference size "
            f"{tuple(int(s) for s in ref_size)} (x, y, z); predict on the reference's grid or resample the "
            "prediction onto it"
        )
    rs = np.asarray(ref_spacing, dtype=np.float64)
    ps = np.asarray(pred_spacing, dtype=np.float64)
    if not np.all(np.abs(rs - ps) <= SPACING_RTOL * np.maximum(np.abs(rs), np.abs(ps))):
        raise EvaluationError(
            f"case {case}: prediction spacing {_fmt_tuple(ps)} differs from reference spacing {_fmt_tuple(rs)} "
            "(x, y, z); resample the prediction onto the reference's grid or fix its header"
        )


def _fmt_tuple(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


# ----------------------------------------------------------------------------------------------------------
# folders and the report
# ----------------------------------------------------------------------------------------------------------


def _case_id(name: str) -> str | None:
    lower = name.lower()
    for ending in IMAGE_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _list_images(folder: str, role: str, flag: str) -> dict[str, Path]:
    path = Path(folder)
    if not path.exists():
        raise EvaluationError(f"the {role} folder {folder} does not exist; check {flag}")
    if not path.is_dir():
        raise EvaluationError(f"{folder} is not a folder; {flag} takes the folder that holds the {role} files")
    found: dict[str, Path] = {}
    for entry in sorted(path.iterdir()):
        case = _case_id(entry.name)
        # nnU-Net leaves plans.json, dataset.json, *.npz, *.pkl, ... beside the predictions: not images.
        if case is None or not entry.is_file():
            continue
        if case in found:
            raise EvaluationError(
                f"case {case}: two {role} files ({found[case].name}, {entry.name}) in {folder}; keep one"
            )
        found[case] = entry
    if not found:
        raise EvaluationError(
            f"no {role} images ({', '.join(IMAGE_ENDINGS)}) in {folder}; point {flag} at the folder with the "
            f"{role} label maps"
        )
    return found


def _first_and_more(items: list[str]) -> str:
    more = len(items) - 1
    return f" (and {more} more: {', '.join(items[1:6])}{', ...' if more > 5 else ''})" if more else ""


def _match_cases(ref_dir: str, pred_dir: str) -> list[tuple[str, Path, Path]]:
    refs = _list_images(ref_dir, "reference", "-ref")
    preds = _list_images(pred_dir, "prediction", "-pred")
    missing = sorted(set(refs) - set(preds))
    if missing:
        hint = ""
        if all(c.endswith("_0000") for c in refs):
            hint = " (the reference names end in _0000: is -ref the images folder instead of the labels folder?)"
        raise EvaluationError(
            f"case {missing[0]}: no prediction in {pred_dir}{_first_and_more(missing)}; predict it or remove "
            f"the reference from {ref_dir}{hint}"
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        raise EvaluationError(
            f"case {extra[0]}: prediction {preds[extra[0]].name} has no reference in {ref_dir}"
            f"{_first_and_more(extra)}; remove it from {pred_dir} or add its reference"
        )
    return [(case, refs[case], preds[case]) for case in sorted(refs)]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _mean_over_labels(values: list[Any]) -> Any:
    present = [v for v in values if not _is_missing(v)]
    if present:
        return float(np.mean(present))
    # Undefined distances (null) win over "both empty" (NaN) so that a null is never hidden.
    return None if any(v is None for v in values) else math.nan


def _stats(values: list[Any]) -> tuple[Any, Any, int]:
    present = [v for v in values if not _is_missing(v)]
    if not present:
        return None, None, 0
    return float(np.mean(present)), float(np.std(present)), len(present)


def _variant_report(
    variant: str, per_case: dict[str, dict[int, dict[str, Any]]], labels: list[int]
) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for case in sorted(per_case):
        scores = per_case[case]
        per_label = {}
        for label in labels:
            # A label absent from both files of this case was not scored there: both empty.
            per_label[str(label)] = scores.get(label, {**{m: math.nan for m in METRICS}, "status": "both_empty"})
        top = {m: _mean_over_labels([per_label[str(l)][m] for l in labels]) for m in METRICS}
        cases[case] = {**top, "per_label": per_label}

    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    n: dict[str, Any] = {}
    for m in METRICS:
        mean[m], std[m], n[m] = _stats([c[m] for c in cases.values()])
    for target in (mean, std, n):
        target["per_label"] = {}
    for label in labels:
        key = str(label)
        ml, sl, nl = {}, {}, {}
        for m in METRICS:
            ml[m], sl[m], nl[m] = _stats([c["per_label"][key][m] for c in cases.values()])
        mean["per_label"][key], std["per_label"][key], n["per_label"][key] = ml, sl, nl

    empty: dict[str, dict[str, list[int]]] = {"empty_prediction": {}, "empty_reference": {}, "both_empty": {}}
    for case, entry in cases.items():
        for key, scores in entry["per_label"].items():
            if scores["status"] in empty:
                empty[scores["status"]].setdefault(case, []).append(int(key))
    counts = {
        "cases": len(cases),
        **{status: sum(len(v) for v in by_case.values()) for status, by_case in empty.items()},
    }
    return {
        "variant": variant,
        "cases": cases,
        "mean": mean,
        "std": std,
        "n": n,
        "counts": counts,
        "empty": empty,
    }


def evaluate_folders(
    ref_dir: str,
    pred_dir: str,
    labels: list[int] | None = None,
    largest_component: bool = False,
    num_processes: int = 1,
    both: bool = False,
) -> dict:
    """Score every prediction in ``pred_dir`` against the reference of the same case in ``ref_dir``.

    Cases are matched by file name minus the image ending; other files are ignored. ``labels`` defaults to
    every non-zero label found in the references. ``largest_component`` scores the predictions after keeping
    each label's largest 26-connected component; ``both`` scores both variants (the top level holds the raw
    one, ``report["largest_component"]`` the other). Raises :class:`EvaluationError` on bad input, before
    anything is returned.
    """
    if labels is not None:
        labels = [int(l) for l in labels]
        bad = [l for l in labels if l < 1]
        if bad:
            raise EvaluationError(
                f"label {bad[0]} cannot be evaluated (0 is background); list foreground labels >= 1 with -l"
            )
        if len(set(labels)) != len(labels):
            raise EvaluationError(f"labels {labels} repeat a label; list each label once")
        labels = sorted(labels)
    if num_processes < 1:
        raise EvaluationError(f"num_processes (-np) must be >= 1, got {num_processes}")

    pairs = _match_cases(ref_dir, pred_dir)
    # Check every header first: a wrong grid in the last case should not cost the time of all the others.
    for case, ref_path, pred_path in pairs:
        ref_size, ref_spacing, ref_comp = _read_header(ref_path, case, "reference")
        pred_size, pred_spacing, pred_comp = _read_header(pred_path, case, "prediction")
        for role, path, comp in (("reference", ref_path, ref_comp), ("prediction", pred_path, pred_comp)):
            if comp != 1:
                raise EvaluationError(
                    f"case {case}: the {role} {path} has {comp} components per voxel; save a single-component "
                    "label map"
                )
        _check_geometry(case, ref_size, pred_size, ref_spacing, pred_spacing)

    variants = (VARIANT_RAW, VARIANT_LCC) if both else ((VARIANT_LCC,) if largest_component else (VARIANT_RAW,))
    workers = min(num_processes, len(pairs))
    threads = max(1, _cpu_count() // workers)
    tasks = [
        _CaseTask(case, ref_path, pred_path, tuple(labels) if labels else None, variants, threads)
        for case, ref_path, pred_path in pairs
    ]
    if workers == 1:
        results = [_score_case(t) for t in tasks]
    else:
        # spawn: forking a process that already runs SimpleITK's and edt's thread pools is not safe.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        try:
            futures = [pool.submit(_score_case, t) for t in tasks]
            results = [f.result() for f in futures]
        finally:
            # On the first bad case, drop the cases not started yet instead of scoring them for nothing.
            pool.shutdown(wait=True, cancel_futures=True)

    if labels is None:
        labels = sorted(set().union(*(r["ref_labels"] for r in results)))
        if not labels:
            raise EvaluationError(
                f"no foreground label in any reference in {ref_dir}; pass the labels to score with -l"
            )
    warnings = []
    for label in labels:
        statuses = {r["scores"][variants[0]].get(label, {"status": "both_empty"})["status"] for r in results}
        if statuses == {"both_empty"}:
            warnings.append(f"label {label} is empty in every reference and prediction")

    sub_reports = {
        v: _variant_report(v, {r["case"]: r["scores"][v] for r in results}, labels) for v in variants
    }
    report: dict[str, Any] = {
        "settings": {
            "ref_dir": str(Path(ref_dir).resolve()),
            "pred_dir": str(Path(pred_dir).resolve()),
            "labels": labels,
            "largest_component": bool(largest_component and not both),
            "both_variants": bool(both),
            "metrics": list(METRICS),
            "surface": "mask XOR erosion with the connectivity-1 structure (medpy, connectivity=1)",
            "hd95": "95th percentile of the surface distances of both directions pooled (medpy hd95)",
            "asd": "mean distance from the prediction's surface to the reference's (medpy asd; published code)",
            "assd": "mean of the surface distances of both directions pooled (medpy assd)",
            "spacing": "voxel metrics use spacing 1; mm metrics use the reference image's spacing",
            "largest_component_connectivity": "full (26-connected in 3D), per label, prediction only",
            "std": "population standard deviation over cases (ddof=0)",
        },
        "note": EMPTY_HANDLING_NOTE,
        "warnings": warnings,
    }
    report.update(sub_reports[variants[0]])
    if both:
        report[VARIANT_LCC] = sub_reports[VARIANT_LCC]
    return report


def _variants_of(reports: dict | Sequence[dict]) -> list[dict]:
    items = [reports] if isinstance(reports, dict) else list(reports)
    out = []
    for r in items:
        out.append(r)
        if isinstance(r.get(VARIANT_LCC), dict):
            out.append(r[VARIANT_LCC])
    return out


def _fmt(value: Any, scale: float = 1.0) -> str:
    return "n/a" if _is_missing(value) else f"{value * scale:.2f}"


_TABLE_COLUMNS = (
    ("Dice (%)", "dice", 100.0),
    ("Jaccard (%)", "jaccard", 100.0),
    ("95HD (voxel)", "hd95_voxel", 1.0),
    ("ASD (voxel)", "asd_voxel", 1.0),
    ("95HD (mm)", "hd95_mm", 1.0),
    ("ASD (mm)", "asd_mm", 1.0),
    ("ASSD (voxel)", "assd_voxel", 1.0),
    ("ASSD (mm)", "assd_mm", 1.0),
)


def format_table(report: dict | Sequence[dict]) -> str:
    """Markdown table in the paper's format (Dice %, Jaccard %, 95HD, ASD; then mm and ASSD), one row per
    variant. Accepts one report or several (e.g. a raw and a ``--largest-component`` report)."""
    variants = _variants_of(report)
    header = "| Variant | Cases | " + " | ".join(c[0] for c in _TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(_TABLE_COLUMNS) + 2)]
    for v in variants:
        title = VARIANT_TITLES.get(v.get("variant", VARIANT_RAW), v.get("variant", ""))
        cells = [_fmt(v["mean"][key], scale) for _, key, scale in _TABLE_COLUMNS]
        lines.append(f"| {title} | {v['counts']['cases']} | " + " | ".join(cells) + " |")
    labels = list(variants[0]["mean"].get("per_label", {})) if variants else []
    if len(labels) > 1:
        lines += ["", "| Variant | Label | " + " | ".join(c[0] for c in _TABLE_COLUMNS) + " |"]
        lines.append("|" + "---|" * (len(_TABLE_COLUMNS) + 2))
        for v in variants:
            title = VARIANT_TITLES.get(v.get("variant", VARIANT_RAW), v.get("variant", ""))
            for label in labels:
                mean = v["mean"]["per_label"][label]
                cells = [_fmt(mean[key], scale) for _, key, scale in _TABLE_COLUMNS]
                lines.append(f"| {title} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for v in variants:
        title = VARIANT_TITLES.get(v.get("variant", VARIANT_RAW), v.get("variant", ""))
        c = v["counts"]
        lines.append(
            f"{title}: means over cases; distances over {v['n']['hd95_voxel']} of {c['cases']} cases. "
            f"Empty predictions: {c['empty_prediction']} (Dice 0, distances undefined and left out, not 0), "
            f"empty references: {c['empty_reference']}, both empty: {c['both_empty']} (left out)."
        )
    lines.append("ASD: prediction surface to reference surface (medpy asd, as in the published code); "
                 "ASSD: symmetric.")
    return "\n".join(lines) + "\n"


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _csv_text(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "case", "label", "status", *METRICS])
    for v in _variants_of(report):
        for case, entry in v["cases"].items():
            per_label = entry["per_label"]
            statuses = sorted({s["status"] for s in per_label.values()})
            status = statuses[0] if len(statuses) == 1 else "mixed"
            writer.writerow([v["variant"], case, "all", status, *(_csv_cell(entry[m]) for m in METRICS)])
            if len(per_label) > 1:
                for label, scores in per_label.items():
                    writer.writerow(
                        [v["variant"], case, label, scores["status"], *(_csv_cell(scores[m]) for m in METRICS)]
                    )
    return buffer.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else repr(float(value))


def report_paths(output_json: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The JSON, CSV and Markdown paths that :func:`write_report` writes for ``output_json``."""
    out = Path(output_json)
    stem = out.name[: -len(".json")] if out.name.lower().endswith(".json") else out.name
    return out, out.with_name(stem + ".csv"), out.with_name(stem + ".md")


def write_report(report: dict, output_json: str) -> None:
    """Write the report as JSON to ``output_json`` and, beside it, the per-case CSV and the Markdown table
    (same name, endings .csv and .md). Each file appears complete or not at all (temp file + os.replace)."""
    paths = report_paths(output_json)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    # NaN (both empty) is written as NaN, as nnU-Net's summary.json does; Python's json reads it back.
    texts = (
        json.dumps(_json_ready(report), indent=2, allow_nan=True) + "\n",
        _csv_text(report),
        format_table(report),
    )
    temps: list[str] = []
    try:
        for path, text in zip(paths, texts):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append(tmp)
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
        for path, tmp in zip(paths, temps):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_sassnet_evaluate",
        description=(
            "Score predicted label maps against references with the SASSNet paper's metrics: Dice, Jaccard, "
            "95% Hausdorff distance, ASD (prediction -> reference, as the published code) and ASSD, in voxel "
            "units and in mm. Writes a JSON report, a per-case CSV and a Markdown table, and prints the table."
        ),
        epilog=(
            "Cases are matched by file name minus the ending (" + ", ".join(IMAGE_ENDINGS) + "); other files "
            "in the folders (plans.json, *.npz, *.pkl, ...) are ignored. Empty predictions get Dice 0 and "
            "undefined distances that are counted, not averaged as 0. Exit code 2 on bad input, with nothing "
            "written."
        ),
    )
    parser.add_argument("-ref", required=True, help="folder with the reference label maps (e.g. labelsTs)")
    parser.add_argument("-pred", required=True, help="folder with the predicted label maps")
    parser.add_argument(
        "-o",
        default=None,
        metavar="JSON",
        help=(
            "output JSON; the .csv and .md are written beside it with the same name. Default: "
            "<pred>/report.json, or <pred>/report_largest_component.json with --largest-component"
        ),
    )
    parser.add_argument(
        "-l",
        nargs="+",
        type=int,
        default=None,
        metavar="LABEL",
        help="labels to score (default: every non-zero label in the references)",
    )
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument(
        "--largest-component",
        action="store_true",
        help="keep only the largest 26-connected component of each predicted label before scoring (the paper's NMS)",
    )
    variant.add_argument(
        "--both", action="store_true", help="score without and with --largest-component in one run (two table rows)"
    )
    parser.add_argument(
        "-np", type=int, default=1, metavar="N", help="processes reading and scoring cases in parallel (default 1)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 success, 2 bad input)."""
    args = _parser().parse_args(argv)
    if args.o is not None:
        output = Path(args.o)
    else:
        name = "report_largest_component.json" if args.largest_component else "report.json"
        output = Path(args.pred) / name
    try:
        if not output.name.lower().endswith(".json"):
            raise EvaluationError(f"-o {output} must end in .json (the .csv and .md are written beside it)")
        existing = [p for p in report_paths(output) if p.exists()]
        if existing and not args.overwrite:
            raise EvaluationError(f"{existing[0]} exists; pass --overwrite to replace it or choose another -o")
        start = time.perf_counter()
        report = evaluate_folders(
            args.ref,
            args.pred,
            labels=args.l,
            largest_component=args.largest_component,
            num_processes=args.np,
            both=args.both,
        )
        elapsed = time.perf_counter() - start
        try:
            write_report(report, str(output))
        except OSError as exc:
            raise EvaluationError(
                f"cannot write the report {output} ({exc.strerror or exc}); choose another -o"
            ) from None
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(format_table(report), end="")
    json_path, csv_path, md_path = report_paths(output)
    print(
        f"\n{report['counts']['cases']} cases scored in {elapsed:.1f} s; "
        f"wrote {json_path}, {csv_path.name}, {md_path.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
