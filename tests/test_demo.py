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

from conftest import EarlyStart, early_start
from nnunet_sassnet.demo import config
from nnunet_sassnet.demo.synthetic_la import SyntheticLAConfig, write_dataset

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
