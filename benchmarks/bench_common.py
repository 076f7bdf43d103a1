"""Shared set-up of the benchmarks: nnU-Net tools without console scripts, and an LA dataset ready to train.

nnU-Net may be importable without its console scripts on PATH (``pip install --target``), so every tool is
started through its entry function (:mod:`nnunet_sassnet.nnunet_tools`).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, NoReturn

from nnunet_sassnet import nnunet_tools as tools


def nnunet_tool(tool: str, args: list[str], env: dict, log_file: Path) -> None:
    """Run an nnU-Net command-line tool through its entry function; raise with the log's tail on failure."""
    result = tools.run_tool(tools.tool_command(tool, args), env, log_file)
    if not result.ok:
        raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.error}); log {log_file}:\n"
                           f"{tools.log_tail(log_file, 60)}")


@contextlib.contextmanager
def augmentation_processes(count: int) -> Iterator[None]:
    """``nnUNet_n_proc_DA`` set to ``count`` in this process while the block builds nnU-Net's loaders (0: nnU-Net's
    single-threaded augmenter, its data loader in this process), restored afterwards."""
    previous = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = str(count)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = previous


def exit_without_native_teardown(code: int) -> NoReturn:
    """End the process with ``code`` after Python's own exit steps, without the native libraries' ones.

    For the benchmarks' long-lived processes, whose results are written by then: SimpleITK's exit handler (C++
    static destructors) has spun forever walking a ``std::map`` (train_speed, 2026-11-26; gdb:
    ``__run_exit_handlers -> _SimpleITK.abi3.so -> std::_Rb_tree_increment``) and aborted with "double free or
    corruption" (la_semisup on CI, 2026-11-27, exit -6), each time after every figure had been written. What
    Python registered (``atexit``: multiprocessing's clean-up of children, logging) still runs first.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def present_training_cases(data_dir: Path) -> list[str]:
    """UA-MT train.list order, restricted to the cases present under ``data_dir``."""
    from nnunet_sassnet.conversion import load_uamt_split

    present = {p.parent.name for p in data_dir.rglob("mri_norm2.h5")}
    train_ids, _ = load_uamt_split()
    return [c for c in train_ids if c in present]


def nnunet_env(workdir: Path, data_workers: int | None = None) -> dict:
    """nnU-Net's environment with its folders under ``workdir`` (torch.compile on unless set by the caller)."""
    return tools.nnunet_environment(workdir / "raw", workdir / "preprocessed", workdir / "results",
                                    compile=os.environ.get("nnUNet_compile", "t").lower() in ("t", "true", "1"),
                                    data_workers=data_workers)


def prepare_la_dataset(workdir: Path, data_dir: Path, dataset_id: int, labeled: int, unlabeled: int, test: int,
                       spacing: float, small_plans: bool = False, processes: int = 8) -> dict:
    """Convert, plan and preprocess LA scans (labeled, unlabeled and test cases in train.list order).

    Returns the environment for nnU-Net with ``BENCH_PLANS`` naming the plans to train with. With
    ``small_plans``, a CPU-sized network and patch (the CI smoke runs).
    """
    from nnunet_sassnet.conversion import convert_la2018
    from nnunet_sassnet.plans import derive_small_plans

    workdir.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(workdir)
    plans = "nnUNetPlansSmall" if small_plans else "nnUNetPlans"
    env["BENCH_PLANS"] = plans
    cases = present_training_cases(data_dir)
    needed = labeled + unlabeled + test
    if len(cases) < needed:
        raise SystemExit(f"error: {data_dir} holds {len(cases)} training scans, {needed} needed")
    split = {"labeled": cases[:labeled], "unlabeled": cases[labeled:labeled + unlabeled],
             "test": cases[labeled + unlabeled:needed]}
    split_file = workdir / f"split_{dataset_id}.json"
    # a second call on the same folder (e.g. `train_speed.py --epochs-only` after a run cut short) reuses the
    # dataset when everything that made it is the same; the stamp is written last, so a half-made one is redone
    stamp_file = workdir / f"prepared_{dataset_id}.json"
    stamp = {"data": str(data_dir.resolve()), "split": split, "spacing": spacing, "small_plans": small_plans}
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return env
    stamp_file.unlink(missing_ok=True)
    split_file.write_text(json.dumps(split, indent=2))
    convert_la2018(str(data_dir), dataset_id, name="LA", split=str(split_file), spacing=spacing,
                   overwrite=True, raw_dir=env["nnUNet_raw"], progress=False)
    plan_env = {**env, "nnUNet_n_proc_DA": str(max(1, processes))}
    logs = workdir / "logs"
    if small_plans:
        nnunet_tool("nnUNetv2_plan_and_preprocess", ["-d", str(dataset_id), "-c", "3d_fullres", "--no_pp"],
                    plan_env, logs / f"plan_{dataset_id}.log")
        name = next(p.name for p in (workdir / "preprocessed").iterdir() if p.name.startswith(f"Dataset{dataset_id}"))
        derive_small_plans(str(workdir / "preprocessed" / name), (16, 16, 16), features_per_stage=(8, 16, 32),
                           target_plans=plans)
        nnunet_tool("nnUNetv2_preprocess", ["-d", str(dataset_id), "-plans_name", plans, "-c", "3d_fullres",
                                            "-np", str(processes)], plan_env, logs / f"preprocess_{dataset_id}.log")
    else:
        nnunet_tool("nnUNetv2_plan_and_preprocess", ["-d", str(dataset_id), "-c", "3d_fullres",
                                                     "-np", str(processes)], plan_env, logs / f"plan_{dataset_id}.log")
    if unlabeled:
        nnunet_tool("nnunet_sassnet_preprocess_unlabeled", ["-d", str(dataset_id), "-c", "3d_fullres", "-p", plans,
                                                            "-np", str(processes)], env,
                    logs / f"unlabeled_{dataset_id}.log")
    stamp_file.write_text(json.dumps(stamp, indent=2))
    return env
