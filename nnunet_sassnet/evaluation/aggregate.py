"""From per-case, per-label scores to a variant's report: case means over labels, then means, std and counts
over cases. Missing values (None: undefined distances; NaN: both masks empty) are left out, never taken as 0."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from nnunet_sassnet.evaluation.scoring import METRICS, both_empty

__all__ = ["is_missing", "variant_report"]


def is_missing(value: Any) -> bool:
    """True for None (undefined) and NaN (both masks empty)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _mean_over_labels(values: list[Any]) -> Any:
    present = [v for v in values if not is_missing(v)]
    if present:
        return float(np.mean(present))
    # Undefined distances (null) win over "both empty" (NaN) so that a null is never hidden.
    return None if any(v is None for v in values) else math.nan


def _stats(values: list[Any]) -> tuple[Any, Any, int]:
    present = [v for v in values if not is_missing(v)]
    if not present:
        return None, None, 0
    return float(np.mean(present)), float(np.std(present)), len(present)


def _summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(mean, std, n) per metric over ``rows``, each a dict of metric values."""
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    n: dict[str, Any] = {}
    for m in METRICS:
        mean[m], std[m], n[m] = _stats([row[m] for row in rows])
    return mean, std, n


def variant_report(
    variant: str, per_case: dict[str, dict[int, dict[str, Any]]], labels: list[int]
) -> dict[str, Any]:
    """The report of one variant (raw or largest component).

    Args:
        variant: the variant's name, stored in the report.
        per_case: case -> label -> scores (from :func:`~nnunet_sassnet.evaluation.scoring.score_label`).
        labels: the labels to report; a label missing from a case counts as both empty there.
    """
    cases: dict[str, Any] = {}
    for case in sorted(per_case):
        scores = per_case[case]
        # A label absent from both files of this case was not scored there: both empty.
        per_label = {str(label): scores.get(label, both_empty()) for label in labels}
        top = {m: _mean_over_labels([per_label[str(l)][m] for l in labels]) for m in METRICS}
        cases[case] = {**top, "per_label": per_label}

    mean, std, n = _summarise(list(cases.values()))
    for target in (mean, std, n):
        target["per_label"] = {}
    for label in labels:
        key = str(label)
        ml, sl, nl = _summarise([c["per_label"][key] for c in cases.values()])
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
