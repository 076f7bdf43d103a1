"""The unlabeled patch stream: nnU-Net's own data loader and augmentation over preprocessed unlabeled cases."""
from __future__ import annotations

__all__ = ["make_unlabeled_loader"]


def make_unlabeled_loader(folder: str, batch_size: int, initial_patch_size, patch_size, label_manager,
                          transforms, num_processes: int, pin_memory: bool):
    """nnU-Net's own loader and augmenter over the unlabeled cases in ``folder``: random patches, no
    foreground oversampling (there is no foreground); ``num_processes`` 0 augments in this process."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    dataset = nnUNetDatasetBlosc2(folder)
    loader = nnUNetDataLoader(dataset, batch_size, initial_patch_size, patch_size, label_manager,
                              oversample_foreground_percent=0.0, transforms=transforms)
    if num_processes == 0:
        augmenter = SingleThreadedAugmenter(loader, None)
    else:
        # half of nnU-Net's augmentation processes: the labeled stream keeps its own
        augmenter = NonDetMultiThreadedAugmenter(
            data_loader=loader, transform=None, num_processes=max(1, num_processes // 2),
            num_cached=max(3, num_processes // 4), seeds=None, pin_memory=pin_memory, wait_time=0.002)
    next(augmenter)  # start the workers now, as nnU-Net does for its loaders
    return augmenter
