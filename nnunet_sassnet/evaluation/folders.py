"""Scoring a folder of predictions against a folder of references: the evaluator's library entry point."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.evaluation.aggregate import variant_report
from nnunet_sassnet.evaluation.images import check_geometry, match_cases, read_header
from nnunet_sassnet.evaluation.scoring import METRICS, VARIANT_LCC, VARIANT_RAW, CaseTask, score_case
from nnunet_sassnet.nnunet_tools import usable_cores

__all__ = ["EMPTY_HANDLING_NOTE", "evaluate_folders"]

EMPTY_HANDLING_NOTE = (
    "Prediction empty, reference not: Dice 0 and Jaccard 0; the distances are undefined and reported as null, "
    "left out of the means and standard deviations and counted under counts.empty_prediction. The published "
    "SASSNet code scored such cases with distance 0, which flatters the mean 95HD and ASD; these values are "
    "therefore not directly comparable when predictions are empty. Reference empty, prediction not: Dice 0, "
    "Jaccard 0, distances null (counts.empty_reference). Both empty: NaN for every metric, left out of the "
    "means (as nnU-Net does), counted under counts.both_empty. A case's top-level metrics are the mean over "
    "the evaluated labels that have a value; means and std (population, ddof=0) are over cases."
)


def _checked_labels(labels: list[int] | None) -> list[int] | None:
    if labels is None:
        return None
    labels = [int(l) for l in labels]
    bad = [l for l in labels if l < 1]
    if bad:
        raise UserInputError(f"label {bad[0]} cannot be evaluated (0 is background); list foreground labels >= 1 "
                             "with -l")
    if len(set(labels)) != len(labels):
        raise UserInputError(f"labels {labels} repeat a label; list each label once")
    return sorted(labels)


def _score_all(tasks: list[CaseTask], workers: int) -> list[dict[str, Any]]:
    if workers == 1:
        return [score_case(t) for t in tasks]
    # spawn: forking a process that already runs SimpleITK's and edt's thread pools is not safe.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        futures = [pool.submit(score_case, t) for t in tasks]
        return [f.result() for f in futures]
    finally:
        # On the first bad case, drop the cases not started yet instead of scoring them for nothing.
        pool.shutdown(wait=True, cancel_futures=True)


def _settings(ref_dir: str, pred_dir: str, labels: list[int], largest_component: bool, both: bool) -> dict:
    return {
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

    Cases are matched by file name minus the image ending; other files are ignored.

    Args:
        ref_dir, pred_dir: the folders of reference and predicted label maps.
        labels: foreground labels to score; default every non-zero label found in the references.
        largest_component: score the predictions after keeping each label's largest 26-connected component.
        num_processes: cases read and scored in parallel.
        both: score both variants; the top level holds the raw one, ``report["largest_component"]`` the other.

    Raises:
        UserInputError: bad input (labels, folders, files, grids), before anything is returned.
    """
    labels = _checked_labels(labels)
    if num_processes < 1:
        raise UserInputError(f"num_processes (-np) must be >= 1, got {num_processes}")

    pairs = match_cases(ref_dir, pred_dir)
    # Check every header first: a wrong grid in the last case should not cost the time of all the others.
    for case, ref_path, pred_path in pairs:
        ref_size, ref_spacing = read_header(ref_path, case, "reference")
        pred_size, pred_spacing = read_header(pred_path, case, "prediction")
        check_geometry(case, ref_size, pred_size, ref_spacing, pred_spacing)

    variants = (VARIANT_RAW, VARIANT_LCC) if both else ((VARIANT_LCC,) if largest_component else (VARIANT_RAW,))
    workers = min(num_processes, len(pairs))
    threads = max(1, usable_cores() // workers)
    tasks = [CaseTask(case, ref_path, pred_path, tuple(labels) if labels else None, variants, threads)
             for case, ref_path, pred_path in pairs]
    results = _score_all(tasks, workers)

    if labels is None:
        labels = sorted(set().union(*(r["ref_labels"] for r in results)))
        if not labels:
            raise UserInputError(f"no foreground label in any reference in {ref_dir}; pass the labels to score "
                                 "with -l")
    warnings = []
    for label in labels:
        statuses = {r["scores"][variants[0]].get(label, {"status": "both_empty"})["status"] for r in results}
        if statuses == {"both_empty"}:
            warnings.append(f"label {label} is empty in every reference and prediction")

    sub_reports = {v: variant_report(v, {r["case"]: r["scores"][v] for r in results}, labels) for v in variants}
    report: dict[str, Any] = {
        "settings": _settings(ref_dir, pred_dir, labels, largest_component, both),
        "note": EMPTY_HANDLING_NOTE,
        "warnings": warnings,
    }
    report.update(sub_reports[variants[0]])
    if both:
        report[VARIANT_LCC] = sub_reports[VARIANT_LCC]
    return report
