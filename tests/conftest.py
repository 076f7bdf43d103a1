"""Shared fixtures: nnU-Net's folders in a temporary place, and tiny planned datasets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import make_dataset  # noqa: E402

from nnunet_sassnet.discovery import trainer_dir  # noqa: E402
from nnunet_sassnet.plans import derive_small_plans  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LA_H5 = SHARED_DATA / "la2018_uamt_h5" / "2018LA_Seg_Training Set"
SMALL_PLANS = "nnUNetPlansSmall"


def run(cmd: list[str], env: dict, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command line tool; on failure show its output."""
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def nnunet_environment(root: Path) -> dict:
    """Environment for nnU-Net commands with all folders under ``root``, tuned for 2 CPU cores."""
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"), "nnUNet_extTrainer": trainer_dir(),
        "nnUNet_compile": "f", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "2",
    })
    for key in ("raw", "preprocessed", "results"):
        (root / key).mkdir(parents=True, exist_ok=True)
    return env


def training_environment(env: dict) -> dict:
    """nnU-Net's planner needs >= 1 augmentation process; training in tests runs augmentation in-process."""
    return {**env, "nnUNet_n_proc_DA": "0"}


def plan_tiny_dataset(root: Path, dataset_id: int, patch_size=(16, 16, 16), configuration: str = "3d_fullres",
                      **dataset_kwargs) -> dict:
    """Create, plan (nnUNetv2_plan_and_preprocess) and preprocess a tiny dataset with small plans."""
    env = nnunet_environment(root)
    make_dataset(env["nnUNet_raw"], dataset_id, **dataset_kwargs)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "1",
         "--verify_dataset_integrity", "--no_pp"], env)
    name = next(p.name for p in (root / "preprocessed").iterdir() if p.name.startswith(f"Dataset{dataset_id:03d}"))
    derive_small_plans(str(root / "preprocessed" / name), patch_size, configuration=configuration,
                       target_plans=SMALL_PLANS)
    run(["nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", SMALL_PLANS, "-c", configuration,
         "-np", "1"], env)
    return {"env": env, "root": root, "dataset_id": dataset_id, "dataset_name": name,
            "configuration": configuration}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict:
    """A planned binary 3D dataset: 5 labeled, 4 unlabeled, 2 test cases of 24^3 voxels."""
    return plan_tiny_dataset(tmp_path_factory.mktemp("nnunet"), 990, n_labeled=5, n_unlabeled=4, n_test=2)


@pytest.fixture()
def nnunet_paths(tiny_dataset, monkeypatch):
    """Point this process's nnU-Net at the tiny dataset's folders (for in-process trainers)."""
    env = training_environment(tiny_dataset["env"])
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile",
                "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(key, env[key])
    return tiny_dataset
