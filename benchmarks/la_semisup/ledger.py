"""The ledger: one JSON line per finished run (per-scan metrics, settings, device, date, commit, command),
appended the moment the run ends and never rewritten; the tables of docs/semisup_results.md are made from it.

A run's identity is its protocol (split, steps, epochs, plans, test-time mirroring, spacing, nnU-Net version),
its kind, trainer, dataset, seed, torch.compile, and its trainer's settings (class attributes): a run whose
identity is already ``done`` in the ledger is not trained again. That is how a seed's ``nnUNetTrainer`` baseline
is reused, and why runs of a trainer whose defaults have changed since are kept apart from the new ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from nnunet_sassnet.errors import UserInputError

from benchmarks.la_semisup.settings import CONFIGURATION, RunSpec, Settings
from benchmarks.la_semisup.split import Split
from benchmarks.la_semisup.trainer_lookup import class_settings_at_commit, settings_id

LEDGER_VERSION = 1
#: the protocol values that make two runs comparable (and a done run reusable); the rest is recorded only
PROTOCOL_IDENTITY = ("split", "steps", "iterations_per_epoch", "plans", "configuration", "fold",
                     "test_time_mirroring", "step_size", "spacing_mm", "nnunet")
NNUNET_STEP_SIZE = 0.5  # nnUNetv2_predict's default, which runs before the ledger used


def protocol(s: Settings, split: Split, nnunet_version: str | None) -> dict[str, Any]:
    """The protocol of this call's runs."""
    return {"split": split.fingerprint, "num_labeled": len(split.labeled), "num_unlabeled": len(split.unlabeled),
            "num_eval": len(split.test), "steps": s.steps, "epochs": s.epochs,
            "iterations_per_epoch": s.iterations_per_epoch, "val_iterations_per_epoch": s.val_iterations,
            "plans": s.plans, "configuration": CONFIGURATION, "fold": "all", "checkpoint": "checkpoint_final.pth",
            "test_time_mirroring": s.tta, "step_size": s.step_size, "spacing_mm": s.spacing, "nnunet": nnunet_version,
            "cpu_smoke": s.cpu_smoke}


def protocol_id(proto: dict[str, Any]) -> str:
    """A short hash of the protocol values that make runs comparable."""
    text = json.dumps({k: proto.get(k) for k in PROTOCOL_IDENTITY}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def identity(entry: dict[str, Any]) -> tuple:
    """What makes two ledger entries the same run (a ``done`` one need not be trained again)."""
    return (entry["protocol_id"], entry["kind"], entry["trainer"], entry["data"], entry["seed"],
            bool(entry["compile"]), entry["settings_id"])


def augments_on_device(run: RunSpec, environment: dict[str, Any]) -> bool:
    """Whether the run's training augmentation ran batched on the training device: its trainer's
    ``augment_on_device`` (None: on CUDA devices only); trainers without the setting augment in the workers."""
    setting = run.settings.get("augment_on_device", False)
    if setting is None:
        return environment.get("device_name") not in (None, "CPU")
    return bool(setting)


def new_entry(run: RunSpec, proto: dict[str, Any], split: Split, call: dict[str, Any],
              environment: dict[str, Any]) -> dict[str, Any]:
    """A run's record, still ``pending``: filled as its stages finish."""
    learns_unlabeled = run.semi_supervised or run.kind == "self_training"
    return {
        "ledger": LEDGER_VERSION, "key": run.key, "title": run.title, "kind": run.kind, "trainer": run.trainer,
        "bench_trainer": run.bench_trainer, "data": run.data, "seed": run.seed, "compile": run.compile,
        "semi_supervised": run.semi_supervised, "trainer_settings": run.settings,
        "settings_id": settings_id(run.settings), "augment_on_device": augments_on_device(run, environment),
        "protocol": proto, "protocol_id": protocol_id(proto),
        "labeled": len(split.labeled) if run.data == "semi" else len(split.all_labeled),
        "unlabeled": len(split.unlabeled) if run.data == "semi" and learns_unlabeled else 0,
        "status": "pending", "seconds": {}, "call": call, "device": environment.get("device_name"),
        "commit": environment.get("commit"), "uncommitted_changes": environment.get("uncommitted_changes"),
        "environment": environment,
    }


def read_ledger(path: Path | None) -> list[dict[str, Any]]:
    """Every entry of the ledger (none where the file does not exist yet)."""
    if path is None or not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            identity(entry)
        except (ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"{path}, line {number}: not a ledger entry ({e}); restore the line from git "
                                 f"or remove it") from None
        entries.append(entry)
    return entries


def append(path: Path, entry: dict[str, Any]) -> None:
    """Append one entry as one line, flushed to the disk at once (a later crash loses nothing written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, allow_nan=False, separators=(",", ":")) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def done_identities(entries: Iterable[dict[str, Any]]) -> set[tuple]:
    return {identity(e) for e in entries if e["status"] == "done"}


def import_result_json(result_json: Path, commit: str, ledger: Path, date: str | None = None) -> list[dict]:
    """Record the runs of a results JSON written before the ledger existed, with the trainer settings of
    their ``commit`` (read from git), so that they are not mistaken for runs of today's trainer defaults."""
    try:
        doc = json.loads(result_json.read_text())
        settings, split_lists, environment = doc["settings"], doc["split"], doc["environment"]
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"{result_json}: not a la_semisup results JSON ({e})") from None
    split = Split(split_lists["labeled"], split_lists["unlabeled"], split_lists["evaluation"], "imported")
    proto = {"split": split.fingerprint, "num_labeled": len(split.labeled), "num_unlabeled": len(split.unlabeled),
             "num_eval": len(split.test), "steps": settings["steps"], "epochs": settings["epochs"],
             "iterations_per_epoch": settings["iterations_per_epoch"],
             "val_iterations_per_epoch": settings["val_iterations_per_epoch"], "plans": settings["plans"],
             "configuration": settings["configuration"], "fold": settings["fold"],
             "checkpoint": settings["checkpoint"], "test_time_mirroring": settings["test_time_mirroring"],
             "step_size": settings.get("step_size", NNUNET_STEP_SIZE), "spacing_mm": settings["spacing_mm"],
             "nnunet": environment.get("nnunetv2"), "cpu_smoke": settings["cpu_smoke"]}
    environment = {**environment, "commit": commit}
    known = {identity(e) for e in read_ledger(ledger)}
    call = {"id": f"imported {result_json.name}", "command": "la_semisup.py " + " ".join(settings["argv"]),
            "concurrency": settings["concurrency"], "workers_per_run": settings["workers_per_run"],
            "workers_semi": settings["workers_semi"], "time_limit_s": settings["time_limit_s"],
            "started_utc": date}
    added = []
    for key, run_doc in doc["runs"].items():
        trainer, _, data = key.partition(":")
        run = RunSpec(trainer=trainer, seed=settings["seed"], data=data or "semi",
                      compile=settings["compile"] == "t",
                      semi_supervised=run_doc.get("unlabeled", 0) > 0,
                      settings=class_settings_at_commit(commit, trainer))
        entry = new_entry(run, proto, split, call, environment)
        entry.update({"title": f"{run.title} (defaults of {commit[:7]})" if run.settings else run.title,
                      "bench_trainer": run_doc.get("bench_trainer"), "status": run_doc["status"],
                      "seconds": {k[:-2]: run_doc[k] for k in ("train_s", "predict_s", "evaluate_s") if k in run_doc},
                      "cases": run_doc.get("cases"), "mean": run_doc.get("mean"), "std": run_doc.get("std"),
                      "n": run_doc.get("n"), "counts": run_doc.get("counts"), "finished_utc": date,
                      "imported_from": str(result_json)})
        if identity(entry) in known:
            continue
        append(ledger, entry)
        added.append(entry)
    return added
