"""One run's stages: wait for its data and its turn, train, predict the evaluation scans, score them.

A self-training run (nnU-Net's answer to unlabeled data: a model's own predictions as labels) is one call of
``nnunet_sassnet_selftrain``: the trainer on the labeled scans, its predictions of the unlabeled ones, a dataset
of both with the teacher's plans, the trainer again on it with the same steps; the benchmark scores that second
model.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from nnunet_sassnet import nnunet_tools as tools

from benchmarks.la_semisup.settings import CAP_PLAN, CAP_PREDICT, CAP_TRAIN, CONFIGURATION, RunSpec, unlabeled_key
from benchmarks.la_semisup.supervisor import StepResult, Supervisor

REPORTED_METRICS = ("dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm")
SELF_TRAINING_DATASET_ID = 903  # in the run's own nnU-Net folders, so concurrent runs do not collide
STATUS_NOT_STARTED = "not started"  # too little time left: the run stays in the queue for the next call


def run_in_turn(b: Supervisor, run: RunSpec, ticket: int, datasets: dict[str, dict[str, Any]]) -> None:
    """A run's thread: wait for its data and its turn; then train, predict, score. Errors fail this run only."""
    try:
        needs = [run.dataset] + ([unlabeled_key(run.dataset)] if run.learns_unlabeled else [])
        ok, why = b.wait_for(needs)
        if not ok:
            b.slots.pass_turn(ticket)
            finish_run(b, run, "skipped", f"its data is not ready: {why}")
            return
        if not b.slots.acquire(ticket, b.stopping):
            finish_run(b, run, "skipped", "interrupted")
            return
        try:
            needed = max(1.0, b.s.min_start * (2 if run.kind == "self_training" else 1))
            if b.stopping.is_set() or (b.deadline is not None and b.remaining() < needed):
                why = "interrupted" if b.stopping.is_set() else \
                    f"{max(0.0, b.remaining()):.0f} s left of the time limit, {needed:.0f} s needed (--min-start)"
                finish_run(b, run, STATUS_NOT_STARTED, why)
                return
            b.doc["runs"][run.key]["started_utc"] = utc_now()
            # the stages read the run's label budget's semi-supervised dataset as "semi"
            own = {**datasets, "semi": datasets[run.semi_dataset]}
            if run.kind == "self_training":
                _self_training(b, run, own)
            else:
                _train_predict_score(b, run, own)
        finally:
            b.slots.release()
    except Exception as e:  # noqa: BLE001 -- report it and let the other runs finish
        finish_run(b, run, "failed", f"{type(e).__name__}: {e}")


def _run_variables(b: Supervisor, run: RunSpec) -> dict[str, str]:
    """The run's seed and schedule for the benchmark's trainer module (nnunet_trainers/la_semisup_trainers.py)."""
    return {"LA_SEMISUP_SEED": str(run.seed), "LA_SEMISUP_EPOCHS": str(b.s.epochs),
            "LA_SEMISUP_ITERATIONS": str(b.s.iterations_per_epoch),
            "LA_SEMISUP_VAL_ITERATIONS": str(b.s.val_iterations)}


def _train(b: Supervisor, run: RunSpec, step: str, dataset_id: int, dataset_name: str, results: Path,
           raw: Path | None = None, preprocessed: Path | None = None) -> tuple[StepResult, Path]:
    """``nnUNetv2_train`` of the run's benchmark trainer (fold all); returns the result and the model folder."""
    s = b.s
    cmd = tools.tool_command("nnUNetv2_train", [dataset_id, CONFIGURATION, "all", "-tr", run.bench_trainer,
                                                "-p", s.plans, "-device", s.device])
    workers = s.workers_semi if run.semi_supervised else s.workers_per_run
    env = b.env(data_workers=workers, results=results, raw=raw, preprocessed=preprocessed, compile=run.compile,
                run_variables=_run_variables(b, run))
    result = b.run_step(f"{step}_{run.slug}", cmd, env, CAP_TRAIN)
    model = results / dataset_name / f"{run.bench_trainer}__{s.plans}__{CONFIGURATION}" / "fold_all"
    return result, model


def _predict(b: Supervisor, run: RunSpec, step: str, dataset_id: int, images: Path, output: Path, results: Path,
             **folders: Path) -> StepResult:
    """``nnUNetv2_predict`` of a trained model on a folder of images."""
    s = b.s
    # 0 and 0: nnU-Net's sequential predictor, in the predicting process (no spawned workers to start)
    workers = str(max(0, s.workers_per_run))
    cmd = tools.tool_command("nnUNetv2_predict", [
        "-i", images, "-o", output, "-d", dataset_id, "-c", CONFIGURATION, "-tr", run.bench_trainer, "-p", s.plans,
        "-f", "all", "-device", s.device, "-step_size", s.step_size, "-npp", workers, "-nps", workers,
        "--disable_progress_bar",
        *([] if s.tta else ["--disable_tta"])])
    return b.run_step(f"{step}_{run.slug}", cmd, b.env(results=results, **folders), CAP_PREDICT)


def _trained(b: Supervisor, run: RunSpec, result: StepResult, model: Path, what: str) -> bool:
    """Whether a training produced its final checkpoint; records the failure otherwise."""
    if result.ok and (model / "checkpoint_final.pth").is_file():
        log = training_log(model / "checkpoint_final.pth")
        if log is not None:
            with b.lock:
                b.doc["runs"][run.key]["training_log"] = log
        return True
    finish_run(b, run, "timeout" if result.timed_out else "failed",
               f"{what}: {result.error or 'no checkpoint_final.pth'}")
    return False


def _train_predict_score(b: Supervisor, run: RunSpec, datasets: dict[str, dict[str, Any]]) -> None:
    """A plain run: train on its dataset, predict and score the evaluation scans."""
    entry, folder, dataset = b.doc["runs"][run.key], b.runs_dir / run.slug, datasets[run.data]
    result, model = _train(b, run, "train", dataset["id"], dataset["name"], folder / "nnUNet_results")
    entry["seconds"]["train"] = round(result.seconds, 2)
    entry["model"] = str(model)
    if not _trained(b, run, result, model, "training"):
        return
    _predict_and_score(b, run, dataset["id"], folder / "nnUNet_results", datasets)


def _predict_and_score(b: Supervisor, run: RunSpec, dataset_id: int, results: Path,
                       datasets: dict[str, dict[str, Any]], **folders: Path) -> None:
    entry, folder = b.doc["runs"][run.key], b.runs_dir / run.slug
    semi_raw = Path(datasets["semi"]["raw"])
    result = _predict(b, run, "predict", dataset_id, semi_raw / "imagesTs", folder / "predictions", results,
                      **folders)
    entry["seconds"]["predict"] = round(result.seconds, 2)
    if not result.ok:
        finish_run(b, run, "timeout" if result.timed_out else "failed", f"prediction: {result.error}")
        return
    _score(b, run, folder / "predictions", semi_raw / "labelsTs")


def _score(b: Supervisor, run: RunSpec, predictions: Path, labels: Path) -> None:
    """Score the predictions with the project's evaluator; finish the run."""
    from nnunet_sassnet.errors import UserInputError
    from nnunet_sassnet.evaluation import evaluate_folders, write_report

    entry = b.doc["runs"][run.key]
    start = time.monotonic()
    try:
        report = evaluate_folders(str(labels), str(predictions), labels=[1])
        write_report(report, str(b.runs_dir / run.slug / "evaluation.json"))
    except (UserInputError, OSError, RuntimeError) as e:
        b.record_stage(f"evaluate_{run.slug}", start, time.monotonic(), "failed")
        finish_run(b, run, "failed", f"evaluation: {e}")
        return
    with b.lock:
        entry["seconds"]["evaluate"] = round(time.monotonic() - start, 2)
        entry["cases"] = {case: {m: finite_or_none(v[m]) for m in REPORTED_METRICS}
                          for case, v in report["cases"].items()}
        for key in ("mean", "std", "n"):
            entry[key] = {m: finite_or_none(report[key][m]) for m in REPORTED_METRICS}
        entry["counts"] = report["counts"]
    b.record_stage(f"evaluate_{run.slug}", start, time.monotonic(), "ok")
    missing = sorted(set(b.doc["split"]["evaluation"]) - set(report["cases"]))
    if missing:
        finish_run(b, run, "failed", f"no prediction for {', '.join(missing)}")
        return
    finish_run(b, run, "done", "")
    b.say(f"{run.key}: Dice {100 * entry['mean']['dice']:.2f} % over {len(report['cases'])} evaluation scans")


def _self_training(b: Supervisor, run: RunSpec, datasets: dict[str, dict[str, Any]]) -> None:
    """nnunet_sassnet_selftrain (one round, fold all, the run's trainer as teacher and student), then predict and
    score the student. Its steps' times come from the round's record, as stages of their own."""
    entry, folder, semi = b.doc["runs"][run.key], b.runs_dir / run.slug, datasets["semi"]
    raw, preprocessed, results = folder / "nnUNet_raw", folder / "nnUNet_preprocessed", folder / "nnUNet_results"
    # the run's own nnU-Net folders (concurrent runs each make a student dataset 903), the labeled dataset linked
    for base, shared in ((raw, b.raw), (preprocessed, b.preprocessed)):
        base.mkdir(parents=True, exist_ok=True)
        if not (base / semi["name"]).exists():
            (base / semi["name"]).symlink_to(shared / semi["name"], target_is_directory=True)
    s, workers = b.s, str(max(0, b.s.workers_per_run))
    student = f"Dataset{SELF_TRAINING_DATASET_ID:03d}_LAselftrain"
    argv = ["-d", semi["id"], "-c", CONFIGURATION, "-f", "all", "-tr", run.bench_trainer, "-p", s.plans,
            "--student-dataset", student, "-device", s.device, "-step_size", s.step_size, "-npp", workers,
            "-nps", workers, "-np", s.plan_processes, *([] if s.tta else ["--disable_tta"])]
    env = b.env(data_workers=s.workers_semi if run.semi_supervised else s.workers_per_run, results=results, raw=raw,
                preprocessed=preprocessed, compile=run.compile, run_variables=_run_variables(b, run))
    result = b.run_step(f"selftrain_{run.slug}", tools.entry_command("nnunet_sassnet.selftraining", "main", argv),
                        env, 2 * CAP_TRAIN + CAP_PREDICT + CAP_PLAN)
    _record_self_training_steps(b, run, raw / student)
    model = results / student / f"{run.bench_trainer}__{s.plans}__{CONFIGURATION}" / "fold_all"
    entry["model"] = str(model)
    if not _trained(b, run, result, model, "self-training"):
        return
    _predict_and_score(b, run, SELF_TRAINING_DATASET_ID, results, datasets, raw=raw, preprocessed=preprocessed)


#: the self-training command's steps -> (the benchmark's stage, its key in the ledger's seconds)
SELF_TRAINING_STAGES = {"teacher": ("train1", "train_labeled"), "pseudo_labels": ("pseudolabel", "pseudo_label"),
                        "dataset": ("plan2", "plan_pseudo_labeled"), "student": ("train2", "train")}


def _record_self_training_steps(b: Supervisor, run: RunSpec, student_raw: Path) -> None:
    """The finished steps of the round's record (selftraining.json) as the run's stages and seconds."""
    from nnunet_sassnet.selftraining.state import RoundState

    state = RoundState.load(student_raw) if student_raw.is_dir() else None
    if state is None:
        return
    # the record holds wall-clock times; the stages are on the benchmark's monotonic clock
    offset = time.monotonic() - time.time()
    for step, (stage, key) in SELF_TRAINING_STAGES.items():
        record = state.steps.get(step, {})
        if record.get("status") == "done":
            start, end = record["started"] + offset, record["finished"] + offset
            with b.lock:
                b.doc["runs"][run.key]["seconds"][key] = round(end - start, 2)
            b.record_stage(f"{stage}_{run.slug}", start, end, "ok")


#: per-epoch keys of nnU-Net's logger left out of the ledger (timestamps; the learning rate follows the protocol)
UNLOGGED_KEYS = ("epoch_start_timestamps", "epoch_end_timestamps", "lrs")


def training_log(checkpoint: Path) -> dict[str, list] | None:
    """The per-epoch values that nnU-Net's logger kept in ``checkpoint`` (losses, pseudo-Dice and, for this
    package's trainers, the unlabeled term's weight, gradient ratio and D's accuracies), to 4 significant digits;
    None where the checkpoint cannot be read. They tell afterwards whether the unlabeled term acted at all."""
    import pickle

    import torch

    try:  # the benchmark's own checkpoint: its logging dict holds plain Python numbers and lists
        logging = torch.load(checkpoint, map_location="cpu", weights_only=False)["logging"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError):
        return None
    return {key: _significant(values) for key, values in logging.items() if key not in UNLOGGED_KEYS}


def _significant(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_significant(v) for v in value]
    value = finite_or_none(value)
    return float(f"{value:.4g}") if isinstance(value, float) else value


def finite_or_none(value: Any) -> Any:
    """A JSON number, or None for NaN/Infinity (which strict JSON readers refuse)."""
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def finish_run(b: Supervisor, run: RunSpec, status: str, error: str) -> None:
    """Record a run's final status (and why it failed), then hand it to the ledger (``b.on_run_finished``)."""
    if b.stopping.is_set() and status in ("failed", "timeout", "skipped"):
        status = "interrupted"
    with b.lock:
        entry = b.doc["runs"][run.key]
        if entry["status"] != "pending":  # already finished (an interrupt races the run's own thread)
            return
        entry["status"] = status
        entry["finished_utc"] = utc_now()
        if error:
            entry["error"] = error
        if b.on_run_finished is not None:
            b.on_run_finished(run, entry)
        b.write()
    if error:
        b.say(f"{run.key}: {status} ({error})")
