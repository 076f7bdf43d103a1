"""The unlabeled patch stream: nnU-Net's own data loader and augmentation over preprocessed unlabeled cases, each
case checked on its first use (see :mod:`~nnunet_sassnet.unlabeled.checked_loader`)."""
from __future__ import annotations

__all__ = ["make_unlabeled_loader"]


def make_unlabeled_loader(folder: str, batch_size: int, initial_patch_size, patch_size, label_manager,
                          transforms, num_processes: int, pin_memory: bool, log_file: str | None = None,
                          previous_stage_folder: str | None = None):
    """nnU-Net's own loader and augmenter over the unlabeled cases in the version ``folder``: random patches, no
    foreground oversampling (there is no foreground); ``num_processes`` 0 augments in this process; damaged cases
    are named in ``log_file`` (nnU-Net's training log) and on the console; ``previous_stage_folder``: the cascade's
    previous-stage segmentations of the cases (see :mod:`~nnunet_sassnet.unlabeled.previous_stage`)."""
    # nnU-Net is imported where it is used: this package's light commands import nnunet_sassnet.unlabeled
    from nnunet_sassnet.unlabeled.checked_loader import (CheckedDataLoader, UnlabeledAugmenter, UnlabeledDataset,
                                                         UnlabeledSingleThreadedAugmenter)

    dataset = UnlabeledDataset(folder, folder_with_segs_from_previous_stage=previous_stage_folder)
    loader = CheckedDataLoader(dataset, batch_size, initial_patch_size, patch_size, label_manager,
                               oversample_foreground_percent=0.0, transforms=transforms, log_file=log_file)
    if num_processes == 0:
        augmenter = UnlabeledSingleThreadedAugmenter(loader, None)
    else:
        # half of nnU-Net's augmentation processes: the labeled stream keeps its own
        augmenter = UnlabeledAugmenter(
            data_loader=loader, transform=None, num_processes=max(1, num_processes // 2),
            num_cached=max(3, num_processes // 4), seeds=None, pin_memory=pin_memory, wait_time=0.002)
    augmenter.version_folder = folder
    next(augmenter)  # start the workers now, as nnU-Net does for its loaders
    return augmenter
