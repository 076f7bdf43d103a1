"""``python -m benchmarks.la_semisup`` end to end on the CPU: real LA lite scans, tiny plans, a few steps.

The smoke call runs a queue file: it converts, plans and preprocesses the data, trains through nnU-Net's own
training entry point (a plain, a semi-supervised and a self-training run), predicts through nnU-Net's
predictor, scores with the project's evaluator, appends every finished run to a ledger and regenerates a
results document from it; the tests then read what it wrote. The numbers themselves mean nothing at 4 steps;
their presence, finiteness and bookkeeping (the ledger, the paired comparison, reuse) are what is checked.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LA_LITE, EarlyStart, early_start

from benchmarks.la_semisup import ledger, tables
from benchmarks.la_semisup.queue import load_queue
from benchmarks.la_semisup.settings import build_parser, resolve_settings
from benchmarks.la_semisup.split import make_split
from benchmarks.la_semisup.supervisor import Supervisor
from nnunet_sassnet.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
SMOKE_STEPS, SMOKE_EPOCHS = 4, 2  # --cpu-smoke: 2 epochs x 2 iterations
QUEUE = {"runs": [{"trainer": "nnUNetTrainer", "seeds": [0]},
                  {"trainer": "nnUNetTrainerSASSNet", "seeds": [0]},
                  {"trainer": "nnUNetTrainer", "kind": "self_training", "seeds": [0]},
                  {"trainer": "nnUNetTrainerNotWrittenYet", "seeds": [0]},
                  {"trainer": "nnUNetTrainer", "seeds": [0], "num_labeled": 1}]}
DONE = ("nnUNetTrainer/s0", "nnUNetTrainerSASSNet/s0", "selftrain:nnUNetTrainer/s0", "nnUNetTrainer@1labeled/s0")
BUDGET = "nnUNetTrainer@1labeled/s0"  # a second label budget: the first of the 2 labeled scans

needs_lite = pytest.mark.needs_la_data(LA_LITE)


def _benchmark(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the benchmark's command line; past ``timeout`` it gets SIGTERM, so that it stops its own tools."""
    cmd = [sys.executable, "-m", "benchmarks.la_semisup", *args]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=120)
            raise AssertionError(f"benchmark still running after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _read_ledger(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@early_start("la_semisup_smoke")
def start_la_semisup_smoke(context: dict, early: EarlyStart) -> dict | None:
    """One --cpu-smoke queue call (run by the background lane: see ``started_early``); None without the data."""
    if not LA_LITE.is_dir():
        return None
    root = context["tmp_path_factory"].mktemp("la_semisup")
    queue, doc = root / "queue.json", root / "results.md"
    queue.write_text(json.dumps(QUEUE))
    doc.write_text(f"# Results\n\n{tables.BEGIN}\n{tables.END}\n\nText after the tables.\n")
    workdir, output, ledger_file = root / "work", root / "call.json", root / "ledger.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.la_semisup", "--cpu-smoke", "--queue", str(queue), "--data",
           str(LA_LITE), "--workdir", str(workdir), "--output", str(output), "--ledger", str(ledger_file),
           "--results-doc", str(doc)]
    # past the timeout the lane sends SIGTERM first, so that the benchmark stops its own tools
    result = early.command(cmd, REPO, context["environ"], timeout=1500)
    return {"result": result, "output": output, "ledger": ledger_file, "doc": doc, "queue": queue,
            "workdir": workdir, "root": root}


@pytest.fixture(scope="module")
def la_semisup_smoke(started_early) -> dict:
    """The smoke call's exit, its JSON, its ledger, its results document, its work folder."""
    made = started_early["la_semisup_smoke"].result()
    result = made["result"]
    if result.returncode != 0:
        raise AssertionError(f"benchmark failed ({result.returncode}):\n{result.stdout[-6000:]}\n"
                             f"{result.stderr[-3000:]}")
    return {**made, "call": json.loads(made["output"].read_text())}


def _training_started(output: Path) -> bool:
    """Whether the call that writes ``output`` has started its training (its log exists)."""
    try:
        run_dir = Path(json.loads(output.read_text())["settings"]["run_dir"])
    except (OSError, ValueError, KeyError):
        return False
    return (run_dir / "logs" / "train_nnUNetTrainer-s1.log").is_file()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
@needs_lite
def test_every_finished_run_is_in_the_ledger_with_its_record(la_semisup_smoke):
    entries = _read_ledger(la_semisup_smoke["ledger"])
    assert sorted(e["key"] for e in entries) == sorted(DONE)
    evaluation = la_semisup_smoke["call"]["split"]["evaluation"]
    for entry in entries:
        assert entry["status"] == "done", (entry["key"], entry.get("error"))
        assert sorted(entry["cases"]) == sorted(evaluation)
        for metric in ("dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm"):
            assert _finite(entry["mean"][metric]) and _finite(entry["std"][metric]), (entry["key"], metric)
        assert 0.0 <= entry["mean"]["jaccard"] <= entry["mean"]["dice"] <= 1.0
        assert entry["device"] == "CPU" and entry["finished_utc"].startswith(entry["call"]["id"][:10])
        # the commit the call ran at (this checkout's history holds it) and the command line
        assert re.fullmatch(r"[0-9a-f]{40}", entry["commit"]) and "--queue" in entry["call"]["command"]
        assert subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", entry["commit"], "HEAD"]
                              ).returncode == 0
        assert entry["protocol"]["steps"] == SMOKE_STEPS and entry["protocol"]["num_eval"] == 2
    by_key = {e["key"]: e for e in entries}
    # the settings recorded are the trainer class's own; stock nnU-Net has none
    assert by_key["nnUNetTrainer/s0"]["trainer_settings"] == {}
    from nnunet_sassnet.trainers import nnUNetTrainerSASSNet
    sassnet = by_key["nnUNetTrainerSASSNet/s0"]
    assert sassnet["trainer_settings"]["adversarial_weight_max"] == nnUNetTrainerSASSNet.adversarial_weight_max
    assert [by_key[k]["unlabeled"] for k in DONE] == [0, 2, 2, 0] and sassnet["semi_supervised"]
    # the second budget: its own dataset and protocol (the first labeled scan, the same evaluation scans)
    budget, split = by_key[BUDGET], la_semisup_smoke["call"]["split"]
    assert budget["labeled"] == 1 and budget["protocol"]["num_labeled"] == 1
    assert budget["protocol_id"] != by_key["nnUNetTrainer/s0"]["protocol_id"]
    assert la_semisup_smoke["call"]["budgets"]["semi1"]["labeled"] == split["labeled"][:1]
    assert "Dataset912_LAsemi1" in budget["model"]
    # each training's per-epoch log: the unlabeled term's figures for SASSNet, nnU-Net's losses for every run
    for key in DONE:
        assert len(by_key[key]["training_log"]["train_losses"]) == SMOKE_EPOCHS, key
    log = sassnet["training_log"]
    assert all(len(log[k]) == SMOKE_EPOCHS for k in ("adversarial_weights", "adv_grad_ratios", "disc_acc_labeled"))
    assert "adv_grad_ratios" not in by_key["nnUNetTrainer/s0"]["training_log"]
    # a trainer that does not exist yet is left out of the call, not recorded
    assert la_semisup_smoke["call"]["runs"]["nnUNetTrainerNotWrittenYet/s0"]["status"] == "trainer not found"
    assert "nnUNetTrainerNotWrittenYet/s0: left out of this call" in la_semisup_smoke["result"].stdout


@pytest.mark.slow
@needs_lite
def test_trainings_follow_the_protocol_and_stages_are_timed(la_semisup_smoke):
    entries = {e["key"]: e for e in _read_ledger(la_semisup_smoke["ledger"])}
    for key, entry in entries.items():
        checkpoint = torch.load(Path(entry["model"]) / "checkpoint_final.pth", map_location="cpu",
                                weights_only=False)
        assert checkpoint["trainer_name"] == f"{entry['trainer']}_LAbench"
        assert checkpoint["current_epoch"] == SMOKE_EPOCHS, key
        assert Path(entry["model"]).is_relative_to(la_semisup_smoke["workdir"])
    stages = {s["stage"]: s for s in la_semisup_smoke["call"]["stages"]}
    for key, entry in entries.items():
        slug = re.sub(r"[^A-Za-z0-9_.-]", "-", key)  # RunSpec.slug
        # self-training's scored model is its second training's
        steps = ("train2" if entry["kind"] == "self_training" else "train", "predict", "evaluate")
        train, predict, evaluate = (stages[f"{step}_{slug}"] for step in steps)
        assert all(s["status"] == "ok" for s in (train, predict, evaluate))
        # each stage starts when the one before it has ended, and the ledger has the same times
        assert train["end_s"] <= predict["start_s"] and predict["end_s"] <= evaluate["start_s"]
        assert train["seconds"] == pytest.approx(train["end_s"] - train["start_s"], abs=0.02)
        assert entry["seconds"]["train"] == pytest.approx(train["seconds"], abs=0.02) and train["seconds"] > 1
    assert la_semisup_smoke["call"]["elapsed_s"] >= max(s["end_s"] for s in stages.values())


@pytest.mark.slow
@needs_lite
def test_self_training_trains_twice_on_labeled_then_pseudo_labeled_scans(la_semisup_smoke):
    entry = next(e for e in _read_ledger(la_semisup_smoke["ledger"]) if e["kind"] == "self_training")
    call = la_semisup_smoke["call"]
    assert set(entry["seconds"]) >= {"train_labeled", "pseudo_label", "plan_pseudo_labeled", "train"}
    assert entry["seconds"]["train_labeled"] > 1 and entry["seconds"]["train"] > 1
    run_folder = Path(entry["model"]).parents[3]
    # through nnunet_sassnet_selftrain: its round's record in the student's dataset, every step done
    student = run_folder / "nnUNet_raw" / "Dataset903_LAselftrain"
    record = json.loads((student / "selftraining.json").read_text())
    assert [s for s, r in record["steps"].items() if r["status"] == "done"] == ["teacher", "pseudo_labels", "dataset",
                                                                                 "student"]
    pseudo = sorted(p.name for p in (student / "pseudo_labels").glob("*.nii.gz"))
    assert pseudo == sorted(f"{c}.nii.gz" for c in call["split"]["unlabeled"])
    labels = sorted(p.name for p in (student / "labelsTr").iterdir())
    assert labels == sorted(f"{c}.nii.gz" for c in call["split"]["labeled"] + call["split"]["unlabeled"])
    # its cost is shown as two trainings
    assert "(2 trainings)" in la_semisup_smoke["doc"].read_text()


@pytest.mark.slow
@needs_lite
def test_results_document_is_regenerated_from_the_ledger(la_semisup_smoke):
    entries = _read_ledger(la_semisup_smoke["ledger"])
    text = la_semisup_smoke["doc"].read_text()
    assert text.startswith("# Results\n") and text.endswith("Text after the tables.\n")
    base = next(e for e in entries if e["key"] == "nnUNetTrainer/s0")
    # the second budget is a protocol of its own, with its own section, where its nnUNetTrainer is the baseline
    budget = next(e for e in entries if e["key"] == BUDGET)
    section = text.split(f"### Protocol {budget['protocol_id']}: ", 1)[1].split("### ", 1)[0]
    assert section.startswith(f"{SMOKE_STEPS} steps, 1 labeled + 2 unlabeled, 2 evaluation scans")
    assert "| nnUNetTrainer | 0 | 1 | 0 | done |" in section and "(baseline)" in section
    for entry in entries:
        if entry is base or entry is budget:
            continue
        pair = tables.paired(entry, base)
        expected = {c: 100 * (entry["cases"][c]["dice"] - base["cases"][c]["dice"]) for c in base["cases"]}
        assert pair["per_case_points"] == pytest.approx(expected)
        assert pair["wins"] == sum(d > 0 for d in expected.values()) and pair["n"] == 2
        assert pair["median_dice_diff_points"] == pytest.approx(sum(expected.values()) / 2)  # two scans
        row = next(line for line in text.splitlines() if line.startswith(f"| {entry['title']} | 0 |"))
        assert f"{pair['mean_dice_diff_points']:.2f} ± {pair['std_dice_diff_points']:.2f}" in row
        assert "| same call |" in row
    # the unlabeled term's figures: SASSNet's row only (the supervised runs have none)
    term = text.split("**What the unlabeled term did**", 1)[1].split("\n\n", 2)[1].splitlines()
    assert [row.split(" | ")[0] for row in term[2:]] == ["| nnUNetTrainerSASSNet"]
    # the call's own table is printed and written beside its JSON
    table = la_semisup_smoke["call"]["table"]
    assert table in la_semisup_smoke["result"].stdout
    assert "(baseline)" in table and "Total wall time" in table


@pytest.mark.slow
@needs_lite
def test_next_call_skips_done_runs_and_an_interrupted_run_is_recorded(la_semisup_smoke, tmp_path):
    smoke, ledger_file = la_semisup_smoke, tmp_path / "ledger.jsonl"
    ledger_file.write_text(smoke["ledger"].read_text())
    again = _benchmark("--cpu-smoke", "--queue", str(smoke["queue"]), "--data", str(LA_LITE), "--workdir",
                       str(smoke["workdir"]), "--ledger", str(ledger_file), "--output", str(tmp_path / "a.json"),
                       timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to run" in again.stdout and ledger_file.read_text() == smoke["ledger"].read_text()
    assert {k: r["status"] for k, r in json.loads((tmp_path / "a.json").read_text())["runs"].items()
            if k in DONE} == dict.fromkeys(DONE, "done earlier (ledger)")
    # a long training on the prepared data, stopped by SIGTERM (what a time-limited caller sends) once it runs
    output = tmp_path / "stopped.json"
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.la_semisup", "--cpu-smoke", "--data", str(LA_LITE),
                                "--workdir", str(smoke["workdir"]), "--trainers", "nnUNetTrainer", "--seeds", "1",
                                "--steps", "2000", "--iterations-per-epoch", "1000", "--ledger", str(ledger_file),
                                "--output", str(output)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and not _training_started(output):
            time.sleep(0.5)
        time.sleep(2)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, out[-3000:]
    call = json.loads(output.read_text())
    assert not [s for s in call["stages"] if s["stage"].startswith(("plan_", "preprocess_"))]
    entries = _read_ledger(ledger_file)
    assert len(entries) == len(DONE) + 1
    assert entries[-1]["key"] == "nnUNetTrainer/s1" and entries[-1]["status"] == "interrupted"
    assert "interrupted" in call["table"]


def test_a_step_past_the_time_limit_is_stopped_and_reported_as_timeout(tmp_path):
    argv = ["--cpu-smoke", "--trainers", "nnUNetTrainer", "--time-limit", "3", "--workdir", str(tmp_path / "w")]
    s = resolve_settings(build_parser().parse_args(argv), argv)
    supervisor = Supervisor(s, [])
    supervisor.doc = {"runs": {}}
    start = time.monotonic()
    result = supervisor.run_step("sleep", [sys.executable, "-c", "import time; print('up', flush=True); "
                                           "time.sleep(60)"], dict(os.environ), cap=600)
    assert result.timed_out and not result.ok and result.error.startswith("timed out")
    assert time.monotonic() - start < 20  # stopped at the limit, not after the 60 s
    assert supervisor.stages[-1]["stage"] == "sleep" and supervisor.stages[-1]["status"] == "timeout"
    assert "up" in result.log.read_text()
    # a step asked for after the limit does not start
    late = supervisor.run_step("late", [sys.executable, "-c", "pass"], dict(os.environ), cap=600)
    assert late.timed_out and late.seconds == 0.0 and supervisor.stages[-1]["status"] == "skipped"


@needs_lite
def test_imported_seed0_baseline_is_reused_by_the_queue(tmp_path):
    """The ledger's nnUNetTrainer seed 0 (2026-11-26, before the ledger) has the identity of queue_la8's run."""
    queue_file = REPO / "benchmarks" / "queue_la8.json"
    argv = ["--queue", str(queue_file), "--data", str(LA_LITE), "--workdir", str(tmp_path / "w")]
    protocol, runs, rules = load_queue(queue_file)
    s = resolve_settings(build_parser().parse_args(argv), argv, protocol, runs, rules)
    proto = ledger.protocol(s, make_split(s), "2.8.1")
    recorded = ledger.read_ledger(REPO / "docs" / "semisup_ledger.jsonl")
    (base_run,) = [r for r in runs if r.key == "nnUNetTrainer/s0"]
    baseline = ledger.new_entry(base_run, proto, make_split(s), {}, {})
    assert ledger.identity(baseline) in ledger.done_identities(recorded)
    # the SASSNet of those runs had other defaults: today's nnUNetTrainerSASSNet is not taken for it
    old = next(e for e in recorded if e["trainer"] == "nnUNetTrainerSASSNet")
    assert old["trainer_settings"]["adversarial_weight_max"] == 0.001 and "6e1f341" in old["title"]
    from benchmarks.la_semisup.trainer_lookup import class_settings
    from nnunet_sassnet.trainers import nnUNetTrainerSASSNet
    if class_settings(nnUNetTrainerSASSNet) != old["trainer_settings"]:
        sassnet = next(r for r in runs if r.key == "nnUNetTrainerSASSNet/s0")
        sassnet.settings = class_settings(nnUNetTrainerSASSNet)
        assert ledger.identity(ledger.new_entry(sassnet, proto, make_split(s), {}, {})) != ledger.identity(old)


def test_recorded_trainer_settings_include_those_of_mixins():
    """DTC's settings live on a mixin that is not an nnUNetTrainer; a run's record must still name them."""
    from benchmarks.la_semisup.trainer_lookup import class_settings
    from nnunet_sassnet.trainers import nnUNetTrainerDTC, nnUNetTrainerDTCSASSNet

    dtc = class_settings(nnUNetTrainerDTC)
    assert dtc["dtc_weight_max"] == 1.0 and dtc["dtc_heaviside_k"] == 1500.0 and dtc["sdm_loss_weight"] == 0.3
    both = class_settings(nnUNetTrainerDTCSASSNet)
    assert both["dtc_weight_max"] == 1.0 and both["adversarial_weight_max"] == 0.015


def test_an_attribute_added_at_its_old_behaviour_keeps_the_recorded_identity():
    """SASSNet's discriminator_downsampled came after runs were recorded; False is the D they all had, so today's
    class keeps their settings id (they are not trained again), while the half-resolution variant gets its own."""
    from benchmarks.la_semisup.trainer_lookup import class_settings, settings_id
    from nnunet_sassnet.trainers import nnUNetTrainerSASSNet
    from nnunet_sassnet.variants import nnUNetTrainerSASSNetHalfResD

    today = class_settings(nnUNetTrainerSASSNet)
    assert today["discriminator_downsampled"] is False
    before = {k: v for k, v in today.items() if k != "discriminator_downsampled"}
    assert settings_id(today) == settings_id(before)
    assert settings_id(class_settings(nnUNetTrainerSASSNetHalfResD)) != settings_id(before)


@pytest.mark.parametrize("content, message", [
    ({"runs": []}, "at least one run"),
    ({"protocol": {"stepz": 3}, "runs": [{"trainer": "nnUNetTrainer"}]}, "protocol key stepz unknown"),
    ({"runs": [{"trainer": "nnUNetTrainer", "seeds": [0, 0]}]}, "twice"),
    ({"runs": [{"trainer": "nnUNetTrainer", "kind": "distill"}]}, "kind must be one of"),
    ({"runs": [{"trainer": "nnU-Net"}]}, "not a trainer class name"),
    ({"runs": [{"trainer": "nnUNetTrainer", "num_labeled": 0}]}, "num_labeled 0; expected a whole number"),
    ({"runs": [{"trainer": "nnUNetTrainer", "num_labeled": "4"}]}, "num_labeled '4'"),
    ({"runs": [{"trainer": "nnUNetTrainer", "data": "all", "num_labeled": 4}]}, "not to data all"),
    ({"runs": [{"trainer": "nnUNetTrainer"}, {"seed_of_positive": "2"}]}, "seed_of_positive"),
    ({"runs": [{"trainer": "nnUNetTrainer"}, {"seed_of_positive": 2, "trainer": "x"}]}, "seed_of_positive"),
    ({"runs": [{"trainer": "nnUNetTrainer", "seeds": [0]}, {"trainer": "nnUNetTrainer", "seeds": [0],
                                                            "num_labeled": 8, "note": "8 is the protocol's"}],
      "protocol": {"num_labeled": 8}}, None),
], ids=["empty", "unknown-protocol-key", "twice", "unknown-kind", "bad-name", "no-labels", "budget-text",
        "budget-on-all", "rule-seed-text", "rule-with-trainer", "protocol-budget-twice"])
def test_bad_queue_files_are_refused_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "queue.json"
    path.write_text(json.dumps(content))
    if message is None:  # the protocol's own budget named again is the same run: refused once the protocol is known
        protocol, runs, rules = load_queue(path)
        argv = ["--cpu-smoke", "--queue", str(path), "--workdir", str(tmp_path / "w")]
        with pytest.raises(UserInputError, match="twice"):
            resolve_settings(build_parser().parse_args(argv), argv, protocol, runs, rules)
        return
    with pytest.raises(UserInputError, match=message) as raised:
        load_queue(path)
    assert str(path) in str(raised.value)


def _queue_settings(tmp_path, content: dict, *extra: str):
    """The resolved settings of a queue file (a split file of made-up case IDs: no scans needed)."""
    path, split = tmp_path / "queue.json", tmp_path / "split.json"
    path.write_text(json.dumps(content))
    split.write_text(json.dumps({"labeled": ["l1", "l2", "l3", "l4"], "unlabeled": ["u1", "u2"],
                                 "test": ["t1", "t2", "t3"]}))
    argv = ["--cpu-smoke", "--queue", str(path), "--split", str(split), "--data", str(tmp_path / "no_scans"),
            "--workdir", str(tmp_path / "w"), *extra]
    protocol, runs, rules = load_queue(path)
    return resolve_settings(build_parser().parse_args(argv), argv, protocol, runs, rules)


QUEUE_WITH_BUDGETS = {"protocol": {"num_labeled": 4}, "runs": [
    {"trainer": "nnUNetTrainer", "seeds": [0, 2]},
    {"seed_of_positive": 2, "note": "filled in from the ledger"},
    {"trainer": "nnUNetTrainer", "kind": "self_training", "seeds": [0]},
    {"trainer": "nnUNetTrainer", "seeds": [0], "num_labeled": 2},
    {"trainer": "nnUNetTrainer", "seeds": [1], "num_labeled": 4},
    {"seed_of_positive": 2, "num_labeled": 2}]}


def test_queue_items_name_a_smaller_label_budget_and_seed_rules(tmp_path):
    s = _queue_settings(tmp_path, QUEUE_WITH_BUDGETS)
    assert [r.key for r in s.runs] == ["nnUNetTrainer/s0", "nnUNetTrainer/s2", "selftrain:nnUNetTrainer/s0",
                                       "nnUNetTrainer@2labeled/s0", "nnUNetTrainer/s1"]
    assert [(r.num_labeled, r.dataset) for r in s.runs][3:] == [(2, "semi2"), (None, "semi")]
    assert s.budget_dataset_id(2) == 913 and s.budget_dataset_id(4) == 915
    assert [(r.seed, r.num_labeled, r.position) for r in s.seed_rules] == [(2, None, 2), (2, 2, 5)]
    # --kind keeps the runs of one kind, the rules at their place among them
    s = _queue_settings(tmp_path, QUEUE_WITH_BUDGETS, "--kind", "train")
    assert [r.key for r in s.runs] == ["nnUNetTrainer/s0", "nnUNetTrainer/s2", "nnUNetTrainer@2labeled/s0",
                                       "nnUNetTrainer/s1"]
    assert [r.position for r in s.seed_rules] == [2, 4]
    # a budget larger than the protocol's is refused
    with pytest.raises(UserInputError, match="num_labeled 6 is more than the protocol's 4"):
        _queue_settings(tmp_path, {"protocol": {"num_labeled": 4},
                                   "runs": [{"trainer": "nnUNetTrainer", "num_labeled": 6}]})


def test_a_label_budget_keeps_the_unlabeled_and_evaluation_scans_and_is_a_protocol_of_its_own(tmp_path):
    from benchmarks.la_semisup.split import budget_split
    s = _queue_settings(tmp_path, QUEUE_WITH_BUDGETS)
    split = make_split(s)
    two = budget_split(split, 2)
    assert (two.labeled, two.unlabeled, two.test) == (["l1", "l2"], split.unlabeled, split.test)
    protocols = [ledger.protocol(s, sp, "2.8.1") for sp in (split, two)]
    assert [p["num_labeled"] for p in protocols] == [4, 2]
    assert ledger.protocol_id(protocols[0]) != ledger.protocol_id(protocols[1])
    budget_run = s.runs[3]
    record = ledger.new_entry(budget_run, protocols[1], two, {}, {})
    assert (record["labeled"], record["unlabeled"], record["key"]) == (2, 0, "nnUNetTrainer@2labeled/s0")


def _ledger_run(run, proto, split, points: list[float], settings: str | None = None) -> dict:
    """A done ledger entry of ``run`` whose Dice on evaluation scan i is 0.8 + points[i] / 100."""
    from benchmarks.la_semisup.trainer_lookup import settings_id
    record = ledger.new_entry(run, proto, split, {"id": f"call {run.key}"}, {})
    record.update(status="done", cases={c: {"dice": 0.8 + p / 100} for c, p in zip(split.test, points)})
    if settings is not None:
        record["settings_id"] = settings
    else:
        record["settings_id"] = settings_id(run.settings)
    return record


def test_seed_rule_adds_seed_2_of_each_setting_positive_on_seeds_0_and_1(tmp_path):
    """SASSNet positive on both seeds gets seed 2, at the rule's place; SDM (one seed negative), a setting whose
    trainer's settings changed since, and one of another label budget do not."""
    from benchmarks.la_semisup.__main__ import _budget_splits, _fill_seed_rules
    from benchmarks.la_semisup.settings import RunSpec
    from benchmarks.la_semisup.trainer_lookup import BENCH_TRAINER_DIR, resolve_trainers

    s = _queue_settings(tmp_path, QUEUE_WITH_BUDGETS, "--kind", "train")
    sup = Supervisor(s, [str(BENCH_TRAINER_DIR)])
    splits = _budget_splits(s, make_split(s))
    protos = {key: ledger.protocol(s, sp, "2.8.1") for key, sp in splits.items()}
    runs = {name: RunSpec(trainer=name, seed=0) for name in ("nnUNetTrainer", "nnUNetTrainerSASSNet",
                                                             "nnUNetTrainerSDM", "nnUNetTrainerSASSNetPaper")}
    from nnunet_sassnet.discovery import trainer_dir
    resolve_trainers(runs.values(), [str(BENCH_TRAINER_DIR), trainer_dir()], tmp_path / "lookup.log")
    recorded = []
    for seed in (0, 1):
        for name, points, settings in (("nnUNetTrainer", [0, 0, 0], None), ("nnUNetTrainerSASSNet", [1, 2, -1], None),
                                       ("nnUNetTrainerSDM", [1, 1, 1] if seed == 0 else [-1, 0, 0], None),
                                       ("nnUNetTrainerSASSNetPaper", [3, 3, 3], "defaults-since-changed")):
            run = RunSpec(**{**runs[name].__dict__, "seed": seed})
            recorded.append(_ledger_run(run, protos["semi"], splits["semi"], points, settings))
        # the budget of 2: only its baseline; nothing of it is positive
        base2 = RunSpec(trainer="nnUNetTrainer", seed=seed, num_labeled=2)
        recorded.append(_ledger_run(base2, protos["semi2"], splits["semi2"], [0, 0, 0]))
    _fill_seed_rules(s, sup, recorded, protos)
    assert [r.key for r in s.runs] == ["nnUNetTrainer/s0", "nnUNetTrainer/s2", "nnUNetTrainerSASSNet/s2",
                                       "nnUNetTrainer@2labeled/s0", "nnUNetTrainer/s1"]
    assert s.runs[2].semi_supervised and s.runs[2].settings == runs["nnUNetTrainerSASSNet"].settings


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


@pytest.mark.slow
@needs_lite
@pytest.mark.parametrize("runs, message", [
    (["nnUNetTrainer", "nnUNetTrainerNoSuchThing"], "nnU-Net finds no trainer nnUNetTrainerNoSuchThing"),
    (["nnUNetTrainerSASSNet:all"], "the all-labeled dataset has none"),
], ids=["unknown", "semi-supervised-on-all-labeled"])
def test_impossible_runs_are_refused_before_any_work(tmp_path, runs, message):
    workdir = tmp_path / "work"
    result = _benchmark("--cpu-smoke", "--data", str(LA_LITE), "--workdir", str(workdir), "--trainers", *runs,
                        timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last
    assert not list((workdir / "nnUNet_raw").iterdir())


def _bench_trainer(monkeypatch, seed: int):
    """``nnUNetTrainer_LAbench`` as nnU-Net builds it from the benchmark's trainer folder and variables."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from benchmarks.la_semisup.trainer_lookup import BENCH_TRAINER_DIR
    monkeypatch.setenv("nnUNet_extTrainer", str(BENCH_TRAINER_DIR))
    monkeypatch.setenv("LA_SEMISUP_BASES", "nnUNetTrainer=nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer")
    for variable, value in (("LA_SEMISUP_SEED", seed), ("LA_SEMISUP_EPOCHS", 3), ("LA_SEMISUP_ITERATIONS", 5),
                            ("LA_SEMISUP_VAL_ITERATIONS", 2)):
        monkeypatch.setenv(variable, str(value))
    trainer = get_trainer_from_args("990", "3d_fullres", "all", "nnUNetTrainer_LAbench", "nnUNetPlansSmall",
                                    device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def test_benchmark_trainer_takes_the_seed_and_schedule_of_its_run(nnunet_paths, monkeypatch):
    first, again, other = (_bench_trainer(monkeypatch, seed) for seed in (3, 3, 4))
    assert type(first).__name__ == "nnUNetTrainer_LAbench" and type(first).__mro__[2].__name__ == "nnUNetTrainer"
    assert (first.num_epochs, first.num_iterations_per_epoch, first.num_val_iterations_per_epoch) == (3, 5, 2)
    weights = [next(t.network.parameters()).detach().clone() for t in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
