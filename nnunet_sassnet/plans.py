"""Derived nnU-Net plans with a smaller network and patch: for CPU runs, demos and tests.

nnU-Net's planner sizes the U-Net for a GPU. A derived plans file (its own plans identifier, its own
preprocessed folder) keeps the planner's spacing, normalisation and resampling and replaces the patch size,
batch size and network width/depth; nnU-Net reads it like any plans file (``-p NAME``).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Sequence

__all__ = ["derive_small_plans"]


def _resized(values: Sequence[int], length: int) -> list[int]:
    """The first ``length`` entries of ``values``, its last entry repeated where it is shorter."""
    values = [int(v) for v in values]
    return (values + [values[-1]] * length)[:length]


def derive_small_plans(preprocessed_dataset_folder: str, patch_size: Sequence[int],
                       features_per_stage: Sequence[int] = (8, 16, 32), batch_size: int = 2,
                       source_plans: str = "nnUNetPlans", target_plans: str = "nnUNetPlansSmall",
                       configuration: str = "3d_fullres", blocks_per_stage: int | None = None) -> str:
    """Write ``<target_plans>.json`` beside ``<source_plans>.json``; return its path.

    The configuration ``configuration`` gets ``patch_size``, ``batch_size`` and its U-Net class (PlainConvUNet
    or ResidualEncoderUNet) with one stage per entry of ``features_per_stage`` (stride 2 on every axis after the first stage, so each patch axis
    must be divisible by ``2 ** (stages - 1)``); other configurations are dropped. ``blocks_per_stage``: the
    convolutions (PlainConvUNet; residual blocks for ResidualEncoderUNet) of every encoder stage and the
    convolutions of every decoder stage; None keeps the source plans' counts.
    """
    source_file = os.path.join(preprocessed_dataset_folder, source_plans + ".json")
    if not os.path.isfile(source_file):
        raise FileNotFoundError(f"{source_file} not found: run nnUNetv2_plan_and_preprocess first")
    with open(source_file) as f:
        plans = json.load(f)
    if configuration not in plans["configurations"]:
        raise ValueError(f"{source_file} has no configuration {configuration!r}")
    n_stages = len(features_per_stage)
    ndim = len(patch_size)
    if any(p % 2 ** (n_stages - 1) for p in patch_size):
        raise ValueError(f"patch size {tuple(patch_size)} must be divisible by 2**{n_stages - 1} on every axis")

    config = copy.deepcopy(plans["configurations"][configuration])
    config.pop("inherits_from", None)
    config["patch_size"] = [int(p) for p in patch_size]
    config["batch_size"] = int(batch_size)
    config["data_identifier"] = f"{target_plans}_{configuration}"
    arch = config["architecture"]["arch_kwargs"]
    arch.update({
        "n_stages": n_stages,
        "features_per_stage": [int(f) for f in features_per_stage],
        "kernel_sizes": [[3] * ndim for _ in range(n_stages)],
        "strides": [[1] * ndim] + [[2] * ndim for _ in range(n_stages - 1)],
        "n_conv_per_stage_decoder": _resized(arch.get("n_conv_per_stage_decoder", [2]), n_stages - 1),
    })
    # PlainConvUNet counts convolutions per encoder stage, ResidualEncoderUNet residual blocks; each class
    # refuses the other's argument
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in arch:
            arch[key] = _resized(arch[key], n_stages)
    if blocks_per_stage is not None:
        for key, length in (("n_conv_per_stage", n_stages), ("n_blocks_per_stage", n_stages),
                            ("n_conv_per_stage_decoder", n_stages - 1)):
            if key in arch:
                arch[key] = [int(blocks_per_stage)] * length
    plans["configurations"] = {configuration: config}
    plans["plans_name"] = target_plans
    target_file = os.path.join(preprocessed_dataset_folder, target_plans + ".json")
    with open(target_file, "w") as f:
        json.dump(plans, f, indent=2)
    return target_file
