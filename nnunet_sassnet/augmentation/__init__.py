"""nnU-Net's training augmentation, batched on the training device (see :mod:`.pipeline`).

* :mod:`.functional`: each step as a pure function on ``(B, C, *spatial)`` tensors;
* :mod:`.parameters`: the per-sample parameters, drawn from nnU-Net's distributions;
* :mod:`.pipeline`: the steps in nnU-Net's order for a trainer's configuration.
"""
from nnunet_sassnet.augmentation.parameters import AugmentationParameters, draw_parameters
from nnunet_sassnet.augmentation.pipeline import AugmentationConfig, DeviceAugmentation

__all__ = ["AugmentationConfig", "AugmentationParameters", "DeviceAugmentation", "draw_parameters"]
