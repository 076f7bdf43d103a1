"""Shared fixtures: nnU-Net's folders in a temporary place, and tiny planned datasets."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

# pytest puts this folder on sys.path (rootdir-relative "prepend" import mode), so helpers import directly
from synthetic import make_dataset

from nnunet_sassnet import nnunet_tools as tools
from nnunet_sassnet import warm_start
from nnunet_sassnet.plans import derive_small_plans

# nnU-Net's commands start from a warm fork server (nnunet_sassnet/warm_start.py): the same entry functions, each
# in a process of its own with its own environment, without importing torch, nnU-Net and matplotlib again for
# every command (~10 s each on two cores). The demo's and the benchmark's processes inherit the switch.
# run(..., plain=True) starts the installed console script as a fresh interpreter instead (the stock-CLI tests);
# NNUNET_SASSNET_WARM_START=0 turns it off for the whole run.
os.environ.setdefault(warm_start.ENV_VARIABLE, "1")

# The real LA data: $NNUNET_SASSNET_DATA, else ../shared/data beside the checkout. Tests that read it carry
# @pytest.mark.needs_la_data(folder, ...) and are skipped, with the reason shown (-rs), where it is absent.
SHARED_DATA = Path(os.environ.get("NNUNET_SASSNET_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
LA_H5 = SHARED_DATA / "la2018_uamt_h5" / "2018LA_Seg_Training Set"
LA_LITE = SHARED_DATA / "la2018_uamt_lite_1.25mm"
LA_LITE_H5 = LA_LITE / "2018LA_Seg_Training Set"
SMALL_PLANS = "nnUNetPlansSmall"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a test marked ``needs_la_data(folder, ...)`` (default: the data root) whose folders are absent."""
    for marker in item.iter_markers("needs_la_data"):
        missing = [Path(f) for f in (marker.args or (SHARED_DATA,)) if not Path(f).is_dir()]
        if missing:
            pytest.skip(f"real LA data not found at {missing[0]} (set NNUNET_SASSNET_DATA to the folder holding "
                        f"la2018_uamt_h5 and la2018_uamt_lite_1.25mm)")


def run(cmd: list[str], env: dict, check: bool = True, timeout: int = 600,
        plain: bool = False) -> subprocess.CompletedProcess:
    """Run a command line tool (stopped with its workers after ``timeout`` s); on failure show its output.

    ``plain``: the installed console script in a fresh interpreter, not from the warm fork server.
    """
    if plain:
        env = {**env, warm_start.ENV_VARIABLE: "0"}
    result = tools.run_tool(cmd, env, timeout=timeout, tail_lines=100_000)
    output = "\n".join(result.tail)
    if check and not result.ok:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.error}):\n{output[-6000:]}")
    # stdout and stderr arrive as one stream (their order kept); both fields hold it
    return subprocess.CompletedProcess(cmd, result.returncode, output, output)


def nnunet_environment(root: Path) -> dict:
    """Environment for nnU-Net commands with all folders under ``root``, tuned for 2 CPU cores."""
    return tools.nnunet_environment(root / "raw", root / "preprocessed", root / "results", default_workers=1,
                                    threads=2)


def training_environment(env: dict) -> dict:
    """nnU-Net's planner needs >= 1 augmentation process; training in tests runs augmentation in-process."""
    return {**env, "nnUNet_n_proc_DA": "0"}


def plan_tiny_dataset(root: Path, dataset_id: int, patch_size=(16, 16, 16), configuration: str = "3d_fullres",
                      patch_size_2d: tuple[int, int] | None = None, **dataset_kwargs) -> dict:
    """Create, plan (nnUNetv2_plan_and_preprocess) and preprocess a tiny dataset with small plans.

    ``patch_size_2d``: the small plans get the 2d configuration as well, preprocessed in the same call (nnU-Net's
    planner writes every configuration into nnUNetPlans; ``-c`` only selects what it preprocesses).
    """
    env = nnunet_environment(root)
    make_dataset(env["nnUNet_raw"], dataset_id, **dataset_kwargs)
    # without --verify_dataset_integrity (17 s here): the converter's output is verified in test_conversion.py
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "1", "--no_pp"], env)
    name = next(p.name for p in (root / "preprocessed").iterdir() if p.name.startswith(f"Dataset{dataset_id:03d}"))
    base = root / "preprocessed" / name
    derive_small_plans(str(base), patch_size, configuration=configuration, target_plans=SMALL_PLANS)
    configurations = [configuration]
    if patch_size_2d is not None:
        # derive 2d into a file of its own, then merge it into the small plans
        derive_small_plans(str(base), patch_size_2d, configuration="2d", target_plans=f"{SMALL_PLANS}2d")
        small = json.loads((base / f"{SMALL_PLANS}.json").read_text())
        small["configurations"]["2d"] = json.loads((base / f"{SMALL_PLANS}2d.json").read_text())["configurations"]["2d"]
        small["configurations"]["2d"]["data_identifier"] = f"{SMALL_PLANS}_2d"
        (base / f"{SMALL_PLANS}.json").write_text(json.dumps(small, indent=2))
        configurations.append("2d")
    run(["nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", SMALL_PLANS, "-c", *configurations,
         "-np", *["1"] * len(configurations)], env)
    return {"env": env, "root": root, "dataset_id": dataset_id, "dataset_name": name,
            "configuration": configuration}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict:
    """A planned binary 3D dataset: 5 labeled, 4 unlabeled, 2 test cases of 24^3 voxels."""
    return plan_tiny_dataset(tmp_path_factory.mktemp("nnunet"), 990, n_labeled=5, n_unlabeled=4, n_test=2)


SMOKE_TRAINER = "nnUNetTrainerSASSNet_smoke"


@pytest.fixture(scope="session")
def sassnet_fold0(tiny_dataset) -> dict:
    """``nnUNetv2_train 990 3d_fullres 0 -tr nnUNetTrainerSASSNet_smoke`` on the tiny dataset, once per session.

    The command-line test checks this training; the export test starts from its model (a training costs
    about a minute on two cores).
    """
    env = training_environment(tiny_dataset["env"])
    # plain: nnU-Net's installed console script in a fresh interpreter finds the trainer (stock-CLI test)
    train = run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", SMOKE_TRAINER, "-p", SMALL_PLANS,
                 "-device", "cpu"], env, plain=True)
    model = tiny_dataset["root"] / "results" / tiny_dataset["dataset_name"] / \
        f"{SMOKE_TRAINER}__{SMALL_PLANS}__3d_fullres"
    return {"stdout": train.stdout, "model": model, "trainer": SMOKE_TRAINER}


@pytest.fixture()
def nnunet_paths(tiny_dataset, monkeypatch):
    """Point this process's nnU-Net at the tiny dataset's folders (for in-process trainers)."""
    env = training_environment(tiny_dataset["env"])
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile",
                "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(key, env[key])
    return tiny_dataset
