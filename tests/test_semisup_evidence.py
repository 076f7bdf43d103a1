"""The benchmark's statistics and verdicts on hand-made ledger entries, the tables and the README's
"Which trainer to use" table made from them, and the carried work folder's duplicates left out and put back.

Every number below can be checked by hand: 20 scans whose Dice differences are chosen, not drawn.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.la_semisup import carry, evidence, tables, which_trainer
from nnunet_sassnet.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
SCANS = [f"scan{i:02d}" for i in range(20)]
BASE_DICE = 0.80


def entry(trainer: str, seed: int, points: list[float] | None = None, *, settings_id: str = "s-new",
          kind: str = "train", data: str = "semi", protocol_id: str = "p8", status: str = "done", call: str = "c1",
          finished: str = "2026-11-27T10:00:00Z", commit: str = "abcdef0123", title: str | None = None,
          train_s: float = 300.0) -> dict:
    """A ledger entry whose Dice on scan i is BASE_DICE + points[i] / 100 (points: per-scan ΔDice vs BASE_DICE)."""
    points = points if points is not None else [0.0] * len(SCANS)
    cases = {c: {"dice": BASE_DICE + p / 100} for c, p in zip(SCANS, points)} if status == "done" else None
    mean = sum(BASE_DICE + p / 100 for p in points) / len(points)
    return {"key": f"{trainer}/s{seed}", "title": title or trainer, "kind": kind, "trainer": trainer, "data": data,
            "seed": seed, "compile": False, "settings_id": settings_id, "trainer_settings": {"x": settings_id},
            "protocol_id": protocol_id, "protocol": {"num_labeled": 8 if protocol_id == "p8" else 4,
                                                     "num_unlabeled": 52, "num_eval": 20, "steps": 3000,
                                                     "spacing_mm": 1.25, "cpu_smoke": False, "split": protocol_id,
                                                     "plans": "nnUNetPlans", "configuration": "3d_fullres",
                                                     "fold": "all", "iterations_per_epoch": 250,
                                                     "test_time_mirroring": True, "step_size": 0.5,
                                                     "nnunet": "2.8.1"},
            "labeled": 8, "unlabeled": 52, "status": status, "cases": cases,
            "mean": {"dice": mean} if cases else None, "std": {}, "seconds": {"train": train_s},
            "call": {"id": call, "concurrency": 4}, "device": "NVIDIA H200", "finished_utc": finished,
            "commit": commit}


def baselines(seeds=(0, 1, 2), protocol_id: str = "p8") -> list[dict]:
    return [entry("nnUNetTrainer", s, settings_id="nnunet", protocol_id=protocol_id) for s in seeds]


ONE_SCAN = [21.0] + [0.0] * 19  # +21 points on one scan, level elsewhere: mean +1.05


def test_one_scan_carrying_the_mean_does_not_pay():
    """Every seed +1.05 and the pooled mean above +1.0, but only because of one scan: the interval reaches 0."""
    runs = [entry("nnUNetTrainerX", s, ONE_SCAN) for s in (0, 1, 2)]
    found = evidence.evidence(runs, baselines() + runs)
    stats = found["pooled"]
    assert [round(p["mean_dice_diff_points"], 6) for p in found["pairs"].values()] == [1.05, 1.05, 1.05]
    assert stats["seeds"] == [0, 1, 2] and stats["mean"] == pytest.approx(1.05)
    assert stats["median"] == pytest.approx(0.0) and stats["wins"] == 1 and stats["n"] == 20
    # a resample leaves the one scan out with probability 0.95^20 = 36 % > 2.5 %: the lower end is 0
    assert stats["interval"][0] == pytest.approx(0.0, abs=1e-9) and stats["interval"][1] > 2.0
    assert (found["verdict"], found["why"]) == (evidence.DOES_NOT_PAY, "interval from +0.00, not above 0")


def test_a_gain_on_every_scan_and_seed_pays():
    """+1.0 to +2.9 points on the 20 scans (mean +1.95) on each of seeds 0, 1 and 2."""
    points = [1.0 + 0.1 * i for i in range(20)]
    runs = [entry("nnUNetTrainerX", s, points) for s in (0, 1, 2)]
    found = evidence.evidence(runs, baselines() + runs)
    assert found["pooled"]["mean"] == pytest.approx(1.95) and found["pooled"]["wins"] == 20
    low, high = found["pooled"]["interval"]
    assert 1.5 < low < 1.95 < high < 2.4
    assert (found["verdict"], found["why"]) == (evidence.PAYS, "")


def test_pooling_averages_each_scan_over_the_seeds_both_have():
    """Seed 0 gains 4 points on scan 0, seed 1 on scan 1: per scan +2, +2 and 0 elsewhere; seed 2 of the setting
    exists but nnUNetTrainer has no seed 2, so it is not pooled."""
    s0, s1 = [4.0] + [0.0] * 19, [0.0, 4.0] + [0.0] * 18
    runs = [entry("nnUNetTrainerX", 0, s0), entry("nnUNetTrainerX", 1, s1), entry("nnUNetTrainerX", 2, [9.0] * 20)]
    found = evidence.evidence(runs, baselines((0, 1)) + runs)
    stats = found["pooled"]
    assert stats["seeds"] == [0, 1] and stats["per_case_points"]["scan00"] == pytest.approx(2.0)
    assert stats["per_case_points"]["scan01"] == pytest.approx(2.0) and stats["wins"] == 2
    assert stats["mean"] == pytest.approx(0.2) and stats["median"] == pytest.approx(0.0)
    # seeds 0 and 1 positive: seed 2 (of nnUNetTrainer too) decides
    assert (found["verdict"], found["why"]) == (evidence.OPEN, "seeds 0 and 1 positive: seed 2 to run")
    assert evidence.positive_on_first_seeds(runs, baselines((0, 1)) + runs)


@pytest.mark.parametrize("seed_points, expected", [
    ({0: -0.5}, (evidence.DOES_NOT_PAY, "seed 0 -0.50")),  # one negative seed settles it
    ({0: 2.0, 1: -0.1, 2: 3.0}, (evidence.DOES_NOT_PAY, "seed 1 -0.10")),
    ({0: 0.0, 1: 2.0}, (evidence.DOES_NOT_PAY, "seed 0 +0.00")),  # level is not positive
    ({0: 0.5}, (evidence.OPEN, "seed 1 to run")),
    ({1: 0.5}, (evidence.OPEN, "seed 0 to run")),
    ({}, (evidence.OPEN, "seeds 0 and 1 to run")),
    ({0: 0.8, 1: 0.6, 2: 0.7}, (evidence.DOES_NOT_PAY, "+0.70 over the seeds, below +1.0")),
], ids=["negative", "one-of-three-negative", "zero", "seed-1-missing", "seed-0-missing", "none", "below-one-point"])
def test_verdict_rule(seed_points, expected):
    """Seeds whose every scan moves by the same amount (the interval is that amount)."""
    runs = [entry("nnUNetTrainerX", s, [p] * 20) for s, p in seed_points.items()]
    found = evidence.evidence(runs, baselines() + runs)
    assert (found["verdict"], found["why"]) == expected


def test_bootstrap_interval_is_reproducible_and_exact_for_constant_values():
    values = [0.3, -1.2, 2.5, 0.0, 1.1, -0.4]
    assert evidence.bootstrap_interval(values) == evidence.bootstrap_interval(list(values))
    assert evidence.bootstrap_interval([1.5] * 20) == pytest.approx((1.5, 1.5))
    # another generator seed moves the ends a little, the mean stays inside
    other = evidence.bootstrap_interval(values, seed=1)
    assert other != evidence.bootstrap_interval(values) and other[0] < sum(values) / 6 < other[1]


def test_runs_of_one_trainer_with_other_settings_are_told_apart():
    """The older settings of a trainer carry the date and commit of their last run; titles that already name
    their defaults stay as they are; a class whose defaults changed since its last run marks every older one."""
    old = entry("nnUNetTrainerBCP", 0, [1.0] * 20, settings_id="one-stage", finished="2026-11-26T22:05:00Z",
                commit="6422561aaaa")
    new = entry("nnUNetTrainerBCP", 0, [2.0] * 20, settings_id="two-stage", call="c2")
    imported = entry("nnUNetTrainerSDM", 0, settings_id="sdm-old", title="nnUNetTrainerSDM (defaults of 6e1f341)")
    pool = baselines((0,)) + [imported, old, new]
    labels = evidence.setting_labels(pool)
    assert labels[evidence.setting_key(old)] == "nnUNetTrainerBCP (settings of 2026-11-26, 6422561)"
    assert labels[evidence.setting_key(new)] == "nnUNetTrainerBCP"
    assert labels[evidence.setting_key(imported)] == "nnUNetTrainerSDM (defaults of 6e1f341)"
    moved = evidence.setting_labels(pool, current={"nnUNetTrainerBCP": "three-stage"})
    assert moved[evidence.setting_key(new)] == "nnUNetTrainerBCP (settings of 2026-11-27, abcdef0)"
    # the generated page shows both BCP rows with their own figures, and the settings table names the labels
    text = tables.ledger_sections(pool)
    old_row = next(line for line in text.splitlines()
                   if line.startswith("| nnUNetTrainerBCP (settings of 2026-11-26, 6422561) | +1.00 (20/20; +1.00) |"))
    assert old_row.endswith("| **open**: seed 1 to run, but these settings are superseded (no more seeds) | 1 done |")
    assert "| nnUNetTrainerBCP | +2.00 (20/20; +2.00) |" in text
    assert "| **open**: seed 1 to run | 1 done |" in text  # the new BCP's seed 1 is still to come
    assert "| nnUNetTrainerBCP | one-stage | nnUNetTrainerBCP (settings of 2026-11-26, 6422561) |" in text


def test_summary_rows_show_the_pooled_difference_and_the_verdict():
    runs = [entry("nnUNetTrainerX", s, ONE_SCAN) for s in (0, 1)]
    text = tables.ledger_sections(baselines((0, 1)) + runs)
    row = next(line for line in text.splitlines() if line.startswith("| nnUNetTrainerX |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    low, high = evidence.bootstrap_interval(ONE_SCAN)
    assert cells[1:4] == ["+1.05 (1/20; +0.00)", "+1.05 (1/20; +0.00)", "—"]
    assert cells[4] == f"+1.05 [{low:+.2f}, {high:+.2f}]" and cells[5:7] == ["+0.00", "1/20 (seeds 0, 1)"]
    assert cells[7] == "**open**: seeds 0 and 1 positive: seed 2 to run"
    base = next(line for line in text.splitlines() if line.startswith("| nnUNetTrainer |"))
    assert "(baseline) | (baseline) | — |" in base


def _readme_pool() -> list[dict]:
    """Runs of real trainer names, with the settings ids of the classes as this checkout defines them (what
    ``--tables`` compares with); BCP also with older settings."""
    from benchmarks.la_semisup.trainer_lookup import current_settings_ids
    ids = current_settings_ids(["nnUNetTrainer", "nnUNetTrainerSASSNet", "nnUNetTrainerBCP"])
    ours = [entry("nnUNetTrainerSASSNet", s, [-0.5] * 20, settings_id=ids["nnUNetTrainerSASSNet"], train_s=350 + s)
            for s in (0, 1)]
    bcp = [entry("nnUNetTrainerBCP", 0, [1.0] * 20, settings_id="one-stage", train_s=400),
           entry("nnUNetTrainerBCP", 0, [3.0] * 20, settings_id=ids["nnUNetTrainerBCP"], call="c2", train_s=430)]
    selftrain = [entry("nnUNetTrainer", s, [0.5] * 20, kind="self_training", settings_id=ids["nnUNetTrainer"],
                       title="nnUNetTrainer self-training (labeled, then labeled + pseudo-labeled)") for s in (0, 1)]
    four = [entry("nnUNetTrainer", 0, settings_id=ids["nnUNetTrainer"], protocol_id="p4"),
            entry("nnUNetTrainerBCP", 0, [4.0] * 20, settings_id=ids["nnUNetTrainerBCP"], protocol_id="p4")]
    base = [entry("nnUNetTrainer", s, settings_id=ids["nnUNetTrainer"]) for s in (0, 1)]
    return base + ours + bcp + selftrain + four


def test_which_trainer_table_follows_the_verdicts_with_the_current_settings_only():
    text = which_trainer.which_trainer_tables(_readme_pool())
    eight, four = text.split("**4 labeled + 52 unlabeled scans**")
    rows = [line for line in eight.splitlines() if line.startswith("| `")]
    # baseline first, then by ΔDice (over the seeds, else seed 0's); the one-stage BCP is superseded
    assert [r.split(" | ")[0] for r in rows] == ["| `nnUNetTrainer`", "| `nnUNetTrainerBCP`",
                                                  "| `nnUNetTrainer` self-training", "| `nnUNetTrainerSASSNet`"]
    bcp = rows[1]
    assert "| 83.00 / — / — | s0 +3.00 | — | **open**: seed 1 to run | 430 s, 4 at once |" in bcp
    assert which_trainer.DESCRIPTIONS["nnUNetTrainerBCP"] in bcp
    sassnet = rows[3]
    assert "s0 -0.50, s1 -0.50 | -0.50 [-0.50, -0.50] | **does not pay**: seed 0 -0.50 | 350–351 s, 4 at once" \
        in sassnet
    assert which_trainer.SELF_TRAINING in rows[2] and "| (baseline) | — | (baseline) |" in rows[0]
    assert "| `nnUNetTrainerBCP` |" in four and "s0 +4.00" in four


def test_tables_command_refreshes_the_readme_table_between_its_markers(tmp_path):
    """``--tables`` makes the results page and the README table from one ledger; the rest of both stays."""
    ledger_file, doc, readme = tmp_path / "ledger.jsonl", tmp_path / "results.md", tmp_path / "README.md"
    ledger_file.write_text("".join(json.dumps(e) + "\n" for e in _readme_pool()))
    doc.write_text(f"# Results\n\n{tables.BEGIN}\nold\n{tables.END}\nafter\n")
    readme.write_text(f"# Title\n\n### Which trainer to use\n\n{which_trainer.BEGIN}\nold table\n"
                      f"{which_trainer.END}\n\nText after.\n")
    cmd = [sys.executable, "-m", "benchmarks.la_semisup", "--tables", "--ledger", str(ledger_file), "--results-doc",
           str(doc), "--readme", str(readme)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert text.startswith("# Title\n\n### Which trainer to use\n\n") and text.endswith("Text after.\n")
    assert "old table" not in text and which_trainer.which_trainer_tables(_readme_pool()) in text
    assert "**does not pay**" in doc.read_text() and doc.read_text().endswith("after\n")
    assert "(settings of 2026-11-27, abcdef0)" in doc.read_text()  # the one-stage BCP
    # a README without the markers is left as it is
    readme.write_text("# no markers\n")
    assert not which_trainer.update_readme(readme, _readme_pool()) and readme.read_text() == "# no markers\n"


def test_carried_work_folder_leaves_out_duplicate_scans_and_puts_them_back(tmp_path):
    raw = tmp_path / "nnUNet_raw"
    for dataset, cases in (("Dataset901_LAsemi", ("a", "b", "c")), ("Dataset915_LAsemi4", ("a", "b"))):
        for case in cases:
            (raw / dataset / "imagesTr").mkdir(parents=True, exist_ok=True)
            (raw / dataset / "imagesTr" / f"{case}.nii.gz").write_bytes(case.encode() * 1000)
        (raw / dataset / "dataset.json").write_text(json.dumps({"name": dataset}))
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    assert carry.pack(tmp_path) == 2000
    assert not list((raw / "Dataset915_LAsemi4" / "imagesTr").iterdir())
    assert (raw / "Dataset915_LAsemi4" / "dataset.json").is_file()  # differs: kept
    assert carry.unpack(tmp_path) == 2 and not (tmp_path / carry.MANIFEST).exists()
    assert {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before
    # a kept file gone missing is named, with the fix
    carry.pack(tmp_path)
    (raw / "Dataset901_LAsemi" / "imagesTr" / "a.nii.gz").unlink()
    with pytest.raises(UserInputError, match="a.nii.gz is missing.*lent_gpu.sh prepare"):
        carry.unpack(tmp_path)
