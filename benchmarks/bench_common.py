"""Shared set-up of the benchmarks: nnU-Net tools without console scripts, and an LA dataset ready to train.

nnU-Net may be importable without its console scripts on PATH (``pip install --target``), so every tool is
started as ``python -c`` on its entry function.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]

ENTRY_POINTS = {
    "nnUNetv2_plan_and_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry",
    "nnUNetv2_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:preprocess_entry",
    "nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
}


def python_tool(module: str, function: str, argv: Sequence[str]) -> list[str]:
    """A command line that runs an entry function of an installed tool with this interpreter.

    nnU-Net's console scripts are not on PATH where it is installed with ``pip --target``; its entry functions
    read ``sys.argv`` like the scripts do.
    """
    code = (f"import sys; sys.argv = {[function, *map(str, argv)]!r}; from {module} import {function} as f; "
            f"r = f(); sys.exit(r if isinstance(r, int) else 0)")
    return [sys.executable, "-c", code]


def nnunet_tool(tool: str, args: list[str], env: dict, log_file: Path) -> None:
    """Run an nnU-Net command-line tool through its entry function; raise with the log's tail on failure."""
    module, func = ENTRY_POINTS[tool].split(":")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        result = subprocess.run(python_tool(module, func, args), env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"{tool} {' '.join(args)} failed (exit {result.returncode}); log {log_file}:\n{tail}")


def present_training_cases(data_dir: Path) -> list[str]:
    """UA-MT train.list order, restricted to the cases present under ``data_dir``."""
    from nnunet_sassnet.conversion import load_uamt_split

    present = {p.parent.name for p in data_dir.rglob("mri_norm2.h5")}
    train_ids, _ = load_uamt_split()
    return [c for c in train_ids if c in present]


def nnunet_env(workdir: Path, data_workers: int | None = None) -> dict:
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(workdir / "raw"), "nnUNet_preprocessed": str(workdir / "preprocessed"),
                "nnUNet_results": str(workdir / "results")})
    sys.path.insert(0, str(REPO))
    from nnunet_sassnet.discovery import trainer_dir

    env["nnUNet_extTrainer"] = trainer_dir()
    env.setdefault("nnUNet_compile", "t")
    if data_workers is not None:
        env["nnUNet_n_proc_DA"] = str(data_workers)
    for key in ("raw", "preprocessed", "results"):
        (workdir / key).mkdir(parents=True, exist_ok=True)
    return env


def prepare_la_dataset(workdir: Path, data_dir: Path, dataset_id: int, labeled: int, unlabeled: int, test: int,
                       spacing: float, small_plans: bool = False, processes: int = 8) -> dict:
    """Convert, plan and preprocess LA scans (labeled, unlabeled and test cases in train.list order).

    Returns the environment for nnU-Net with ``BENCH_PLANS`` naming the plans to train with. With
    ``small_plans``, a CPU-sized network and patch (the CI smoke runs).
    """
    from nnunet_sassnet.conversion import convert_la2018
    from nnunet_sassnet.plans import derive_small_plans
    from nnunet_sassnet.unlabeled import preprocess_unlabeled

    workdir.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(workdir)
    cases = present_training_cases(data_dir)
    needed = labeled + unlabeled + test
    if len(cases) < needed:
        raise SystemExit(f"error: {data_dir} holds {len(cases)} training scans, {needed} needed")
    split = {"labeled": cases[:labeled], "unlabeled": cases[labeled:labeled + unlabeled],
             "test": cases[labeled + unlabeled:needed]}
    split_file = workdir / f"split_{dataset_id}.json"
    split_file.write_text(json.dumps(split, indent=2))
    convert_la2018(str(data_dir), dataset_id, name="LA", split=str(split_file), spacing=spacing,
                   overwrite=True, raw_dir=env["nnUNet_raw"], progress=False)
    plan_env = {**env, "nnUNet_n_proc_DA": str(max(1, processes))}
    logs = workdir / "logs"
    if small_plans:
        nnunet_tool("nnUNetv2_plan_and_preprocess", ["-d", str(dataset_id), "-c", "3d_fullres", "--no_pp"],
                    plan_env, logs / f"plan_{dataset_id}.log")
        name = next(p.name for p in (workdir / "preprocessed").iterdir() if p.name.startswith(f"Dataset{dataset_id}"))
        derive_small_plans(str(workdir / "preprocessed" / name), (32, 32, 32), features_per_stage=(8, 16, 32),
                           target_plans="nnUNetPlansSmall")
        plans = "nnUNetPlansSmall"
        nnunet_tool("nnUNetv2_preprocess", ["-d", str(dataset_id), "-plans_name", plans, "-c", "3d_fullres",
                                            "-np", str(processes)], plan_env, logs / f"preprocess_{dataset_id}.log")
    else:
        plans = "nnUNetPlans"
        nnunet_tool("nnUNetv2_plan_and_preprocess", ["-d", str(dataset_id), "-c", "3d_fullres",
                                                     "-np", str(processes)], plan_env, logs / f"plan_{dataset_id}.log")
    if unlabeled:
        old = dict(os.environ)
        os.environ.update(env)
        try:
            preprocess_unlabeled(dataset_id, "3d_fullres", plans, num_processes=processes, progress=False)
        finally:
            os.environ.clear()
            os.environ.update(old)
    env["BENCH_PLANS"] = plans
    return env
