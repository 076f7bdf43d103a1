"""nnU-Net's training augmentation on the training device, batched, instead of in the loader workers.

A trainer with :class:`DeviceAugmentationMixin` has the class attribute ``augment_on_device``: True runs nnU-Net's
default training augmentation (:mod:`nnunet_sassnet.augmentation`) on whole batches on ``self.device``, the
workers only load and crop the enlarged patches nnU-Net crops for rotation and scaling; False keeps nnU-Net's
per-sample augmentation in the workers; None (default) is True on CUDA devices, cascade configurations excepted,
and False elsewhere (on the CPU the workers run beside the training step, the device would do the same work inside
it).

Labeled and unlabeled streams go through the same pipeline and parameter distributions (the unlabeled one without
deep-supervision targets and regions), so nothing in the augmentation tells them apart. Under DDP each rank
augments its own batches on its own device. :class:`nnUNetTrainerAugmentOnDevice` is nnU-Net's supervised trainer
with it, for supervised training and as the fair baseline of the semi-supervised trainers.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sassnet.augmentation import AugmentationConfig, DeviceAugmentation
from nnunet_sassnet.errors import UserInputError

__all__ = ["DeviceAugmentationMixin", "DeviceAugmentedLoader", "nnUNetTrainerAugmentOnDevice"]


class DeviceAugmentedLoader:
    """A loader's batches moved to ``device`` and augmented there; anything else is the wrapped loader's."""

    def __init__(self, loader, augmentation: DeviceAugmentation, device: torch.device):
        self.loader = loader
        self.augmentation = augmentation
        self.device = device

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.loader)
        image = batch["data"].to(self.device, non_blocking=True)
        seg = batch.get("target")
        seg = seg.to(self.device, non_blocking=True) if isinstance(seg, torch.Tensor) else None
        image, target = self.augmentation(image, seg)
        return {**batch, "data": image, "target": target}

    def __getattr__(self, name):
        # only reached for attributes this wrapper lacks (the augmenter's version_folder, data_loader, _finish)
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class DeviceAugmentationMixin:
    """The ``augment_on_device`` setting for nnU-Net trainers (put it before the nnU-Net trainer in the bases)."""

    #: nnU-Net's training augmentation batched on the training device (True), in the loader workers (False),
    #: or on the device for CUDA only (None)
    augment_on_device: bool | None = None

    @property
    def augments_on_device(self) -> bool:
        """Whether this run augments on its device (``augment_on_device``; None: on CUDA devices, except for cascade
        configurations, whose previous-stage channels the device pipeline does not augment yet)."""
        if self.augment_on_device is None:
            return self.device.type == "cuda" and not self.is_cascaded
        return bool(self.augment_on_device)

    def device_augmentation(self, labeled: bool) -> DeviceAugmentation:
        """nnU-Net's ``get_training_transforms`` for this configuration as a batched pipeline; the unlabeled stream
        (``labeled`` False) gets neither deep-supervision targets nor regions, as its CPU pipeline."""
        rotation, dummy_2d, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        use_mask = self.configuration_manager.use_mask_for_norm or []
        regions = None
        if labeled and self.label_manager.has_regions:
            regions = list(self.label_manager.foreground_regions)
            if self.label_manager.ignore_label is not None:
                regions.append(self.label_manager.ignore_label)
        config = AugmentationConfig(
            patch_size=tuple(int(s) for s in self.configuration_manager.patch_size),
            rotation=tuple(float(r) for r in rotation), dummy_2d=bool(dummy_2d),
            mirror_axes=tuple(int(a) for a in mirror_axes or ()),
            mask_channels=tuple(i for i, m in enumerate(use_mask) if m), regions=tuple(regions) if regions else None,
            deep_supervision_scales=tuple(map(tuple, self._get_deep_supervision_scales()))
            if labeled and self.enable_deep_supervision else None)
        # numpy's global state (seeded by whoever seeds the run), the rank and the stream: ranks and streams draw
        # apart, a seeded run draws the same again
        seed = [int(np.random.randint(2 ** 31)), int(self.local_rank), int(labeled)]
        return DeviceAugmentation(config, np.random.default_rng(seed))

    def augmented_on_device(self, loader, labeled: bool):
        """``loader`` with this trainer's device augmentation applied to its batches (when augmenting on the
        device; else ``loader`` as it is)."""
        if not self.augments_on_device:
            return loader
        return DeviceAugmentedLoader(loader, self.device_augmentation(labeled), self.device)

    def get_training_transforms(self, *args, **kwargs):
        # while the loaders are built for device augmentation the workers only load and crop
        if getattr(self, "_workers_load_and_crop_only", False):
            return None
        return super().get_training_transforms(*args, **kwargs)

    def get_dataloaders(self):
        if not self.augments_on_device:
            return super().get_dataloaders()
        if self.is_cascaded:
            raise UserInputError(
                f"{self.__class__.__name__}: augment_on_device does not support cascade configurations "
                f"({self.configuration_name}); set augment_on_device = False in your trainer class")
        self.print_to_log_file("nnU-Net's training augmentation runs batched on the training device "
                               f"({self.device}); the loader workers only load and crop")
        self._workers_load_and_crop_only = True
        try:
            dataloader_train, dataloader_val = super().get_dataloaders()
        finally:
            self._workers_load_and_crop_only = False
        return self.augmented_on_device(dataloader_train, labeled=True), dataloader_val

    def on_train_end(self):
        # nnU-Net stops the workers of the loaders it knows by their type: hand it the wrapped ones
        for name in ("dataloader_train", "dataloader_unlabeled"):
            loader = getattr(self, name, None)
            if isinstance(loader, DeviceAugmentedLoader):
                setattr(self, name, loader.loader)
        super().on_train_end()


class nnUNetTrainerAugmentOnDevice(DeviceAugmentationMixin, nnUNetTrainer):
    """nnU-Net's ``nnUNetTrainer`` with its training augmentation batched on the training device."""

    augment_on_device = True
