"""nnunet-sassnet: SASSNet (shape-aware semi-supervised segmentation) trainers for nnU-Net v2."""

__version__ = "0.1.0"

# torch and nnU-Net's training stack are imported on first use only: the command-line tools that need
# neither (evaluation, conversion) start in a fraction of a second
_LAZY = {
    "signed_distance_map": "nnunet_sassnet.sdm",
    "nnUNetTrainerSASSNet": "nnunet_sassnet.trainers",
    "nnUNetTrainerSDM": "nnunet_sassnet.trainers",
    "trainer_variant": "nnunet_sassnet.trainers",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nnunet_sassnet' has no attribute {name!r}")


__all__ = list(_LAZY)
