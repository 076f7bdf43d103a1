"""The benchmark's trainers, found by nnU-Net through ``nnUNet_extTrainer`` (this folder).

Every benchmark run trains ``<trainer>_LAbench``: its trainer with the run's seed and schedule, and without
nnU-Net's final validation (the benchmark predicts and scores its own evaluation scans instead). The
benchmark passes them in each subprocess's environment, so that concurrent runs with different seeds share
this one module:

- ``LA_SEMISUP_BASES``: ``NAME=MODULE:CLASS`` or ``NAME=FILE.py:CLASS``, separated by ``;`` (the trainers
  to wrap; a file for trainers that nnU-Net found in another ``nnUNet_extTrainer`` folder);
- ``LA_SEMISUP_SEED``, ``LA_SEMISUP_EPOCHS``, ``LA_SEMISUP_ITERATIONS``, ``LA_SEMISUP_VAL_ITERATIONS``.

Without ``LA_SEMISUP_BASES`` the module defines no trainer.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import random
from typing import Any, Callable

import numpy as np
import torch

from nnunet_sassnet.nnunet_tools import cap_torch_threads

SUFFIX = "_LAbench"
BASES_VARIABLE = "LA_SEMISUP_BASES"
SCHEDULE_VARIABLES = {"num_epochs": "LA_SEMISUP_EPOCHS", "num_iterations_per_epoch": "LA_SEMISUP_ITERATIONS",
                      "num_val_iterations_per_epoch": "LA_SEMISUP_VAL_ITERATIONS"}


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (CUDA's too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class BenchmarkSchedule:
    """Mixin placed before the trainer: the seed before nnU-Net builds anything, the schedule after."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # seeded before nnU-Net builds anything: initial weights (network, SDM head, discriminator) and the
        # patch sampling of in-process augmentation follow the seed; augmentation worker processes draw their
        # own seeds, as in stock nnU-Net
        if "LA_SEMISUP_SEED" in os.environ:
            seed_everything(int(os.environ["LA_SEMISUP_SEED"]))
        cap_torch_threads()  # the stock nnUNetTrainer baseline too: concurrent CPU runs share the cores
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net assigns its schedule in __init__, so it is replaced afterwards
        for attribute, variable in SCHEDULE_VARIABLES.items():
            if variable in os.environ:
                setattr(self, attribute, int(os.environ[variable]))

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file("la_semisup: nnU-Net's final validation skipped; the benchmark scores the "
                               "evaluation scans")


def load_class(recipe: str) -> type:
    """``MODULE:CLASS`` (importable) or ``FILE.py:CLASS`` (a module file of another trainer folder)."""
    where, _, name = recipe.rpartition(":")
    if where.endswith(".py"):
        # nnU-Net imports its extTrainer folders' modules as top-level modules and forgets them: load the file
        spec = importlib.util.spec_from_file_location(f"_la_semisup_base_{name}", where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def _define_trainers() -> None:
    for item in filter(None, os.environ.get(BASES_VARIABLE, "").split(";")):
        name, _, recipe = item.partition("=")
        base = load_class(recipe)
        bench_name = name + SUFFIX
        globals()[bench_name] = type(bench_name, (BenchmarkSchedule, base), {
            "__module__": __name__, "__qualname__": bench_name,
            "__doc__": f"{name} with the benchmark run's seed and schedule.",
            "build_network_architecture": _capped_builder(base.build_network_architecture)})


def _capped_builder(build: Callable[..., Any]) -> staticmethod:
    """``build`` after :func:`cap_torch_threads`: nnUNetv2_predict calls no other hook of the trainer. The
    signature is kept (``functools.wraps``): nnU-Net reads it to choose how to call the hook."""

    @functools.wraps(build)
    def build_network_architecture(*args: Any, **kwargs: Any) -> Any:
        cap_torch_threads()
        return build(*args, **kwargs)

    return staticmethod(build_network_architecture)


_define_trainers()
