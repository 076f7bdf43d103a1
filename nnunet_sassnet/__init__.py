"""nnunet-sassnet: SASSNet (shape-aware semi-supervised segmentation) trainers for nnU-Net v2."""
from nnunet_sassnet.sdm import signed_distance_map

__version__ = "0.1.0"


def __getattr__(name):
    # the trainers import nnU-Net and torch's training stack: load them on first use only
    if name in ("nnUNetTrainerSASSNet", "nnUNetTrainerSDM", "trainer_variant"):
        from nnunet_sassnet import trainers
        return getattr(trainers, name)
    raise AttributeError(f"module 'nnunet_sassnet' has no attribute {name!r}")


__all__ = ["signed_distance_map", "nnUNetTrainerSASSNet", "nnUNetTrainerSDM", "trainer_variant"]
