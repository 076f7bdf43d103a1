"""Views for a mean teacher: what makes the teacher's prediction of an unlabeled patch differ from the student's.

With nnU-Net's U-Net (no dropout) and a teacher in evaluation mode on the student's own augmented patch, the
teacher's target is almost the student's prediction: the consistency term has next to no gradient. Each view
here gives the two networks different inputs or different networks while their voxels stay aligned:

* ``"mirror"``: the teacher sees the patch mirrored along a random non-empty subset of nnU-Net's mirror axes and
  its prediction is mirrored back (nnU-Net's test-time mirroring, one mirror per step);
* ``"intensity"``: the teacher sees the patch after an independent second draw of nnU-Net's own intensity
  augmentations (noise, blur, brightness, contrast, low resolution, gamma: they move no voxel);
* ``"dropout"``: channel dropout (p 0.5) on the U-Net's bottleneck and last decoder stage in student and teacher,
  where UA-MT's V-Net has it, both active during training (the student's only in training mode).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from torch import nn

from nnunet_sassnet.networks import unwrap_module

__all__ = ["CONSISTENCY_VIEWS", "INTENSITY_TRANSFORMS", "intensity_transforms", "apply_per_patch",
           "random_mirror_dims", "add_channel_dropout"]

CONSISTENCY_VIEWS = ("mirror", "intensity", "dropout")

#: nnU-Net's augmentations that change intensities only (no voxel moves, so the targets stay aligned)
INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)


def intensity_transforms(pipeline: BasicTransform) -> list[BasicTransform]:
    """The intensity-only steps of nnU-Net's training pipeline (``get_training_transforms``), with their
    probabilities: the entries of its ``ComposeTransforms`` that are (random) intensity transforms."""
    steps = []
    for step in getattr(pipeline, "transforms", [pipeline]):
        inner = step.transform if isinstance(step, RandomTransform) else step
        if isinstance(inner, INTENSITY_TRANSFORMS):
            steps.append(step)
    return steps


def apply_per_patch(transforms: Sequence[BasicTransform], data: torch.Tensor) -> torch.Tensor:
    """``transforms`` applied to each patch of ``data`` (N, C, ...), each with its own random draw.

    On the CPU, as in nnU-Net's loader (its blur builds its kernels there); the result is on ``data``'s device.
    """
    patches = []
    for patch in data.detach().float().cpu():
        sample = {"image": patch.clone()}
        for t in transforms:
            sample = t(**sample)
        patches.append(sample["image"])
    return torch.stack(patches).to(data.device, data.dtype)


def random_mirror_dims(axes: Sequence[int], generator: torch.Generator | None = None) -> tuple[int, ...]:
    """Tensor dimensions (N, C first) of a uniformly drawn non-empty subset of the spatial ``axes``."""
    if not axes:
        return ()
    subset = int(torch.randint(1, 2 ** len(axes), (1,), generator=generator))
    return tuple(2 + a for i, a in enumerate(axes) if subset >> i & 1)


def add_channel_dropout(network: nn.Module, p: float, always: bool) -> list[torch.utils.hooks.RemovableHandle]:
    """Channel dropout ``p`` on the outputs of the U-Net's bottleneck and last decoder stage, as forward hooks.

    ``always``: also in evaluation mode (a teacher); else only while the network is in training mode, so nnU-Net's
    validation and inference see no dropout. Hooks are not weights: checkpoints and ``nnUNetv2_predict`` (which
    builds its own network) are unchanged.
    """
    module = unwrap_module(network)

    def drop(stage: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        active = always or stage.training
        return F.dropout3d(output, p, active) if output.ndim == 5 else F.dropout2d(output, p, active)

    return [module.encoder.stages[-1].register_forward_hook(drop),
            module.decoder.stages[-1].register_forward_hook(drop)]
