"""LA 2018 (Left Atrium) data into an nnU-Net v2 raw dataset with an ``imagesUnlabeled/`` folder.

The input layouts are described in :mod:`.sources`. A conversion runs in two passes: :func:`prepare_la2018`
reads only headers and decides every case's destination, so that most mistakes are reported before anything
is written; :meth:`PreparedConversion.run` reads the voxels, checks the label values and writes into a hidden
temporary folder inside ``nnUNet_raw`` that is renamed into place only when every case has been written. A
failed run therefore leaves ``nnUNet_raw`` as it found it. The library prints nothing: the summary is returned,
and the command line prints it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_sassnet.conversion.planning import Plan, make_plan
from nnunet_sassnet.conversion.sources import UAMT_SPACING_MM, Case, probe_cases
from nnunet_sassnet.conversion.writing import dataset_json, move_into_place, write_cases
from nnunet_sassnet.errors import UserInputError, run_cli

__all__ = ["ConversionResult", "PreparedConversion", "prepare_la2018", "convert_la2018", "build_parser", "main"]

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion made: the dataset folder and the summary of where the cases went."""

    dataset: Path
    summary: str


@dataclass(frozen=True)
class PreparedConversion:
    """A checked conversion whose destinations are decided; nothing is written until :meth:`run`."""

    dataset: Path
    summary: str
    name: str
    split: str
    plan: Plan
    layout: str
    raw: Path
    existing: tuple[Path, ...]  # datasets with the same ID, replaced by run()

    def run(self, progress: bool = True) -> ConversionResult:
        """Write the dataset (a ``Writing`` progress bar on stderr with ``progress``) and move it into place.

        Raises:
            UserInputError: a case cannot be read or written; nothing is left behind.
        """
        created_raw = not self.raw.exists()
        self.raw.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.dataset.name}.tmp-", dir=self.raw))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the dataset's permissions
            write_cases(self.plan, tmp, progress)
            with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
                json.dump(dataset_json(self.name, self.plan, self.layout, self.split), f, indent=4)
            move_into_place(tmp, self.dataset, list(self.existing))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created_raw:
                try:
                    self.raw.rmdir()
                except OSError:
                    pass
            raise
        return ConversionResult(self.dataset, self.summary)


def _examples(ids: Sequence[str], n: int = 3) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def _summary(plan: Plan, cases: list[Case], final: Path, input_dir: Path, spacing_given: bool) -> str:
    layout = cases[0].layout
    n_test_labels = sum(c.has_label for c in plan.test)
    lines = [
        f"LA 2018 -> {final}",
        f"  input: {input_dir} ({len(cases)} cases, "
        f"{'UA-MT h5 layout' if layout == 'h5' else 'challenge NRRD layout'})",
        f"  split {plan.rule}",
        f"  imagesTr + labelsTr : {len(plan.labeled)}",
        f"  imagesUnlabeled     : {len(plan.unlabeled)}",
        f"  imagesTs            : {len(plan.test)} ({n_test_labels} with labelsTs)",
    ]
    if plan.skipped:
        lines.append(f"  not in the split file, not converted: {len(plan.skipped)} "
                     f"({_examples([c.case_id for c in plan.skipped])})")
    for list_name, ids in plan.missing.items():
        lines.append(f"  {list_name} entries missing from the input: {len(ids)}"
                     + (f" ({_examples(ids)})" if ids else ""))
    spacings = Counter(tuple(round(s, 4) for s in c.spacing) for c in cases)
    where_from = ("--spacing" if spacing_given else "UA-MT's default, not stored in the files") if layout == "h5" \
        else "NRRD headers"
    for spacing, count in spacings.most_common():
        lines.append(f"  spacing (x, y, z) mm: {' x '.join(f'{s:g}' for s in spacing)} ({count} cases; {where_from})")
    return "\n".join(lines)


def _raw_folder(raw_dir: str | None) -> Path:
    raw = raw_dir if raw_dir is not None else os.environ.get("nnUNet_raw")
    if not raw:
        raise UserInputError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                             "set_environment_variables.md) and run again")
    raw_path = Path(raw).expanduser().resolve()
    if raw_path.exists() and not raw_path.is_dir():
        raise UserInputError(f"{raw_path}: nnUNet_raw is a file, not a folder; point nnUNet_raw at a folder")
    return raw_path


def prepare_la2018(input_dir: str, dataset_id: int, name: str = "LA2018", num_labeled: int = 16,
                   split: str = "uamt", spacing: float | None = None, overwrite: bool = False,
                   raw_dir: str | None = None) -> PreparedConversion:
    """Check the arguments and the input's headers and decide every case's destination; write nothing.

    Arguments as :func:`convert_la2018`.

    Raises:
        UserInputError: bad arguments or input, an existing dataset with this ID without ``overwrite``.
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise UserInputError(f"dataset ID {dataset_id!r}: must be an integer from 1 to 999 (nnU-Net's DatasetXXX)")
    if not _NAME_PATTERN.match(name):
        raise UserInputError(f"dataset name {name!r}: use letters, digits, '_' and '-' only (it becomes "
                             f"Dataset{dataset_id:03d}_<name>)")
    if spacing is not None and not (np.isfinite(spacing) and spacing > 0):
        raise UserInputError(f"--spacing {spacing}: must be a positive number of millimetres")
    if split not in ("uamt", "none") and not Path(split).is_file():
        raise UserInputError(f"--split {split}: not 'uamt', 'none' or an existing JSON file; pass one of them")
    raw_path = _raw_folder(raw_dir)
    final = raw_path / f"Dataset{dataset_id:03d}_{name}"
    existing = sorted(p for p in raw_path.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir()) \
        if raw_path.is_dir() else []
    if existing and not overwrite:
        raise UserInputError(f"{existing[0]}: a dataset with ID {dataset_id} already exists; pass --overwrite to "
                             f"replace it, or choose another -d")
    source = Path(input_dir).expanduser().resolve()
    for old in existing:
        if source == old.resolve() or old.resolve() in source.parents:
            raise UserInputError(f"{source}: the input is inside {old}, which --overwrite would delete; move the "
                                 f"input elsewhere first")

    cases = probe_cases(source, spacing)
    plan = make_plan(cases, split, num_labeled, source)
    return PreparedConversion(dataset=final, summary=_summary(plan, cases, final, source, spacing is not None),
                              name=name, split=split, plan=plan, layout=cases[0].layout, raw=raw_path,
                              existing=tuple(existing))


def convert_la2018(input_dir: str, dataset_id: int, name: str = "LA2018", num_labeled: int = 16,
                   split: str = "uamt", spacing: float | None = None, overwrite: bool = False,
                   raw_dir: str | None = None, progress: bool = True) -> ConversionResult:
    """Convert LA 2018 data (challenge NRRD or UA-MT h5 layout) into ``<raw_dir>/DatasetXXX_<name>``.

    Args:
        input_dir: the folder that holds the case folders, at any depth.
        dataset_id, name: nnU-Net's dataset ID (1 to 999) and name.
        num_labeled: with ``split="uamt"``, how many of UA-MT's train.list cases present are labeled.
        split: ``"uamt"`` (UA-MT's lists), ``"none"`` (every case with a label is labeled) or the path of a
            JSON file ``{"labeled": [...], "unlabeled": [...], "test": [...]}``.
        spacing: the isotropic spacing in mm of UA-MT h5 scans (default 0.625).
        overwrite: replace a dataset with this ID, whatever its name.
        raw_dir: defaults to ``$nnUNet_raw``.
        progress: show a progress bar on stderr while writing.

    Returns:
        The dataset folder and the summary (counts per folder, list entries missing from the input, spacing).

    Raises:
        UserInputError: bad input, in which case nothing is written.
    """
    return prepare_la2018(input_dir, dataset_id, name=name, num_labeled=num_labeled, split=split,
                          spacing=spacing, overwrite=overwrite, raw_dir=raw_dir).run(progress)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``nnunet_sassnet_convert_la2018``."""
    parser = argparse.ArgumentParser(
        prog="nnunet_sassnet_convert_la2018",
        description="Convert the LA 2018 left-atrium data (challenge <ID>/lgemri.nrrd + laendo.nrrd, or UA-MT's "
                    "<ID>/mri_norm2.h5) into $nnUNet_raw/DatasetXXX_<name> with imagesTr/labelsTr (labeled), "
                    "imagesUnlabeled (unlabeled training scans) and imagesTs/labelsTs (test).")
    parser.add_argument("-i", dest="input_dir", required=True, help="folder holding the case folders (any depth)")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset ID, e.g. 601")
    parser.add_argument("-n", dest="name", default="LA2018", help="dataset name (default: LA2018)")
    parser.add_argument("--num-labeled", type=int, default=None,
                        help="with --split uamt: the first N train.list cases present are labeled (default: 16)")
    parser.add_argument("--split", default="uamt",
                        help="'uamt' (UA-MT's lists, default), 'none' (every case with a label is labeled) or a "
                             "JSON file {\"labeled\": [...], \"unlabeled\": [...], \"test\": [...]}")
    parser.add_argument("--spacing", type=float, default=None,
                        help=f"isotropic spacing in mm of UA-MT h5 scans (default: {UAMT_SPACING_MM}; 1.25 for "
                             f"the half-resolution copy)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this ID")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``nnunet_sassnet_convert_la2018``: returns 0, or 2 after a one-line ``error:`` for bad input."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.num_labeled is not None and args.split != "uamt":
            chosen = "those with a label" if args.split == "none" else "those listed in the file"
            raise UserInputError(f"--num-labeled applies to --split uamt only; with --split {args.split} the "
                                 f"labeled cases are {chosen}. Leave --num-labeled out")
        prepared = prepare_la2018(args.input_dir, args.dataset_id, name=args.name,
                                  num_labeled=16 if args.num_labeled is None else args.num_labeled,
                                  split=args.split, spacing=args.spacing, overwrite=args.overwrite)
        # the summary comes first: writing full-size scans takes minutes
        print(prepared.summary, flush=True)
        result = prepared.run(progress=True)
        print(f"Done: {result.dataset}", flush=True)
        return 0

    return run_cli(run)
