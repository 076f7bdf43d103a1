"""``benchmarks/train_speed.py --cpu-smoke`` end to end: real LA lite scans, tiny plans, a few steps.

CPU timings mean nothing; what is checked is that every target line is measured from one run and that the
measurements are of the right thing (one U-Net forward per step, both loader streams timed, the plan's
patch), so that the GPU call spends its minutes on numbers, not on crashes.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import LA_LITE, EarlyStart, early_start

REPO = Path(__file__).resolve().parents[1]


SPEED = [sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--device", "cpu", "--cpu-smoke", "--data",
         str(LA_LITE), "--labeled", "2", "--unlabeled", "2"]


@early_start("speed_smoke")
def start_speed_smoke(context: dict, early: EarlyStart) -> dict | None:
    """Two calls (run by the background lane: see ``started_early``): every target with a variant, then target 6
    alone on the dataset the first call made; None without the data."""
    if not LA_LITE.is_dir():
        return None
    root = context["tmp_path_factory"].mktemp("speed")
    output, again, work = root / "speed.json", root / "epochs.json", root / "work"
    first = early.command([*SPEED, "--workdir", str(work), "--output", str(output), "--variants",
                           "nnUNetTrainerSASSNetHalfResD"], REPO, context["environ"], timeout=900)
    plan_log = work / "logs" / "plan_701.log"
    planned = plan_log.stat().st_mtime_ns if first.returncode == 0 else None
    second = early.command([*SPEED, "--epochs-only", "--workdir", str(work), "--output", str(again)], REPO,
                           context["environ"], timeout=900) if first.returncode == 0 else None
    return {"first": first, "output": output, "second": second, "again": again, "plan_log": plan_log,
            "planned": planned}


@pytest.fixture(scope="module")
def speed_smoke(started_early) -> dict:
    """The two calls' exits and outputs."""
    return started_early["speed_smoke"].result()


@pytest.mark.slow
@pytest.mark.needs_la_data(LA_LITE)
def test_speed_benchmark_measures_every_target_in_one_run(speed_smoke):
    calls = speed_smoke
    result = calls["first"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(calls["output"].read_text())

    assert figures["patch_size"] == [16, 16, 16] and figures["compile"] == "f"
    assert figures["complete"] is True  # written after every stage; True only once every target is in
    targets = figures["targets"]
    assert [label.split()[0] for label in targets] == ["1", "2", "3", "5", "1", "6"]
    assert "1 nnUNetTrainerSASSNetHalfResD: step 2L+2U vs nnUNetTrainer batch 4" in targets
    assert figures["variants"]["nnUNetTrainerSASSNetHalfResD"]["forward_passes_per_step"] == 1
    assert all(math.isfinite(t["value"]) and t["value"] > 0 for t in targets.values())
    # the SASSNet step runs the U-Net once on labeled + unlabeled patches
    assert figures["nnUNetTrainerSASSNet_2plus2"]["forward_passes_per_step"] == 1
    assert figures["nnUNetTrainer_batch4"]["forward_passes_per_step"] == 1

    # target 6: both trainers at nnUNet_n_proc_DA=1 with their real loaders; SASSNet's unlabeled stream adds
    # its own worker (half of nnU-Net's, at least one), and its waits are counted with the labeled ones
    (epochs,) = figures["epochs"]
    assert epochs["nnUNet_n_proc_DA"] == 1
    stock, ours = epochs["nnUNetTrainer"], epochs["nnUNetTrainerSASSNet"]
    assert stock["augmentation_processes"] == 1 and ours["augmentation_processes"] == 2
    for run in (stock, ours):
        assert run["iterations"] == 2 and 0 <= run["loader_wait_s"] <= run["wall_s"]
    assert epochs["wall_ratio"] == pytest.approx(ours["wall_s"] / stock["wall_s"])
    for line in ("target 1 ", "target 6 wall time of 2 iterations with loaders, nnUNet_n_proc_DA=1"):
        assert line in result.stdout
    # where the GPU waits: every part of nnU-Net's augmentation pipeline timed, costliest first, and the
    # processes that would keep up with each step (SASSNet's step takes two batches: twice nnUNetTrainer's need)
    profile = figures["augmentation"]
    parts = [row["part"] for row in profile["parts"]]
    assert parts[0] == profile["costliest"] and "SpatialTransform" in parts and "MirrorTransform" in parts
    assert parts.count("loading and cropping (nnUNetDataLoader)") == 1 and "GaussianNoiseTransform (p 0.1)" in parts
    assert sum(row["share"] for row in profile["parts"]) == pytest.approx(1.0)
    assert [row["s_per_batch"] for row in profile["parts"]] == sorted((r["s_per_batch"] for r in profile["parts"]),
                                                                     reverse=True)
    for run, streams in ((stock, 1), (ours, 2)):
        step = (run["wall_s"] - run["loader_wait_s"]) / run["iterations"]
        assert run["workers_to_keep_up"] == pytest.approx(profile["s_per_batch"] * streams / step)
    assert f"costliest part: {profile['costliest']}" in result.stdout

    # a call cut short after targets 1-5 is completed by target 6 alone, on the dataset the first call made
    result = calls["second"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(calls["again"].read_text())
    assert [label.split()[0] for label in figures["targets"]] == ["6"] and figures["complete"] is True
    assert "nnUNetTrainer_batch4" not in figures and len(figures["epochs"]) == 1 and figures["augmentation"]["parts"]
    # the prepared dataset was reused, not planned again
    assert calls["plan_log"].stat().st_mtime_ns == calls["planned"]
