"""The evaluator's report as text and files: the Markdown table in the paper's format, the per-case CSV and
the JSON, written side by side."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nnunet_sassnet.evaluation.aggregate import is_missing
from nnunet_sassnet.evaluation.scoring import METRICS, VARIANT_LCC, VARIANT_RAW

__all__ = ["VARIANT_TITLES", "format_table", "report_paths", "write_report"]

VARIANT_TITLES = {VARIANT_RAW: "w/o NMS", VARIANT_LCC: "w/ NMS (largest component)"}
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


def _variants_of(reports: dict | Sequence[dict]) -> list[dict]:
    """The variant reports of one report or several, the ``--both`` one's largest-component part included."""
    items = [reports] if isinstance(reports, dict) else list(reports)
    out = []
    for r in items:
        out.append(r)
        if isinstance(r.get(VARIANT_LCC), dict):
            out.append(r[VARIANT_LCC])
    return out


def _title(variant: dict) -> str:
    return VARIANT_TITLES.get(variant.get("variant", VARIANT_RAW), variant.get("variant", ""))


def _header(first: str, second: str) -> list[str]:
    return [f"| {first} | {second} | " + " | ".join(c[0] for c in _TABLE_COLUMNS) + " |",
            "|" + "---|" * (len(_TABLE_COLUMNS) + 2)]


def _cells(mean: dict[str, Any]) -> str:
    return " | ".join("n/a" if is_missing(mean[key]) else f"{mean[key] * scale:.2f}"
                      for _, key, scale in _TABLE_COLUMNS)


def format_table(report: dict | Sequence[dict]) -> str:
    """Markdown table in the paper's format (Dice %, Jaccard %, 95HD, ASD; then mm and ASSD), one row per
    variant. Accepts one report or several (e.g. a raw and a ``--largest-component`` report)."""
    variants = _variants_of(report)
    lines = _header("Variant", "Cases")
    for v in variants:
        lines.append(f"| {_title(v)} | {v['counts']['cases']} | " + _cells(v["mean"]) + " |")
    labels = list(variants[0]["mean"].get("per_label", {})) if variants else []
    if len(labels) > 1:
        lines += ["", *_header("Variant", "Label")]
        for v in variants:
            for label in labels:
                lines.append(f"| {_title(v)} | {label} | " + _cells(v["mean"]["per_label"][label]) + " |")
    lines.append("")
    for v in variants:
        c = v["counts"]
        lines.append(
            f"{_title(v)}: means over cases; distances over {v['n']['hd95_voxel']} of {c['cases']} cases. "
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


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else repr(float(value))


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


def report_paths(output_json: str | os.PathLike) -> tuple[Path, Path, Path]:
    """The JSON, CSV and Markdown paths that :func:`write_report` writes for ``output_json``."""
    out = Path(output_json)
    stem = out.name[: -len(".json")] if out.name.lower().endswith(".json") else out.name
    return out, out.with_name(stem + ".csv"), out.with_name(stem + ".md")


def write_report(report: dict, output_json: str) -> None:
    """Write the report as JSON to ``output_json`` and, beside it, the per-case CSV and the Markdown table
    (same name, endings .csv and .md). Each file appears complete or not at all (temp file + os.replace).

    Raises:
        OSError: a file cannot be written.
    """
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
