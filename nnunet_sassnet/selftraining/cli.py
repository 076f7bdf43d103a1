"""``nnunet_sassnet_selftrain``: nnU-Net's self-training (noisy student) on a dataset with imagesUnlabeled."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence

from nnunet_sassnet.errors import run_cli

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet_sassnet_selftrain",
        description="nnU-Net's self-training on a dataset with nnUNet_raw/DatasetXXX/imagesUnlabeled: a teacher "
                    "on the labeled scans, its pseudo-labels of the unlabeled scans, a student on labeled + "
                    "pseudo-labeled scans in a new dataset with the teacher's plans (pseudo-labeled cases are "
                    "never validation cases), optionally fine-tuned on the labeled scans; the student teaches the "
                    "next round. Every step is recorded in the student's dataset folder (selftraining.json): the "
                    "same command again continues where a run stopped. See docs/self_training.md.")
    g = p.add_argument_group("teacher")
    g.add_argument("-d", required=True, help="the dataset (ID or name): labeled scans in imagesTr/labelsTr, "
                                             "unlabeled ones in imagesUnlabeled")
    g.add_argument("-c", default=None, help="configuration, e.g. 3d_fullres (required unless --teacher-model)")
    g.add_argument("-f", nargs="+", required=True, metavar="FOLD",
                   help="fold(s) of teacher and students: 'all', or numbers of nnU-Net's split (several: student "
                        "fold k learns from the pseudo-labels of teacher fold k alone, so that its validation cases "
                        "stay unseen)")
    g.add_argument("-tr", default=None, help="the teacher's trainer [nnUNetTrainer]")
    g.add_argument("-p", default=None, help="plans identifier of teacher and students [nnUNetPlans]")
    g.add_argument("--teacher-model", default=None, metavar="FOLDER",
                   help="a trained model folder (TRAINER__PLANS__CONFIGURATION) as the first teacher instead of "
                        "training one; its folds -f must be trained")
    g = p.add_argument_group("pseudo-labels (nnU-Net's predictor)")
    g.add_argument("--ignore-below", type=float, default=None, metavar="P",
                   help="voxels where the teacher's highest class probability is below P get nnU-Net's ignore "
                        "label (the student's loss skips them) [off]")
    g.add_argument("--min-case-confidence", type=float, default=None, metavar="P",
                   help="leave out the unlabeled cases whose mean probability over their predicted foreground is "
                        "below P [off: every case is kept]")
    g.add_argument("--ensemble-pseudo-labels", action="store_true",
                   help="with several folds: every student fold learns from the ensemble of all teacher folds (as "
                        "nnUNetv2_predict -f), whose other folds saw its validation labels: the students' "
                        "cross-validation (and nnUNetv2_find_best_configuration) is then optimistic [off]")
    g.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (as nnUNetv2_predict)")
    g.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (as nnUNetv2_predict) [0.5]")
    g.add_argument("-npp", type=int, default=3, help="preprocessing processes of the predictor (0 and -nps 0: "
                                                      "nnU-Net's sequential predictor) [3]")
    g.add_argument("-nps", type=int, default=3, help="export processes of the predictor [3]")
    g = p.add_argument_group("student")
    g.add_argument("--student-trainer", default=None, metavar="TRAINER", help="the students' trainer [the teacher's]")
    g.add_argument("--student-dataset", default=None, metavar="ID_OR_NAME",
                   help="round 1's dataset (ID or DatasetXXX_Name); round k gets ID + k - 1 [the next free IDs]")
    g.add_argument("--rounds", type=int, default=1, help="rounds; each round's student teaches the next [1]")
    g.add_argument("--fine-tune-trainer", default=None, metavar="TRAINER",
                   help="fine-tune each student on the labeled scans with this trainer (-pretrained_weights, and the "
                        "output layers too where the labels match), e.g. nnUNetTrainer_50epochs; the fine-tuned "
                        "model teaches the next round [off]")
    g.add_argument("-np", type=int, default=None, help="preprocessing processes for the student's dataset "
                                                        "[as nnUNetv2_preprocess: 4 for 3d_fullres, else 8]")
    g = p.add_argument_group("run")
    g.add_argument("-device", choices=("cuda", "cpu", "mps"), default="cuda", help="[cuda]")
    g.add_argument("--force", action="store_true",
                   help="redo the rounds from the start: delete their student datasets and models (and the "
                        "teacher's folds this command trained) and run every step again")
    return p


def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _default_sigterm_in_child() -> None:
    """A forked process (nnU-Net's worker pools, its data loader's workers) ends on SIGTERM by the default action:
    ``Pool.terminate()`` relies on it. Our Python handler would run only when the worker's main thread next
    checks for signals, which a worker blocked in a semaphore may never do: the pool's ``join()`` then waits for
    ever. A SIGTERM that came during the fork was held back (blocked) and is delivered now, by the default action."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _unblock_sigterm()


_fork_hooks_registered = False


def _stop_on_sigterm() -> None:
    """SIGTERM (kill, a job scheduler) ends the command as Ctrl-C does, so that nnU-Net's worker processes end too.

    Only this process gets the handler: processes it forks get SIGTERM's default action back as they start
    (:func:`_default_sigterm_in_child`; SIGTERM is blocked around the fork so that none falls between). Spawned
    processes (most of nnU-Net's pools) start a new interpreter, which has the default action anyway.
    """
    global _fork_hooks_registered

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    if not _fork_hooks_registered:
        os.register_at_fork(before=_block_sigterm, after_in_parent=_unblock_sigterm,
                            after_in_child=_default_sigterm_in_child)
        _fork_hooks_registered = True


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; bad input: one ``error:`` line and exit code 2, nothing written."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        from nnunet_sassnet.selftraining.checks import build_recipe
        from nnunet_sassnet.selftraining.recipe import run_recipe
        from nnunet_sassnet.selftraining.training import set_device_threads

        recipe = build_recipe(args)
        set_device_threads(args.device)
        _stop_on_sigterm()
        try:
            run_recipe(recipe)
        except KeyboardInterrupt:
            print("nnunet_sassnet_selftrain: interrupted; the same command continues from the step that was "
                  "running", file=sys.stderr)
            return 130
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
