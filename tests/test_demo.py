"""The demo (``nnunet_sassnet_demo``) end to end, shortened with ``--quick`` (same stages, a few training steps),
and its synthetic data generator."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SMALL_PLANS, EarlyStart, early_start
from nnunet_sassnet.demo import config
from nnunet_sassnet.demo.synthetic_la import SyntheticLAConfig, write_dataset
from nnunet_sassnet.demo.trainers import SparseProgressLogger, ThreadTrials
from nnunet_sassnet.nnunet_tools import usable_cores

NUM_STAGES = 9
NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def run_demo(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["nnunet_sassnet_demo", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@early_start("quick_demo")
def start_quick_demo(context: dict, early: EarlyStart) -> dict:
    """One quick demo run in a fresh folder, with the default work folder, and nnU-Net variables of a "user"
    that the demo must neither use nor create (run by the background lane: see ``started_early``)."""
    tmp_path_factory = context["tmp_path_factory"]
    cwd = tmp_path_factory.mktemp("demo_cwd")
    user_folders = tmp_path_factory.mktemp("user") / "nnunet"
    env = {**context["environ"], **{key: str(user_folders / key) for key in NNUNET_VARIABLES}}
    result = early.command(["nnunet_sassnet_demo", "--quick", "--seed", "3"], cwd, env, timeout=900)
    return {"result": result, "cwd": cwd, "workdirs": list(cwd.iterdir()), "user_folders": user_folders}


@pytest.fixture(scope="module")
def quick_demo(started_early) -> dict:
    """The quick demo's outcome: its exit, output and work folder."""
    demo = started_early["quick_demo"].result()
    result = demo["result"]
    if result.returncode != 0:
        pytest.fail(f"the quick demo failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return demo


@pytest.mark.slow
def test_quick_demo_writes_only_into_a_new_default_workdir(quick_demo):
    workdirs = quick_demo["workdirs"]
    assert len(workdirs) == 1 and workdirs[0].name.startswith("nnunet_sassnet_demo_")
    assert not quick_demo["user_folders"].exists()


@pytest.mark.slow
def test_quick_demo_prints_one_line_per_stage_and_the_summary(quick_demo):
    stdout = quick_demo["result"].stdout
    stage_lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in stage_lines] == [f"[{i}/{NUM_STAGES}]" for i in
                                                                   range(1, NUM_STAGES + 1)]
    for line in stage_lines:
        assert "total" in line and line.endswith(")")
    for tool in ("convert_la2018", "nnUNetv2_plan_and_preprocess", "nnUNetv2_preprocess",
                 "nnunet_sassnet_preprocess_unlabeled", "nnUNetv2_train", "nnUNetv2_predict"):
        assert tool in stdout
    assert "| Variant | Cases | Dice (%)" in stdout
    assert "Where everything is:" in stdout


@pytest.mark.slow
def test_quick_demo_runs_every_stage_on_real_files(quick_demo):
    workdir = quick_demo["workdirs"][0]
    data = config.QUICK_DATA
    # 1. synthetic scans in the challenge layout; unlabeled ones have no label
    cases = sorted(p for p in (workdir / "LA2018_synthetic").iterdir() if p.is_dir())
    assert len(cases) == data.num_labeled + data.num_unlabeled + data.num_test
    assert all((c / "lgemri.nrrd").is_file() for c in cases)
    assert sum((c / "laendo.nrrd").is_file() for c in cases) == data.num_labeled + data.num_test
    # 2. the converter's nnU-Net dataset
    raw = workdir / "nnUNet_raw" / f"Dataset{config.DATASET_ID:03d}_{config.DATASET_NAME}"
    counts = {sub: len(list((raw / sub).glob("*.nii.gz"))) for sub in
              ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs")}
    assert counts == {"imagesTr": data.num_labeled, "labelsTr": data.num_labeled,
                      "imagesUnlabeled": data.num_unlabeled, "imagesTs": data.num_test, "labelsTs": data.num_test}
    # 3.-5. planning, the CPU plans, preprocessed labeled and unlabeled data
    preprocessed = workdir / "nnUNet_preprocessed" / raw.name
    plans = json.loads((preprocessed / f"{config.PLANS}.json").read_text())
    assert plans["configurations"][config.CONFIGURATION]["patch_size"] == list(config.PATCH_SIZE)
    unet = plans["configurations"][config.CONFIGURATION]["architecture"]["arch_kwargs"]
    stages = len(config.FEATURES_PER_STAGE)
    assert unet["features_per_stage"] == list(config.FEATURES_PER_STAGE)
    assert unet["n_conv_per_stage"] == [config.CONVOLUTIONS_PER_STAGE] * stages
    assert unet["n_conv_per_stage_decoder"] == [config.CONVOLUTIONS_PER_STAGE] * (stages - 1)
    assert len(list((preprocessed / f"{config.PLANS}_{config.CONFIGURATION}").glob("*.b2nd"))) >= data.num_labeled
    unlabeled = preprocessed / f"{config.PLANS}_{config.CONFIGURATION}_unlabeled"
    assert (unlabeled / "sassnet_unlabeled_stamp.json").is_file()
    # 6. the trained model, with the discriminator in its checkpoint
    fold = (workdir / "nnUNet_results" / raw.name / f"{config.QUICK_TRAINER}__{config.PLANS}__{config.CONFIGURATION}"
            / f"fold_{config.FOLD}")
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "progress.png").is_file()
    # 7. predictions on the scans' grid
    predictions = sorted((workdir / "predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == sorted(p.name for p in (raw / "labelsTs").glob("*.nii.gz"))
    first = sitk.ReadImage(str(predictions[0]))
    assert first.GetSize() == sitk.ReadImage(str(raw / "labelsTs" / predictions[0].name)).GetSize()
    # 8. the evaluator's report (JSON, CSV, Markdown)
    report = json.loads((workdir / "report.json").read_text())
    assert report["counts"]["cases"] == data.num_test
    assert set(report["cases"]) == {p.name[:-len(".nii.gz")] for p in predictions}
    assert 0.0 <= report["mean"]["dice"] <= 1.0
    assert "largest_component" in report and "settings" in report
    assert (workdir / "report.csv").is_file() and (workdir / "report.md").is_file()
    # 9. the figure
    png = (workdir / "demo_figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    env_script = (workdir / "nnunet_env.sh").read_text()
    assert f"export nnUNet_results={workdir / 'nnUNet_results'}" in env_script
    assert sorted(p.name for p in (workdir / "logs").iterdir()) == [
        "1_convert.log", "2_plan.log", "3_preprocess.log", "4_preprocess_unlabeled.log", "5_train.log",
        "6_predict.log"]


def test_non_empty_workdir_is_refused(tmp_path):
    workdir = tmp_path / "busy"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("not the demo's")
    result = run_demo(["--workdir", str(workdir), "--quick"], tmp_path, dict(os.environ), timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "not empty" in result.stderr and "--reuse" in result.stderr
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"]


def test_synthetic_data_is_deterministic_for_a_seed(tmp_path):
    small = SyntheticLAConfig(num_labeled=2, num_unlabeled=1, num_test=1, shape=(40, 40, 32), shape_jitter=2)
    split_a = write_dataset(tmp_path / "a", seed=5, config=small, progress=False)
    split_b = write_dataset(tmp_path / "b", seed=5, config=small, progress=False)
    split_c = write_dataset(tmp_path / "c", seed=6, config=small, progress=False)
    assert split_a == split_b == json.loads((tmp_path / "a" / "split.json").read_text())
    assert [len(split_a[k]) for k in ("labeled", "unlabeled", "test")] == [2, 1, 1]
    for case in split_a["labeled"] + split_a["test"]:
        for name in ("lgemri.nrrd", "laendo.nrrd"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / case / name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / case / name)))
            assert a.dtype == np.uint8 and np.array_equal(a, b)
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / case / "laendo.nrrd")))
        assert set(np.unique(label)) == {0, 255}
    assert not (tmp_path / "a" / split_a["unlabeled"][0] / "laendo.nrrd").exists()
    assert split_c != split_a


def test_thread_trials_time_each_count_after_the_probe_steps_and_keep_the_faster():
    trials = ThreadTrials([2, 1], trials_per_choice=1, first_trial_step=1)

    def epoch(seconds: dict[int, float]) -> tuple[list[int], str | None]:
        """One epoch of 5 steps: the thread count of each, and the line logged."""
        trials.new_epoch()
        used, line = [], None
        for step in range(5):
            used.append(trials.threads_for(step))
            line = trials.record(step, used[-1], seconds[used[-1]]) or line
        return used, line

    # idle: two threads are faster, and stay chosen, with trials every epoch
    assert epoch({1: 0.9, 2: 0.5}) == ([1, 1, 2, 2, 2], "torch threads for this epoch: 2 (median step with 1: "
                                                         "0.90 s, 2: 0.50 s)")
    assert epoch({1: 0.9, 2: 0.5})[0] == [2, 1, 2, 2, 2]
    # another process takes a core: two threads wait for each other; one thread, and trials pause 1, 2, 4 epochs
    busy = {1: 0.9, 2: 2.7}
    assert epoch(busy) == ([2, 1, 2, 1, 1], "torch threads for this epoch: 1 (median step with 1: 0.90 s, "
                                              "2: 2.70 s; no trials in the next 1 epoch(s))")
    assert epoch(busy)[0] == [1] * 5
    assert epoch(busy)[1].endswith("no trials in the next 2 epoch(s))")
    assert [epoch(busy)[0] for _ in range(2)] == [[1] * 5] * 2
    assert epoch(busy)[1].endswith("no trials in the next 4 epoch(s))")
    assert [epoch(busy)[0] for _ in range(4)] == [[1] * 5] * 4
    # idle again: two threads win at the next trial, and the trials are every epoch again
    assert epoch({1: 0.9, 2: 0.5})[0] == [1, 1, 2, 2, 2]
    assert epoch({1: 0.9, 2: 0.5})[0] == [2, 1, 2, 2, 2]
    assert ThreadTrials([1], trials_per_choice=1, first_trial_step=1).num_trial_steps == 0  # nothing to choose


def test_cpu_trainer_trains_each_trial_step_with_its_thread_count(nnunet_paths, monkeypatch):
    """Real steps of the demo's CPU trainer on the tiny dataset: the trial steps run with 1 and 2 torch threads,
    the choice is logged, and the steps after it use the faster count."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    if usable_cores() < 2:
        pytest.skip("one usable core: there is no thread count to choose")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the tests' cap of one thread would leave no choice
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)  # what nnUNetv2_train -device cpu does on two cores
    try:
        trainer = get_trainer_from_args("990", "3d_fullres", "all", config.QUICK_TRAINER, SMALL_PLANS,
                                        device=torch.device("cpu"))
        trainer.num_iterations_per_epoch = 5
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        seen = []
        unlabeled = trainer.dataloader_unlabeled

        class ThreadsAtEachStep:  # the unlabeled batch is drawn inside the step, with the step's thread count
            def __next__(self):
                seen.append(torch.get_num_threads())
                return next(unlabeled)

        trainer.dataloader_unlabeled = ThreadsAtEachStep()
        for _ in range(5):
            trainer.train_step(next(trainer.dataloader_train))
        chosen = trainer.thread_trials.current
        assert seen == [1, 1, 2, chosen, chosen]  # the probe step, one trial per count, then the faster
        log = Path(trainer.log_file).read_text()
        assert f"torch threads for this epoch: {chosen} (median step with 1: " in log
    finally:
        torch.set_num_threads(threads_before)


def test_sparse_progress_logger_draws_every_nth_and_the_last_epoch(monkeypatch, tmp_path):
    from nnunet_sassnet.progress import SASSNetLocalLogger

    drawn = []  # drawing progress.png itself is SASSNetLocalLogger's, tested with the trainers
    monkeypatch.setattr(SASSNetLocalLogger, "plot_progress_png", lambda self, folder: drawn.append(epoch))
    logger = SparseProgressLogger(["seg_losses"], plot_every=4)
    logger.last_epoch = 5
    for epoch in range(6):
        logger.log("epoch_end_timestamps", float(epoch), epoch)
        logger.plot_progress_png(str(tmp_path))
    assert drawn == [3, 5]


def test_demo_starts_nnunets_commands_warm_unless_told_otherwise(tmp_path, monkeypatch):
    from nnunet_sassnet import warm_start
    from nnunet_sassnet.demo.pipeline import Layout, nnunet_environment

    monkeypatch.delenv(warm_start.ENV_VARIABLE, raising=False)
    env = nnunet_environment(Layout(tmp_path), 1, threads=1)
    assert env[warm_start.ENV_VARIABLE] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["nnUNet_results"] == str(tmp_path / "nnUNet_results")
    monkeypatch.setenv(warm_start.ENV_VARIABLE, "0")  # the user's choice stays
    assert nnunet_environment(Layout(tmp_path), 1)[warm_start.ENV_VARIABLE] == "0"
