"""``benchmarks/train_speed.py --cpu-smoke`` end to end: real LA lite scans, tiny plans, a few steps.

CPU timings mean nothing; what is checked is that every target line is measured from one run and that the
measurements are of the right thing (one U-Net forward per step, both loader streams timed, the plan's
patch), so that the GPU call spends its minutes on numbers, not on crashes.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LA_LITE

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.needs_la_data(LA_LITE)
def test_speed_benchmark_measures_every_target_in_one_run(tmp_path):
    output = tmp_path / "speed.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--device", "cpu",
                             "--cpu-smoke", "--data", str(LA_LITE), "--workdir", str(tmp_path / "work"),
                             "--labeled", "2", "--unlabeled", "2", "--output", str(output),
                             "--variants", "nnUNetTrainerSASSNetHalfResD"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(output.read_text())

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

    # a call cut short after targets 1-5 is completed by target 6 alone, on the dataset the first call made
    again, plan_log = tmp_path / "epochs.json", tmp_path / "work" / "logs" / "plan_701.log"
    planned = plan_log.stat().st_mtime_ns
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--device", "cpu",
                             "--cpu-smoke", "--epochs-only", "--data", str(LA_LITE), "--workdir",
                             str(tmp_path / "work"), "--labeled", "2", "--unlabeled", "2", "--output", str(again)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(again.read_text())
    assert [label.split()[0] for label in figures["targets"]] == ["6"] and figures["complete"] is True
    assert "nnUNetTrainer_batch4" not in figures and len(figures["epochs"]) == 1
    assert plan_log.stat().st_mtime_ns == planned  # the prepared dataset was reused, not planned again
