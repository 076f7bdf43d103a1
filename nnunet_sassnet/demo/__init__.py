"""``nnunet_sassnet_demo``: from nothing to a trained semi-supervised model on the CPU in a few minutes.

Generates synthetic left-atrium scans in the LA 2018 challenge's layout, converts them, plans and
preprocesses them with nnU-Net, trains ``nnUNetTrainerSASSNet`` briefly with small CPU plans, predicts the
test scans with ``nnUNetv2_predict``, scores them and draws a figure. Everything stays in one work folder.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["main"]

#: what the demo takes, as measured with benchmarks/demo_resources.py (docs/demo.md)
ESTIMATE = "about 5 minutes on two idle CPU cores, up to twice that beside other work"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_sassnet_demo",
        description="Run the whole nnunet-sassnet pipeline on synthetic left-atrium scans on the CPU: data "
                    "generation, LA conversion, nnU-Net planning and preprocessing, unlabeled preprocessing, "
                    "a short nnUNetTrainerSASSNet training, nnUNetv2_predict, evaluation and a figure. "
                    f"{ESTIMATE[0].upper() + ESTIMATE[1:]}, at most 4 GB of memory; no GPU and no data needed.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for everything the demo writes (default: a new folder "
                             "./nnunet_sassnet_demo_<date>_<time>); must be empty or new unless --reuse")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scans (default: 0)")
    parser.add_argument("--reuse", action="store_true",
                        help="run in a non-empty --workdir, e.g. an earlier demo's: the demo's own files there "
                             "are replaced, nothing else is touched")
    parser.add_argument("--quick", action="store_true",
                        help="every stage on the fewest scans, a few training steps and no test-time mirroring: "
                             "checks an installation in about 3 minutes; the model does not learn")
    return parser


def _default_workdir() -> Path:
    base = Path.cwd() / time.strftime("nnunet_sassnet_demo_%Y%m%d_%H%M%S")
    candidate, n = base, 2
    while candidate.exists():
        candidate = base.with_name(f"{base.name}_{n}")
        n += 1
    return candidate


def _prepare_workdir(workdir: Path | None, reuse: bool) -> Path:
    """The work folder, created; raises ValueError (one line) if it cannot be used."""
    path = (workdir.expanduser() if workdir is not None else _default_workdir()).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir {path} is a file; choose a folder")
    if path.is_dir() and any(path.iterdir()) and not reuse:
        raise ValueError(f"--workdir {path} is not empty; choose a new or empty folder, or pass --reuse to run "
                         f"in it anyway (an earlier demo's results there are replaced)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--workdir {path}: cannot create it ({e.strerror}); choose another folder") from None
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nnunet_sassnet_demo``: 0 on success, 1 when a stage fails, 2 for a bad work folder."""
    args = _parser().parse_args(argv)
    try:
        workdir = _prepare_workdir(args.workdir, args.reuse)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from nnunet_sassnet.demo.pipeline import print_failure, run_demo
    from nnunet_sassnet.demo.runner import StageFailed

    mode = "quick run: a few training steps only" if args.quick else ESTIMATE
    print(f"nnunet-sassnet demo in {workdir} ({mode})", flush=True)
    try:
        run_demo(workdir, seed=args.seed, quick=args.quick, reuse=args.reuse)
    except StageFailed as e:
        print_failure(e)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; partial results are in {workdir}", file=sys.stderr)
        return 130
    return 0
