"""The demo's stages, from synthetic scans to a trained SASSNet model, its predictions, metrics and a figure.

Every stage uses what a user runs: the LA converter, nnU-Net's own command-line tools in subprocesses (with
nnU-Net's folders, all inside the work folder, set in their environment only), the unlabeled preprocessing
command, and the evaluator.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunet_sassnet import warm_start
from nnunet_sassnet.demo import config
from nnunet_sassnet.demo.config import SyntheticLAConfig
from nnunet_sassnet.demo.runner import (CaseCounter, Stages, StageFailed, TqdmMirror, TrainingProgress,
                                        format_seconds, run_tool, show_bars)

__all__ = ["Layout", "nnunet_environment", "run_demo"]

NUM_STAGES = 9
FIGURE_CASES = 3
#: torch threads of the prediction and the figure: one, because on small patches a second thread gains little on
#: an idle machine and loses much beside another busy process (docs/demo.md)
PREDICTION_THREADS = 1


@dataclass(frozen=True)
class Layout:
    """Where the demo puts everything: only inside ``workdir``."""

    workdir: Path

    @property
    def synthetic(self) -> Path:
        return self.workdir / "LA2018_synthetic"

    @property
    def raw(self) -> Path:
        return self.workdir / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.workdir / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.workdir / "nnUNet_results"

    @property
    def dataset_name(self) -> str:
        return f"Dataset{config.DATASET_ID:03d}_{config.DATASET_NAME}"

    @property
    def raw_dataset(self) -> Path:
        return self.raw / self.dataset_name

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / self.dataset_name

    def model_folder(self, trainer: str) -> Path:
        return self.results / self.dataset_name / f"{trainer}__{config.PLANS}__{config.CONFIGURATION}"

    @property
    def predictions(self) -> Path:
        return self.workdir / "predictions"

    @property
    def report(self) -> Path:
        return self.workdir / "report.json"

    @property
    def figure(self) -> Path:
        return self.workdir / "demo_figure.png"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def env_script(self) -> Path:
        return self.workdir / "nnunet_env.sh"


def nnunet_environment(layout: Layout, augmentation_processes: int, threads: int | None = None) -> dict[str, str]:
    """The environment of the demo's subprocesses: the caller's, plus nnU-Net's folders in the work folder.

    The caller's own ``os.environ`` is not changed. ``augmentation_processes``: nnU-Net's planner needs at
    least 1; training uses 0 (augmentation in the training process), which on two cores is as fast as
    background workers and saves their memory. ``threads`` caps the math libraries' threads.

    nnU-Net's commands start from a warm process (:mod:`nnunet_sassnet.warm_start`: the entry function of each
    console script, in a process of its own) unless the caller's environment sets ``NNUNET_SASSNET_WARM_START``:
    a fresh interpreter spends seconds of CPU time importing torch and nnU-Net's libraries, five times over.
    """
    from nnunet_sassnet.nnunet_tools import nnunet_environment as tool_environment

    env = tool_environment(layout.raw, layout.preprocessed, layout.results, default_workers=1,
                           data_workers=augmentation_processes, threads=threads, make_folders=False)
    env.setdefault(warm_start.ENV_VARIABLE, "1")
    return env


def _short_path(path: Path) -> str:
    """A path relative to the current folder when it is inside it (shorter lines), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- stages

def generate_data(layout: Layout, seed: int, data: SyntheticLAConfig) -> dict[str, list[str]]:
    from nnunet_sassnet.demo.synthetic_la import write_dataset

    return write_dataset(layout.synthetic, seed=seed, config=data, progress=show_bars())


def convert(layout: Layout) -> None:
    from nnunet_sassnet.conversion import convert_la2018
    from nnunet_sassnet.errors import UserInputError

    log_file = layout.logs / "1_convert.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = convert_la2018(str(layout.synthetic), config.DATASET_ID, name=config.DATASET_NAME,
                                split=str(layout.synthetic / "split.json"), raw_dir=str(layout.raw),
                                progress=show_bars())
        log_file.write_text(result.summary + "\n")
    except UserInputError as e:
        raise StageFailed(f"conversion failed: {e}") from None


def plan(layout: Layout) -> None:
    mirror = TqdmMirror("Planning")
    try:
        run_tool(["nnUNetv2_plan_and_preprocess", "-d", str(config.DATASET_ID), "-c", config.CONFIGURATION,
                  "--no_pp", "-npfp", "1", "--clean"], nnunet_environment(layout, 1), layout.logs / "2_plan.log",
                 mirror)
    finally:
        mirror.close()


def preprocess(layout: Layout) -> None:
    from nnunet_sassnet.plans import derive_small_plans

    derive_small_plans(str(layout.preprocessed_dataset), config.PATCH_SIZE, config.FEATURES_PER_STAGE,
                       config.BATCH_SIZE, target_plans=config.PLANS, configuration=config.CONFIGURATION,
                       blocks_per_stage=config.CONVOLUTIONS_PER_STAGE)
    mirror = TqdmMirror("Preprocessing")
    try:
        run_tool(["nnUNetv2_preprocess", "-d", str(config.DATASET_ID), "-plans_name", config.PLANS, "-c",
                  config.CONFIGURATION, "-np", "1"], nnunet_environment(layout, 1),
                 layout.logs / "3_preprocess.log", mirror)
    finally:
        mirror.close()


def preprocess_unlabeled(layout: Layout) -> None:
    mirror = TqdmMirror("Preprocessing unlabeled cases")
    try:
        run_tool(["nnunet_sassnet_preprocess_unlabeled", "-d", str(config.DATASET_ID), "-c", config.CONFIGURATION,
                  "-p", config.PLANS, "-np", "1"], nnunet_environment(layout, 1),
                 layout.logs / "4_preprocess_unlabeled.log", mirror)
    finally:
        mirror.close()


def train(layout: Layout, trainer: str, num_epochs: int) -> TrainingProgress:
    progress = TrainingProgress(num_epochs)
    try:
        run_tool(["nnUNetv2_train", str(config.DATASET_ID), config.CONFIGURATION, config.FOLD, "-tr", trainer,
                  "-p", config.PLANS, "-device", "cpu"], nnunet_environment(layout, 0),
                 layout.logs / "5_train.log", progress)
    finally:
        progress.close()
    return progress


def predict(layout: Layout, trainer: str, num_cases: int, quick: bool = False) -> None:
    counter = CaseCounter(r"^Predicting \S+:", num_cases, "Predicting")
    try:
        run_tool(["nnUNetv2_predict", "-i", str(layout.raw_dataset / "imagesTs"), "-o", str(layout.predictions),
                  "-d", str(config.DATASET_ID), "-c", config.CONFIGURATION, "-p", config.PLANS, "-tr", trainer,
                  "-f", config.FOLD, "-device", "cpu"]
                 # no worker processes: each would import torch and nnU-Net (seconds of CPU time) for a few small
                 # scans. quick: no test-time mirroring either (8 times fewer forward passes; the model has not
                 # learned anything)
                 + ["-npp", "0", "-nps", "0"] + (["--disable_tta"] if quick else []),
                 nnunet_environment(layout, 1, threads=PREDICTION_THREADS), layout.logs / "6_predict.log", counter)
    finally:
        counter.close()


def evaluate(layout: Layout) -> dict:
    from nnunet_sassnet.errors import UserInputError
    from nnunet_sassnet.evaluation import evaluate_folders, write_report

    try:
        # both rows of the paper's table: the raw predictions and their largest connected component
        report = evaluate_folders(str(layout.raw_dataset / "labelsTs"), str(layout.predictions), both=True)
    except UserInputError as e:
        raise StageFailed(f"evaluation failed: {e}") from None
    write_report(report, str(layout.report))
    return report


def draw_figure(layout: Layout, trainer: str, report: dict) -> int:
    """Write the PNG for the first test scans; return how many it shows."""
    import SimpleITK as sitk

    from nnunet_sassnet.demo.figure import FigureCase, predict_sdm, write_figure

    cases = sorted(report["cases"])[:FIGURE_CASES]
    images = [layout.raw_dataset / "imagesTs" / f"{case}_0000.nii.gz" for case in cases]
    sdms = predict_sdm(layout.model_folder(trainer), config.FOLD, [[str(p)] for p in images], config.CONFIGURATION,
                       threads=PREDICTION_THREADS)

    def read(path: Path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    rows = [FigureCase(case, read(image), read(layout.raw_dataset / "labelsTs" / f"{case}.nii.gz"),
                       read(layout.predictions / f"{case}.nii.gz"), sdm, report["cases"][case]["dice"])
            for case, image, sdm in zip(cases, images, sdms)]
    write_figure(rows, layout.figure, f"{trainer} on synthetic LA test scans: image, reference, "
                                      f"prediction (nnUNetv2_predict), predicted SDM")
    return len(rows)


# ---------------------------------------------------------------------------------------------- the demo

def remove_previous_results(layout: Layout) -> None:
    """Delete what an earlier demo wrote into this work folder (``--reuse``), and nothing else.

    nnU-Net keeps some files between runs (its fingerprint, ``splits_final.json``, old predictions); with
    another seed the case names differ, so stale ones would break the new run.
    """
    import shutil

    from nnunet_sassnet.evaluation import report_paths

    for folder in (layout.synthetic, layout.raw_dataset, layout.preprocessed_dataset,
                   layout.results / layout.dataset_name, layout.predictions, layout.logs):
        if folder.is_dir():
            shutil.rmtree(folder)
    for path in (*report_paths(layout.report), layout.figure, layout.env_script):
        path.unlink(missing_ok=True)


def write_env_script(layout: Layout) -> None:
    """A script to source for running nnU-Net's commands on the demo's folders by hand."""
    from nnunet_sassnet.discovery import trainer_dir

    lines = ["# source this file to use nnU-Net's commands on the demo's folders"]
    for key, value in (("nnUNet_raw", layout.raw), ("nnUNet_preprocessed", layout.preprocessed),
                       ("nnUNet_results", layout.results), ("nnUNet_extTrainer", trainer_dir())):
        lines.append(f"export {key}={shlex.quote(str(value))}")
    layout.env_script.write_text("\n".join(lines) + "\n")


def run_demo(workdir: Path, seed: int, quick: bool, reuse: bool) -> dict:
    """Run every stage in ``workdir`` (which exists); return the evaluation report."""
    from nnunet_sassnet.evaluation import format_table

    layout = Layout(workdir)
    if reuse:
        remove_previous_results(layout)
    trainer = config.QUICK_TRAINER if quick else config.TRAINER
    schedule = config.QUICK_SCHEDULE if quick else config.SCHEDULE
    stages = Stages(NUM_STAGES)
    data = config.QUICK_DATA if quick else config.DATA
    # nnU-Net's commands start warm (see nnunet_environment): the fork server imports their libraries on the
    # second core while this process draws the scans
    warm_start.start_early(nnunet_environment(layout, 1))

    groups = generate_data(layout, seed, data)
    stages.finish(f"Generated {sum(map(len, groups.values()))} synthetic LA scans (seed {seed}): "
                  f"{len(groups['labeled'])} labeled, {len(groups['unlabeled'])} unlabeled, {len(groups['test'])} "
                  f"test; about {'x'.join(map(str, data.shape))} voxels of {data.spacing_mm} mm")
    convert(layout)
    stages.finish(f"Converted with nnunet_sassnet_convert_la2018 into {_short_path(layout.raw_dataset)} "
                  f"(imagesTr, imagesUnlabeled, imagesTs)")
    plan(layout)
    stages.finish("Planned with nnUNetv2_plan_and_preprocess (dataset fingerprint, nnUNetPlans)")
    preprocess(layout)
    stages.finish(f"Preprocessed with CPU plans {config.PLANS} (patch {'x'.join(map(str, config.PATCH_SIZE))}, "
                  f"U-Net {'-'.join(map(str, config.FEATURES_PER_STAGE))} with {config.CONVOLUTIONS_PER_STAGE} "
                  f"convolutions per stage, batch {config.BATCH_SIZE}) by nnUNetv2_preprocess")
    preprocess_unlabeled(layout)
    stages.finish(f"Preprocessed the {len(groups['unlabeled'])} unlabeled scans with "
                  f"nnunet_sassnet_preprocess_unlabeled")
    progress = train(layout, trainer, schedule["num_epochs"])
    steps = schedule["num_epochs"] * schedule["num_iterations_per_epoch"]
    validation = "" if progress.validation_dice is None else \
        f"; Dice on nnU-Net's validation cases {progress.validation_dice:.3f}"
    stages.finish(f"Trained {trainer} with nnUNetv2_train on the CPU: {schedule['num_epochs']} epochs, {steps} "
                  f"steps{validation}")
    predict(layout, trainer, len(groups["test"]), quick=quick)
    stages.finish(f"Predicted the {len(groups['test'])} test scans with nnUNetv2_predict"
                  + (" (no test-time mirroring)" if quick else ""))
    report = evaluate(layout)
    stages.finish(f"Evaluated: mean Dice {report['mean']['dice']:.3f} on {report['counts']['cases']} test scans "
                  f"({report['largest_component']['mean']['dice']:.3f} with the largest component only)")
    shown = draw_figure(layout, trainer, report)
    stages.finish(f"Drew image, reference, prediction and predicted SDM of {shown} test scans")
    write_env_script(layout)

    model = layout.model_folder(trainer)
    print(f"\nMetrics on the synthetic test scans (nnunet_sassnet_evaluate's table):\n\n{format_table(report)}")
    if quick:
        print("(--quick: the model trained for a few steps only, so these numbers mean nothing)\n")
    rows = [
        ("synthetic scans (challenge layout)", layout.synthetic),
        ("nnU-Net dataset (raw)", layout.raw_dataset),
        ("preprocessed data, plans", layout.preprocessed_dataset),
        ("trained model", model / f"fold_{config.FOLD}" / "checkpoint_final.pth"),
        ("training curves", model / f"fold_{config.FOLD}" / "progress.png"),
        ("predictions", layout.predictions),
        ("report (+ .csv, .md)", layout.report),
        ("figure", layout.figure),
        ("logs of every tool", layout.logs),
        ("nnU-Net variables", layout.env_script),
    ]
    width = max(len(name) for name, _ in rows)
    print("Where everything is:")
    for name, path in rows:
        print(f"  {name:<{width}}  {_short_path(path)}")
    print(f"\nDone in {format_seconds(stages.elapsed)}. To run nnU-Net's commands on these folders: "
          f"source {_short_path(layout.env_script)}", flush=True)
    return report


def print_failure(error: StageFailed) -> None:
    """One ``error:`` line, then the end of the failed tool's log."""
    print(f"error: {error}", file=sys.stderr)
    if error.details:
        print("last lines of its output:\n" + error.details, file=sys.stderr)

