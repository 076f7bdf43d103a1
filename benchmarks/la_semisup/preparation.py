"""Preparing the data: the nnU-Net datasets (semi-supervised, one per label budget, and all-labeled) converted,
planned and preprocessed, and the unlabeled scans preprocessed, at the top of the work folder (a later call with the same split and plans reuses them, also
on another machine: ``--prepare-only`` here, then the folder carried to the GPU machine)."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from nnunet_sassnet import nnunet_tools as tools
from nnunet_sassnet.errors import UserInputError

from benchmarks.la_semisup.settings import (CAP_PLAN, CONFIGURATION, SMALL_PLANS, SMOKE_FEATURES, SMOKE_PATCH,
                                            Settings, unlabeled_key)
from benchmarks.la_semisup.split import Split
from benchmarks.la_semisup.supervisor import Supervisor


def _preparation_stamp(s: Settings, key: str, dataset_id: int, name: str, content: dict[str, list[str]]) -> dict:
    """What a prepared dataset was made from; a later benchmark in the same work folder reuses it if equal.

    The data folder's path is left out: a work folder prepared here is carried to the GPU machine, where the
    scans lie elsewhere (the case IDs and the spacing identify them).
    """
    return {"dataset": key, "id": dataset_id, "name": name, "split": content, "spacing": s.spacing,
            "plans": s.plans, "configuration": CONFIGURATION,
            "small_plans": {"patch": list(SMOKE_PATCH), "features": list(SMOKE_FEATURES)} if s.cpu_smoke else None}


def convert_datasets(b: Supervisor, splits: dict[str, Split]) -> dict[str, dict[str, Any]]:
    """The nnU-Net raw datasets the runs need, with the project's converter (in this process; it takes seconds).

    ``splits``: the split of each semi-supervised dataset ('semi': the protocol's, 'semi<N>': a smaller label
    budget); the all-labeled dataset labels the protocol's labeled and unlabeled scans.

    A dataset that an earlier benchmark in this work folder prepared from the same data, split and plans is
    reused as it is (conversion, planning and preprocessing do not depend on the seed); any other dataset with
    the same ID there is replaced.
    """
    from nnunet_sassnet.conversion import convert_la2018

    s = b.s
    start = time.monotonic()
    datasets: dict[str, dict[str, Any]] = {}
    split = splits["semi"]
    budgets = sorted((int(key[len("semi"):]) for key in splits if key != "semi"), reverse=True)
    specs = [("semi", s.dataset_ids[0], "LAsemi", split),
             *((f"semi{n}", s.budget_dataset_id(n), f"LAsemi{n}", splits[f"semi{n}"]) for n in budgets)]
    specs = [(key, dataset_id, name, {"labeled": sp.labeled, "unlabeled": sp.unlabeled, "test": sp.test})
             for key, dataset_id, name, sp in specs]
    # the all-labeled model predicts the semi-supervised dataset's evaluation scans: no copy of them
    specs.append(("all", s.dataset_ids[1], "LAall", {"labeled": split.all_labeled, "unlabeled": [], "test": []}))
    needed = {r.dataset for r in b.runs} | {"semi"}
    with open(b.logs / "convert.log", "w") as log:
        for key, dataset_id, name, content in specs:
            if key not in needed:
                continue
            folder_name = f"Dataset{dataset_id:03d}_{name}"
            stamp = _preparation_stamp(s, key, dataset_id, name, content)
            stamp_file = b.prepared / f"{key}.json"
            dataset = {"id": dataset_id, "name": folder_name, "raw": str(b.raw / folder_name),
                       "labeled": len(content["labeled"]), "unlabeled": len(content["unlabeled"]),
                       "evaluation": len(split.test), "stamp_file": str(stamp_file), "stamp": stamp,
                       "reused": False}
            plans_file = b.preprocessed / folder_name / f"{s.plans}.json"
            if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and plans_file.is_file():
                dataset["reused"] = True
            else:
                stamp_file.unlink(missing_ok=True)
                # stale data under this ID (another split or plans): nnU-Net would reuse its fingerprint
                pattern = f"Dataset{dataset_id:03d}_*"
                for old in [*b.raw.glob(pattern), *b.preprocessed.glob(pattern)]:
                    shutil.rmtree(old)
                if not s.data.is_dir():
                    raise UserInputError(f"--data {s.data}: folder not found, and {dataset['name']} is not "
                                         f"prepared in {s.workdir} for this split and plans; pass the folder of "
                                         f"the LA lite scans")
                split_file = b.prepared / f"{key}_split.json"
                split_file.write_text(json.dumps(content, indent=2))
                result = convert_la2018(str(s.data), dataset_id, name=name, split=str(split_file),
                                        spacing=s.spacing, raw_dir=str(b.raw), progress=False)
                log.write(result.summary + "\n")
            datasets[key] = dataset
    b.record_stage("convert", start, time.monotonic(), "ok")
    made = ", ".join(f"{d['name']} ({d['labeled']} labeled, {d['unlabeled']} unlabeled"
                     f"{'; prepared earlier, reused' if d['reused'] else ''})" for d in datasets.values())
    b.say(f"convert: {made}; {len(split.test)} evaluation scans")
    return datasets


def plan_dataset(b: Supervisor, dataset: dict[str, Any]) -> bool:
    """nnU-Net's planning and preprocessing of one dataset (3d_fullres); small derived plans for the smoke run."""
    s, dataset_id = b.s, str(dataset["id"])
    folder = b.preprocessed / dataset["name"]
    if not dataset["reused"]:
        np_ = str(s.plan_processes)
        argv = ["-d", dataset_id, "-c", CONFIGURATION, "-npfp", np_, "-np", np_]
        if s.cpu_smoke:
            argv.append("--no_pp")
        result = b.run_step(f"plan_{dataset['name']}", tools.tool_command("nnUNetv2_plan_and_preprocess", argv),
                            b.env(), CAP_PLAN)
        if not result.ok:
            dataset["error"] = f"planning: {result.error}"
            return False
        if s.cpu_smoke:
            from nnunet_sassnet.plans import derive_small_plans
            derive_small_plans(str(folder), SMOKE_PATCH, features_per_stage=SMOKE_FEATURES, batch_size=2,
                               target_plans=SMALL_PLANS, configuration=CONFIGURATION)
            result = b.run_step(f"preprocess_{dataset['name']}", tools.tool_command("nnUNetv2_preprocess", [
                "-d", dataset_id, "-plans_name", SMALL_PLANS, "-c", CONFIGURATION, "-np", np_]), b.env(), CAP_PLAN)
            if not result.ok:
                dataset["error"] = f"preprocessing: {result.error}"
                return False
        Path(dataset["stamp_file"]).write_text(json.dumps(dataset["stamp"], indent=2))
    dataset["plans"] = plans_summary(folder / f"{s.plans}.json")
    b.say(f"plans of {dataset['name']}: {dataset['plans']}")
    return True


def plans_summary(plans_file: Path) -> dict[str, Any]:
    """What the plans chose for 3d_fullres: patch, batch, spacing and network size."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][CONFIGURATION]
    arch = config.get("architecture", {}).get("arch_kwargs", {})
    return {"plans": plans.get("plans_name"), "patch_size": config["patch_size"], "batch_size": config["batch_size"],
            "spacing": config["spacing"], "features_per_stage": arch.get("features_per_stage"),
            "n_stages": arch.get("n_stages")}


def preprocess_unlabeled_step(b: Supervisor, dataset: dict[str, Any]) -> bool:
    """The unlabeled scans with the semi-supervised dataset's plans (what nnUNetTrainerSASSNet reads)."""
    argv = ["-d", str(dataset["id"]), "-c", CONFIGURATION, "-p", b.s.plans, "-np", str(b.s.plan_processes)]
    result = b.run_step(f"unlabeled_{dataset['name']}", tools.tool_command("nnunet_sassnet_preprocess_unlabeled",
                                                                           argv), b.env(), CAP_PLAN)
    if not result.ok:
        dataset["error"] = f"unlabeled preprocessing: {result.error}"
    return result.ok


def prepare_in_background(b: Supervisor, datasets: dict[str, dict[str, Any]]) -> list[threading.Thread]:
    """Plan each dataset (and preprocess the unlabeled scans) in threads; each sets its readiness event, so
    that every run starts as soon as its own data is there."""

    def prepare(key: str) -> None:
        dataset = datasets[key]
        semi = key.startswith("semi")
        needs_unlabeled = any(r.learns_unlabeled and r.dataset == key for r in b.runs)
        try:
            ok = plan_dataset(b, dataset)
            b.state[key] = (ok, dataset.get("error", ""))
            b.events[key].set()  # runs without unlabeled data start now
            if semi:
                ok = ok and (preprocess_unlabeled_step(b, dataset) if needs_unlabeled else True)
                b.state[unlabeled_key(key)] = (ok, dataset.get("error", ""))
        except Exception as e:  # noqa: BLE001 -- one dataset's failure must not stop the other's runs
            dataset["error"] = f"{type(e).__name__}: {e}"
            b.state.setdefault(key, (False, dataset["error"]))
            if semi:
                b.state[unlabeled_key(key)] = (False, dataset["error"])
            b.say(f"preparing {dataset['name']} failed: {dataset['error']}")
        finally:
            b.events[key].set()
            if semi:
                b.events[unlabeled_key(key)].set()
            b.write()

    threads = [threading.Thread(target=prepare, args=(k,), name=f"prepare-{k}", daemon=True) for k in datasets]
    for thread in threads:
        thread.start()
    return threads
