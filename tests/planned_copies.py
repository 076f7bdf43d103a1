"""Copies of a planned tiny dataset, changed and preprocessed again: a variant costs nnU-Net's preprocessing
(seconds) instead of its planning (half a minute on two cores)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from conftest import SMALL_PLANS, nnunet_environment, run


def copy_planned_dataset(planned: dict, root: Path, edit_raw: Callable[[Path], None] | None = None,
                         edit_preprocessed: Callable[[Path], None] | None = None,
                         configurations: tuple[str, ...] = ("3d_fullres",)) -> dict:
    """``planned`` (a :func:`conftest.plan_tiny_dataset` result) copied under ``root``: its raw folder and plans
    (not its preprocessed data); ``edit_raw`` and ``edit_preprocessed`` change the raw folder and the folder with
    the plans; then ``nnUNetv2_preprocess`` with the small plans preprocesses ``configurations``."""
    env = nnunet_environment(root, planned["env"])
    name = planned["dataset_name"]
    raw, preprocessed = root / "raw" / name, root / "preprocessed" / name
    shutil.copytree(planned["root"] / "raw" / name, raw)
    preprocessed.mkdir(parents=True)
    for path in (planned["root"] / "preprocessed" / name).iterdir():
        if path.is_file():
            shutil.copy(path, preprocessed / path.name)
    if edit_raw is not None:
        edit_raw(raw)
        shutil.copy(raw / "dataset.json", preprocessed / "dataset.json")  # as nnU-Net's planning copies it
    if edit_preprocessed is not None:
        edit_preprocessed(preprocessed)
    run(["nnUNetv2_preprocess", "-d", str(planned["dataset_id"]), "-plans_name", SMALL_PLANS, "-c",
         *configurations, "-np", *["1"] * len(configurations)], env)
    return {**planned, "env": env, "root": root}
