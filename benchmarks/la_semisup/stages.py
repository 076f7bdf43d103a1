"""One run's stages: wait for its data and its turn, train, predict the evaluation scans, score them.

A self-training run (nnU-Net's answer to unlabeled data: a model's own predictions as labels) trains the
trainer on the labeled scans, predicts the unlabeled ones, makes a dataset of both, plans and preprocesses it
as a user would, trains the trainer again on it with the same steps and scores that second model.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from nnunet_sassnet import nnunet_tools as tools

from benchmarks.la_semisup.settings import (CAP_PLAN, CAP_PREDICT, CAP_TRAIN, CONFIGURATION, SMALL_PLANS,
                                            SMOKE_FEATURES, SMOKE_PATCH, RunSpec)
from benchmarks.la_semisup.supervisor import StepResult, Supervisor

REPORTED_METRICS = ("dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm")
SELF_TRAINING_DATASET_ID = 903  # in the run's own nnU-Net folders, so concurrent runs do not collide
STATUS_NOT_STARTED = "not started"  # too little time left: the run stays in the queue for the next call


def run_in_turn(b: Supervisor, run: RunSpec, ticket: int, datasets: dict[str, dict[str, Any]]) -> None:
    """A run's thread: wait for its data and its turn; then train, predict, score. Errors fail this run only."""
    try:
        needs = [run.data] + (["unlabeled"] if run.semi_supervised or run.kind == "self_training" else [])
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
            if run.kind == "self_training":
                _self_training(b, run, datasets)
            else:
                _train_predict_score(b, run, datasets)
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
    """Train on the labeled scans, pseudo-label the unlabeled ones, train on both, predict and score."""
    entry, folder, semi = b.doc["runs"][run.key], b.runs_dir / run.slug, datasets["semi"]
    seconds = entry["seconds"]
    result, model = _train(b, run, "train1", semi["id"], semi["name"], folder / "stage1_results")
    seconds["train_labeled"] = round(result.seconds, 2)
    if not _trained(b, run, result, model, "training on the labeled scans"):
        return
    pseudo = folder / "pseudo_labels"
    result = _predict(b, run, "pseudolabel", semi["id"], Path(semi["raw"]) / "imagesUnlabeled", pseudo,
                      folder / "stage1_results")
    seconds["pseudo_label"] = round(result.seconds, 2)
    if not result.ok:
        finish_run(b, run, "timeout" if result.timed_out else "failed", f"pseudo-labelling: {result.error}")
        return
    raw, preprocessed, results = folder / "nnUNet_raw", folder / "nnUNet_preprocessed", folder / "nnUNet_results"
    name = make_pseudo_labeled_dataset(Path(semi["raw"]), pseudo, raw, SELF_TRAINING_DATASET_ID)
    np_ = str(b.s.plan_processes)
    argv = ["-d", SELF_TRAINING_DATASET_ID, "-c", CONFIGURATION, "-npfp", np_, "-np", np_]
    if b.s.cpu_smoke:  # the smoke run trains with small plans of the same name as the labeled dataset's
        argv.append("--no_pp")
    folders = {"raw": raw, "preprocessed": preprocessed}
    result = b.run_step(f"plan2_{run.slug}", tools.tool_command("nnUNetv2_plan_and_preprocess", argv),
                        b.env(**folders), CAP_PLAN)
    planning = result.seconds
    if result.ok and b.s.cpu_smoke:
        result = _small_plans(b, run, preprocessed / name, folders)
        planning += result.seconds
    seconds["plan_pseudo_labeled"] = round(planning, 2)
    if not result.ok:
        finish_run(b, run, "timeout" if result.timed_out else "failed", f"planning: {result.error}")
        return
    result, model = _train(b, run, "train2", SELF_TRAINING_DATASET_ID, name, results, **folders)
    seconds["train"] = round(result.seconds, 2)
    entry["model"] = str(model)
    if not _trained(b, run, result, model, "training on labeled + pseudo-labeled scans"):
        return
    _predict_and_score(b, run, SELF_TRAINING_DATASET_ID, results, datasets, **folders)


def _small_plans(b: Supervisor, run: RunSpec, folder: Path, folders: dict[str, Path]) -> StepResult:
    """Small CPU plans for the pseudo-labeled dataset (the smoke run), preprocessed with them."""
    from nnunet_sassnet.plans import derive_small_plans

    derive_small_plans(str(folder), SMOKE_PATCH, features_per_stage=SMOKE_FEATURES, batch_size=2,
                       target_plans=SMALL_PLANS, configuration=CONFIGURATION)
    cmd = tools.tool_command("nnUNetv2_preprocess", ["-d", SELF_TRAINING_DATASET_ID, "-plans_name", SMALL_PLANS,
                                                     "-c", CONFIGURATION, "-np", str(b.s.plan_processes)])
    return b.run_step(f"preprocess2_{run.slug}", cmd, b.env(**folders), CAP_PLAN)


def make_pseudo_labeled_dataset(semi_raw: Path, pseudo_labels: Path, raw: Path, dataset_id: int) -> str:
    """An nnU-Net raw dataset of the labeled scans and the unlabeled ones with their pseudo labels.

    Images are hard-linked where the file system allows it (they are not changed). Returns the dataset's name.
    """
    dataset_json = json.loads((semi_raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    name = f"Dataset{dataset_id:03d}_LAselftrain"
    target = raw / name
    if target.exists():
        shutil.rmtree(target)
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True)
    labels = [*sorted((semi_raw / "labelsTr").glob(f"*{ending}")), *sorted(pseudo_labels.glob(f"*{ending}"))]
    images = [*sorted((semi_raw / "imagesTr").glob(f"*{ending}")),
              *sorted((semi_raw / "imagesUnlabeled").glob(f"*{ending}"))]
    for source, sub in [*((p, "labelsTr") for p in labels), *((p, "imagesTr") for p in images)]:
        try:
            os.link(source, target / sub / source.name)
        except OSError:
            shutil.copy2(source, target / sub / source.name)
    dataset_json["numTraining"] = len(labels)
    (target / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return name


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
