"""``nnunet_sassnet_evaluate``: score a folder of predictions and write the report (JSON, CSV, Markdown)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nnunet_sassnet.errors import UserInputError, run_cli
from nnunet_sassnet.evaluation.folders import evaluate_folders
from nnunet_sassnet.evaluation.images import IMAGE_ENDINGS
from nnunet_sassnet.evaluation.report import format_table, report_paths, write_report

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``nnunet_sassnet_evaluate``."""
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


def _evaluate(args: argparse.Namespace) -> int:
    if args.o is not None:
        output = Path(args.o)
    else:
        output = Path(args.pred) / ("report_largest_component.json" if args.largest_component else "report.json")
    if not output.name.lower().endswith(".json"):
        raise UserInputError(f"-o {output} must end in .json (the .csv and .md are written beside it)")
    existing = [p for p in report_paths(output) if p.exists()]
    if existing and not args.overwrite:
        raise UserInputError(f"{existing[0]} exists; pass --overwrite to replace it or choose another -o")
    start = time.perf_counter()
    report = evaluate_folders(args.ref, args.pred, labels=args.l, largest_component=args.largest_component,
                              num_processes=args.np, both=args.both)
    elapsed = time.perf_counter() - start
    try:
        write_report(report, str(output))
    except OSError as exc:
        raise UserInputError(f"cannot write the report {output} ({exc.strerror or exc}); choose another -o") from None
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(format_table(report), end="")
    json_path, csv_path, md_path = report_paths(output)
    print(f"\n{report['counts']['cases']} cases scored in {elapsed:.1f} s; "
          f"wrote {json_path}, {csv_path.name}, {md_path.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 success, 2 bad input after one ``error:`` line)."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _evaluate(args))
