"""benchmarks/la_semisup.py end to end on the CPU: real LA lite scans, tiny plans, a few steps per trainer.

The smoke run converts, plans and preprocesses both datasets, trains the four default runs through nnU-Net's
own training entry point, predicts through nnU-Net's predictor and scores with the project's evaluator; the
test then reads what it wrote. The numbers themselves mean nothing at 4 steps; their presence, finiteness and
bookkeeping (same steps for every run, the paired comparison) are what is checked.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "la_semisup.py"
LA_LITE = REPO.parent / "shared" / "data" / "la2018_uamt_lite_1.25mm"
RUNS = ("nnUNetTrainer", "nnUNetTrainerSDM", "nnUNetTrainerSASSNet", "nnUNetTrainer:all")
SMOKE_STEPS, SMOKE_EPOCHS = 4, 2  # --cpu-smoke: 2 epochs x 2 iterations

needs_lite = pytest.mark.skipif(not LA_LITE.is_dir(), reason=f"LA lite scans not found at {LA_LITE}")


def _benchmark(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """One --cpu-smoke run of the benchmark: its exit, its JSON and its work folder."""
    root = tmp_path_factory.mktemp("la_semisup")
    workdir, output = root / "work", root / "results" / "smoke.json"
    result = _benchmark("--cpu-smoke", "--data", str(LA_LITE), "--workdir", str(workdir), "--output", str(output))
    if result.returncode != 0:
        raise AssertionError(f"benchmark failed ({result.returncode}):\n{result.stdout[-6000:]}\n"
                             f"{result.stderr[-3000:]}")
    return {"result": result, "doc": json.loads(output.read_text()), "workdir": workdir, "output": output}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@needs_lite
def test_every_run_is_scored_with_finite_metrics(smoke):
    doc = smoke["doc"]
    evaluation = doc["split"]["evaluation"]
    assert len(evaluation) == 2 and not set(evaluation) & set(doc["split"]["labeled"] + doc["split"]["unlabeled"])
    assert list(doc["runs"]) == list(RUNS)
    for key, run in doc["runs"].items():
        assert run["status"] == "done", (key, run.get("error"))
        assert sorted(run["cases"]) == sorted(evaluation)
        for metric in ("dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm"):
            assert _finite(run["mean"][metric]) and _finite(run["std"][metric]), (key, metric)
        assert 0.0 <= run["mean"]["dice"] <= 1.0 and 0.0 <= run["mean"]["jaccard"] <= run["mean"]["dice"]
        for case in run["cases"].values():
            assert _finite(case["dice"])
    # what each run learned from: 2 labeled (+2 unlabeled for SASSNet only), the ceiling all 4 non-evaluation scans
    assert [doc["runs"][k]["labeled"] for k in RUNS] == [2, 2, 2, 4]
    assert [doc["runs"][k]["unlabeled"] for k in RUNS] == [0, 0, 2, 0]


@needs_lite
def test_paired_comparison_against_nnunet_trainer(smoke):
    doc = smoke["doc"]
    paired = doc["paired"]
    assert sorted(paired) == sorted(RUNS[1:])
    base = doc["runs"]["nnUNetTrainer"]["cases"]
    for key, pair in paired.items():
        assert pair["vs"] == "nnUNetTrainer" and pair["n"] == 2
        assert pair["wins"] + pair["ties"] + pair["losses"] == 2
        # the differences are recomputed here from the per-scan Dice values of both runs
        expected = {c: 100 * (doc["runs"][key]["cases"][c]["dice"] - base[c]["dice"]) for c in base}
        assert pair["per_case_points"] == pytest.approx(expected)
        assert pair["mean_dice_diff_points"] == pytest.approx(sum(expected.values()) / 2)
        assert pair["wins"] == sum(d > 0 for d in expected.values())
    table = doc["table"]
    assert "ΔDice vs nnUNetTrainer" in table and "(baseline)" in table
    assert smoke["output"].with_suffix(".md").read_text() == table
    # the table is printed too
    assert "nnUNetTrainer (all labeled)" in smoke["result"].stdout and "Total wall time" in smoke["result"].stdout


@needs_lite
def test_same_steps_and_seed_for_every_run(smoke):
    doc, workdir = smoke["doc"], smoke["workdir"]
    assert doc["settings"]["steps"] == SMOKE_STEPS and doc["settings"]["seed"] == 0
    for key, run in doc["runs"].items():
        checkpoint = torch.load(Path(run["model"]) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == run["bench_trainer"]
        assert checkpoint["current_epoch"] == SMOKE_EPOCHS, key
        if "sassnet" in checkpoint:
            assert checkpoint["sassnet"]["current_iteration"] == SMOKE_STEPS
    # every stage was timed, and nothing of nnU-Net's went outside the work folder
    stages = {s["stage"]: s for s in doc["stages"]}
    for key in RUNS:
        slug = key.replace(":", "-")
        for step in ("train", "predict", "evaluate"):
            assert stages[f"{step}_{slug}"]["status"] == "ok" and stages[f"{step}_{slug}"]["seconds"] >= 0
    assert "convert" in stages and doc["elapsed_s"] > 0
    for run in doc["runs"].values():
        assert Path(run["model"]).is_relative_to(workdir)


@needs_lite
def test_next_benchmark_in_the_work_folder_reuses_the_prepared_data(smoke, tmp_path):
    # a time limit that has passed before the first training can start: the run is reported, not lost
    output = tmp_path / "again.json"
    result = _benchmark("--cpu-smoke", "--data", str(LA_LITE), "--workdir", str(smoke["workdir"]), "--seed", "1",
                        "--trainers", "nnUNetTrainer", "--time-limit", "0.5", "--output", str(output), timeout=300)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(output.read_text())
    assert doc["datasets"]["semi"]["reused"] is True and "all" not in doc["datasets"]
    stages = [s["stage"] for s in doc["stages"]]
    assert not [s for s in stages if s.startswith(("plan_", "preprocess_"))]
    assert doc["runs"]["nnUNetTrainer"]["status"] == "timeout"
    assert "timeout" in doc["table"] and doc["paired"] == {}
    # the earlier benchmark's results are untouched, in their own folder
    assert Path(smoke["doc"]["settings"]["run_dir"]) != Path(doc["settings"]["run_dir"])
    assert (Path(smoke["doc"]["runs"]["nnUNetTrainer"]["model"]) / "checkpoint_final.pth").is_file()


def test_refuses_bad_command_lines_with_one_line(tmp_path):
    cases = [
        (["--cpu-smoke", "--steps", "5"], "not a multiple of --iterations-per-epoch"),
        (["--cpu-smoke", "--data", str(tmp_path / "nowhere")], "folder not found"),
        (["--cpu-smoke", "--trainers", "nnUNetTrainer", "nnUNetTrainer"], "twice"),
        (["--cpu-smoke", "--trainers", "nnUNetTrainer:half"], "TRAINER:all"),
    ]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    cases.append((["--cpu-smoke", "--workdir", str(tmp_path / "busy")], "not made by this benchmark"))
    for args, message in cases:
        result = _benchmark(*args, timeout=120)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.strip().startswith("error:") and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


@needs_lite
@pytest.mark.parametrize("runs, message", [
    (["nnUNetTrainer", "nnUNetTrainerNoSuchThing"], "nnU-Net finds no trainer nnUNetTrainerNoSuchThing"),
    (["nnUNetTrainerSASSNet:all"], "no unlabeled scans"),
], ids=["unknown", "semi-supervised-on-all-labeled"])
def test_impossible_runs_are_refused_before_any_work(tmp_path, runs, message):
    workdir = tmp_path / "work"
    result = _benchmark("--cpu-smoke", "--data", str(LA_LITE), "--workdir", str(workdir), "--trainers", *runs,
                        timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last
    assert not list((workdir / "nnUNet_raw").iterdir())
