"""nnU-Net's ignore label (sparse annotations) in this package's supervised terms.

nnU-Net's segmentation loss skips voxels labeled ``ignore`` by itself. The one other term that reads labels is the
SDM regression: its target is a global function of the mask, so an ignored voxel could move the target of a voxel
far from it (its nearest boundary, or the patch's largest distance, may lie under the ignored region). The SDM
loss is therefore taken only on the voxels whose SDM value is the same for every labeling of the ignored voxels
(:func:`~nnunet_sassnet.sdm.signed_distance_maps_where_known`), the mean over those voxels; a batch with none adds
0. On a fully labeled patch that is every voxel, and the loss is the usual MSE.
"""
from __future__ import annotations

import copy

import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_sassnet.sdm import signed_distance_maps_where_known

__all__ = ["known_voxels", "sdm_targets_where_known", "masked_mse", "without_ignore_label"]


def without_ignore_label(label_manager: LabelManager) -> LabelManager:
    """``label_manager`` without its ignore label, for nnU-Net's loader over unlabeled cases: with one it would
    crop around annotated voxels, which an unlabeled case has none of (its patches are random crops)."""
    if not label_manager.has_ignore_label:
        return label_manager
    plain = copy.copy(label_manager)
    plain._ignore_label = None
    return plain


def known_voxels(target: torch.Tensor, label_manager: LabelManager) -> torch.Tensor:
    """(N, 1, ...) bool, True where nnU-Net's target has a label (not the ignore label).

    Labels: ``target`` (N, 1, ...) holds the ignore label's value there. Regions: nnU-Net appends the ignore
    label as a last region channel (1 where ignored).
    """
    if label_manager.has_regions:
        return target[:, -1:] == 0
    return target[:, :1] != label_manager.ignore_label


def sdm_targets_where_known(target: torch.Tensor, label_manager: LabelManager, channels: slice,
                            spacing: tuple[float, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDM targets (N, K, ...) of the SDM ``channels`` of nnU-Net's full-resolution ``target``, and where they are
    determined whatever the ignored voxels' labels are (N, K, ...) bool."""
    with torch.no_grad():
        known = known_voxels(target, label_manager)
        if label_manager.has_regions:
            masks = target[:, channels].bool()
        else:
            masks = torch.cat([target[:, :1] == c for c in range(channels.start, channels.stop)], dim=1)
        n, k = masks.shape[:2]
        flat_known = known.expand_as(masks).reshape(n * k, *masks.shape[2:])
        sdm, determined = signed_distance_maps_where_known(masks.reshape(n * k, *masks.shape[2:]), flat_known,
                                                           spacing)
        return sdm.to(target.device).reshape(masks.shape), determined.reshape(masks.shape)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the voxels where ``mask`` is True; 0 (with a zero gradient) where there are none.

    With ``mask`` all True it is ``F.mse_loss``. No host-device synchronisation.
    """
    weights = mask.to(prediction.dtype)
    return ((prediction - target) ** 2 * weights).sum() / weights.sum().clamp_min(1.0)
