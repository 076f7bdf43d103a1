"""Per-sample parameters of nnU-Net's training augmentation, drawn from nnU-Net's distributions.

The probabilities and ranges are those of ``nnUNetTrainer.get_training_transforms`` (nnU-Net 2.8); every sample
draws its own, as nnU-Net's loader workers do when they apply the pipeline sample by sample.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["AugmentationParameters", "draw_parameters", "bg_contrast", "PROBABILITIES"]

#: how often each step is applied to a sample (``RandomTransform(..., apply_probability)`` and SpatialTransform's
#: ``p_rotation``/``p_scaling``), and the per-channel probabilities inside a step
PROBABILITIES = {
    "rotation": 0.2, "scaling": 0.2, "noise": 0.1, "blur": 0.2, "brightness": 0.15, "contrast": 0.15,
    "low_resolution": 0.25, "gamma_inverted": 0.1, "gamma": 0.3,
    "blur_per_channel": 0.5, "low_resolution_per_channel": 0.5, "mirror_per_axis": 0.5,
}
SCALING_RANGE = (0.7, 1.4)
NOISE_STD_RANGE = (0.0, 0.1)
BLUR_SIGMA_RANGE = (0.5, 1.0)
BRIGHTNESS_RANGE = (0.75, 1.25)
CONTRAST_RANGE = (0.75, 1.25)
LOW_RESOLUTION_RANGE = (0.5, 1.0)
GAMMA_RANGE = (0.7, 1.5)


def bg_contrast(rng: np.random.Generator, low: float, high: float, size) -> np.ndarray:
    """batchgeneratorsv2's ``BGContrast``: half of the draws below 1 (uniform on [low, 1)), half above."""
    below = (rng.uniform(size=size) < 0.5) & (low < 1)
    return np.where(below, rng.uniform(low, 1, size=size), rng.uniform(max(low, 1), high, size=size))


@dataclass
class AugmentationParameters:
    """One batch's drawn parameters; every field has the batch size as its first dimension.

    ``angles``/``scales`` and ``mirror_axes`` cover the axes the spatial step works on (the last two for
    dummy-2D and 2D configurations); per-channel fields are ``(B, C)``, per-axis ones end in the spatial axes.
    """

    rotate: torch.Tensor
    scale: torch.Tensor
    angles: torch.Tensor
    scales: torch.Tensor
    noise: torch.Tensor
    noise_std: torch.Tensor
    blur: torch.Tensor
    blur_sigmas: torch.Tensor
    brightness: torch.Tensor
    brightness_factors: torch.Tensor
    contrast: torch.Tensor
    contrast_factors: torch.Tensor
    low_resolution: torch.Tensor
    low_resolution_channels: torch.Tensor
    low_resolution_scales: torch.Tensor
    gamma_inverted: torch.Tensor
    gamma_inverted_values: torch.Tensor
    gamma: torch.Tensor
    gamma_values: torch.Tensor
    mirror: torch.Tensor

    @property
    def resampled(self) -> torch.Tensor:
        """Samples the spatial step rotates or scales (the others are cropped only)."""
        return self.rotate | self.scale

    def subset(self, index) -> "AugmentationParameters":
        """The parameters of some samples (``index`` into the batch dimension)."""
        return AugmentationParameters(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def draw_parameters(batch_size: int, channels: int, spatial_dims: int, rotation: tuple[float, float],
                    dummy_2d: bool, mirror_axes: tuple[int, ...], rng: np.random.Generator
                    ) -> AugmentationParameters:
    """Draws a batch's parameters as nnU-Net's pipeline does per sample.

    ``spatial_dims``: 3 or 2 (of the patch); ``rotation``: nnU-Net's ``rotation_for_DA`` range (radians);
    ``dummy_2d``: 3D patches augmented slice-wise (rotation and scaling in the last two axes, no low-resolution
    simulation along the first); ``mirror_axes``: the axes nnU-Net mirrors.
    """
    b, c, p = batch_size, channels, PROBABILITIES
    spatial_step_dims = 2 if dummy_2d or spatial_dims == 2 else 3

    def applied(name: str) -> np.ndarray:
        return rng.uniform(size=b) < p[name]

    rotate, scale = applied("rotation"), applied("scaling")
    angles = np.where(rotate[:, None], rng.uniform(*rotation, size=(b, spatial_step_dims)), 0.0)
    # p_synchronize_scaling_across_axes=1: one factor for all axes
    scales = np.repeat(np.where(scale, rng.uniform(*SCALING_RANGE, size=b), 1.0)[:, None], spatial_step_dims, 1)
    low_res_scales = np.repeat(rng.uniform(*LOW_RESOLUTION_RANGE, size=(b, c))[..., None], spatial_dims, 2)
    if dummy_2d:
        low_res_scales[..., 0] = 1.0  # ignore_axes=(0,)
    mirror = np.zeros((b, spatial_dims), dtype=bool)
    for axis in mirror_axes:
        mirror[:, axis] = rng.uniform(size=b) < p["mirror_per_axis"]
    blur_channels = rng.uniform(size=(b, c)) < p["blur_per_channel"]
    drawn = dict(
        rotate=rotate, scale=scale, angles=angles, scales=scales,
        noise=applied("noise"), noise_std=rng.uniform(*NOISE_STD_RANGE, size=b),
        blur=applied("blur"),
        blur_sigmas=np.where(blur_channels[..., None], rng.uniform(*BLUR_SIGMA_RANGE, size=(b, c, spatial_dims)), 0.),
        brightness=applied("brightness"), brightness_factors=bg_contrast(rng, *BRIGHTNESS_RANGE, (b, c)),
        contrast=applied("contrast"), contrast_factors=bg_contrast(rng, *CONTRAST_RANGE, (b, c)),
        low_resolution=applied("low_resolution"),
        low_resolution_channels=rng.uniform(size=(b, c)) < p["low_resolution_per_channel"],
        low_resolution_scales=low_res_scales,
        gamma_inverted=applied("gamma_inverted"), gamma_inverted_values=bg_contrast(rng, *GAMMA_RANGE, (b, c)),
        gamma=applied("gamma"), gamma_values=bg_contrast(rng, *GAMMA_RANGE, (b, c)),
        mirror=mirror,
    )
    return AugmentationParameters(**{k: torch.from_numpy(np.asarray(v)) for k, v in drawn.items()})
