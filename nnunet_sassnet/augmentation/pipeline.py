"""nnU-Net's training augmentation applied to whole batches on the training device.

:class:`DeviceAugmentation` runs the steps of ``nnUNetTrainer.get_training_transforms`` in nnU-Net's order on the
enlarged patches nnU-Net's loader crops (``initial_patch_size``): rotation and scaling (or the central crop),
Gaussian noise, Gaussian blur, multiplicative brightness, contrast, low resolution, inverted gamma, gamma,
mirroring, masking outside the nonzero region, label -1 to 0, regions, deep-supervision targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nnunet_sassnet.augmentation import functional as AF
from nnunet_sassnet.augmentation.parameters import AugmentationParameters, draw_parameters

__all__ = ["DeviceAugmentation", "AugmentationConfig"]

#: the label nnU-Net's loader and SpatialTransform pad segmentations with (``padding_value_seg``)
PADDING_LABEL = -1


@dataclass(frozen=True)
class AugmentationConfig:
    """What nnU-Net's ``get_training_transforms`` is configured with.

    ``patch_size``: the network's patch (3 or 2 axes); ``rotation``: ``rotation_for_DA``; ``dummy_2d``:
    ``do_dummy_2d_data_aug``; ``mask_channels``: channels normalised with ``use_mask_for_norm``; ``regions``:
    label groups to turn into region channels (with the ignore label appended, as nnU-Net does);
    ``deep_supervision_scales``: None for no deep-supervision targets.
    """

    patch_size: tuple[int, ...]
    rotation: tuple[float, float]
    dummy_2d: bool
    mirror_axes: tuple[int, ...]
    mask_channels: tuple[int, ...] = ()
    regions: tuple | None = None
    deep_supervision_scales: tuple | None = None


class DeviceAugmentation:
    """nnU-Net's training augmentation for batches ``(B, C, *initial_patch_size)`` on their own device."""

    def __init__(self, config: AugmentationConfig, rng: np.random.Generator | None = None):
        self.config = config
        self.rng = rng if rng is not None else np.random.default_rng()

    def draw(self, batch_size: int, channels: int) -> AugmentationParameters:
        """A batch's parameters from nnU-Net's distributions."""
        c = self.config
        return draw_parameters(batch_size, channels, len(c.patch_size), c.rotation, c.dummy_2d, c.mirror_axes,
                               self.rng)

    def __call__(self, image: torch.Tensor, segmentation: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor] | None]:
        """Augments a batch; returns the image and the target (a list of deep-supervision targets where
        configured, else the segmentation or region tensor; None without a segmentation)."""
        return self.apply(image, segmentation, self.draw(image.shape[0], image.shape[1]))

    @torch.no_grad()
    def spatial(self, image: torch.Tensor, segmentation: torch.Tensor | None, params: AugmentationParameters):
        """Rotation and scaling about the patch centre for the samples drawn for it, the central crop for the rest.
        Dummy-2D: the first axis joins the channels and the step works on the last two."""
        c = self.config
        b = image.shape[0]
        if c.dummy_2d:
            image = image.flatten(1, 2)
            segmentation = segmentation.flatten(1, 2) if segmentation is not None else None
        patch = c.patch_size[1:] if c.dummy_2d else c.patch_size
        out_image = AF.center_crop(image, patch, 0.0).clone()
        out_seg = AF.center_crop(segmentation, patch, PADDING_LABEL).clone() if segmentation is not None else None
        idx = params.resampled.nonzero().flatten()
        if len(idx):
            grids = AF.spatial_grids(params.angles[idx], params.scales[idx], image.shape[2:], patch, image.device)
            dev_idx = idx.to(image.device)
            out_image[dev_idx] = AF.resample_image(image[dev_idx], grids)
            if segmentation is not None:
                out_seg[dev_idx] = AF.resample_segmentation(segmentation[dev_idx], grids, PADDING_LABEL)
        if c.dummy_2d:
            out_image = out_image.view(b, -1, c.patch_size[0], *patch)
            out_seg = out_seg.view(b, -1, c.patch_size[0], *patch) if out_seg is not None else None
        return out_image, out_seg

    @torch.no_grad()
    def intensity(self, image: torch.Tensor, params: AugmentationParameters) -> torch.Tensor:
        """Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma, in nnU-Net's order."""
        dev = image.device
        p = {k: v.to(dev) for k, v in vars(params).items()}
        image = AF.gaussian_noise(image, p["noise"], p["noise_std"])
        image = AF.gaussian_blur(image, p["blur"], p["blur_sigmas"])
        image = AF.multiplicative_brightness(image, p["brightness"], p["brightness_factors"])
        image = AF.contrast(image, p["contrast"], p["contrast_factors"])
        image = AF.simulate_low_resolution(image, p["low_resolution"], p["low_resolution_channels"],
                                           p["low_resolution_scales"])
        image = AF.gamma(image, p["gamma_inverted"], p["gamma_inverted_values"], invert=True)
        return AF.gamma(image, p["gamma"], p["gamma_values"], invert=False)

    @torch.no_grad()
    def apply(self, image: torch.Tensor, segmentation: torch.Tensor | None, params: AugmentationParameters
              ) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor] | None]:
        """Augments a batch with given parameters (see :meth:`__call__`)."""
        c = self.config
        image, segmentation = self.spatial(image.float(), segmentation, params)
        image = self.intensity(image, params)
        if params.mirror.any():
            image = AF.mirror(image, params.mirror)
            segmentation = AF.mirror(segmentation, params.mirror) if segmentation is not None else None
        if segmentation is None:
            return image, None
        if c.mask_channels:
            image = AF.mask_outside_segmentation(image, segmentation, c.mask_channels)
        segmentation = AF.remove_label(segmentation, PADDING_LABEL, 0)
        if c.regions is not None:
            segmentation = AF.segmentation_to_regions(segmentation, c.regions)
        if c.deep_supervision_scales is not None:
            return image, AF.downsample_segmentation(segmentation, c.deep_supervision_scales)
        return image, segmentation
