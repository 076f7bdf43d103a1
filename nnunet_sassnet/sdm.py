"""Signed distance maps (SDM), the shape representation SASSNet learns.

Definition (SASSNet, Li et al. 2020, and its published ``compute_sdf``), for a binary mask M of one patch::

    sdm = d_out / max(d_out) - d_in / max(d_in),   sdm = 0 on the inner boundary of M

* ``d_in``: for a foreground voxel, the Euclidean distance to the nearest background voxel;
* ``d_out``: for a background voxel, the distance to the nearest foreground voxel;
* the inner boundary: foreground voxels with a background 6-neighbour;
* distances are taken inside the patch only: voxels outside it are not background;
* an empty mask gives all 0, a full mask all -1.

With unit spacing, a foreground voxel has a background 6-neighbour exactly when its ``d_in`` is 1 (the
nearest background voxel at distance 1 must be a face neighbour), so the boundary needs no extra pass.

Two implementations share the definition: :func:`signed_distance_map` (NumPy, CPU, exact via the ``edt``
package) and :func:`signed_distance_map_torch` (batched, any torch device, exact separable EDT). Both accept
an optional voxel spacing for physical-unit distances on anisotropic data (identical on isotropic data);
the boundary stays the 6-neighbour boundary either way.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import edt
import numpy as np
import torch

__all__ = ["signed_distance_map", "signed_distance_map_torch", "signed_distance_maps", "signed_distance_maps_where_known"]


def _validate_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must hold {ndim} positive numbers, got {spacing}")
    return spacing


def _inner_boundary_numpy(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour inside the array."""
    boundary = np.zeros_like(mask)
    for axis in range(mask.ndim):
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        boundary[lo] |= mask[lo] & ~mask[hi]
        boundary[hi] |= mask[hi] & ~mask[lo]
    return boundary


def signed_distance_map(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Normalised signed distance map of one binary mask (2D or 3D), float32 in [-1, 1].

    Parameters
    ----------
    mask : ndarray
        Binary mask (bool or integers 0/1); any number of spatial dimensions >= 1.
    spacing : sequence of float, optional
        Voxel spacing per axis; distances in physical units. Default: voxel units (the published code).

    Returns
    -------
    ndarray of float32, same shape as ``mask``.
    """
    mask = np.asarray(mask)
    if mask.ndim == 0:
        raise ValueError("mask must have at least one dimension")
    if mask.dtype != bool:
        values = np.unique(mask)
        if not np.all(np.isin(values, (0, 1))):
            raise ValueError(f"mask must be binary (0/1), found values {values[:5].tolist()}")
        mask = mask.astype(bool)
    spacing = _validate_spacing(spacing, mask.ndim)
    out = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return out
    if mask.all():
        out.fill(-1.0)
        return out
    anisotropy = spacing if spacing is not None else (1.0,) * mask.ndim
    mask_c = np.ascontiguousarray(mask)
    # black_border=False: voxels beyond the patch edge are not background
    # one multi-label transform gives both distances at once: with labels 1 (background) and 2
    # (foreground) and no label 0, every voxel gets the distance to the nearest voxel of the other label,
    # i.e. d_out on background and d_in on foreground. Float32 throughout: the distances are exact, the
    # normalisation is within 1e-7 of float64. One thread: more are slower for patch-sized arrays (and this
    # runs inside nnU-Net's data-loading processes' neighbours)
    distance = edt.edt(mask_c.astype(np.uint8) + np.uint8(1), anisotropy=anisotropy, black_border=False,
                       parallel=1)
    d_in = np.where(mask_c, distance, np.float32(0))
    d_out = np.where(mask_c, np.float32(0), distance)
    sdm = d_out * np.float32(1.0 / d_out.max())
    sdm -= d_in * np.float32(1.0 / d_in.max())
    # in voxel units the boundary is exactly where d_in == 1 (see the module docstring)
    boundary = d_in == 1.0 if spacing is None else _inner_boundary_numpy(mask_c)
    sdm[boundary] = 0.0
    return sdm.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------
# torch: exact separable squared EDT (Felzenszwalb & Huttenlocher's decomposition).
# Pass 1 (first spatial axis) is a 1D distance to the nearest target voxel, done with cumulative max/min of
# indices: linear work, no search window. Each further axis is the min-plus transform
#     g[i] = min_j f[j] + (s * (i - j))^2
# evaluated by brute force over the axis length n. All values are sums of squared integer distances (times
# squared spacings), exact in float32 for patch sizes far beyond what fits on a GPU.
# ---------------------------------------------------------------------------------------------------------

# elements of the (lines, n, n) min-plus intermediate per chunk; bounds memory in eager mode
_MIN_PLUS_CHUNK_ELEMENTS = 1 << 26


def _distance_1d_first_axis(target: torch.Tensor, spacing: float, big: float) -> torch.Tensor:
    """Squared distance along dim 1 to the nearest True voxel of ``target`` (N, n, ...); ``big`` if none."""
    n = target.shape[1]
    shape = [1, n] + [1] * (target.ndim - 2)
    idx = torch.arange(n, device=target.device, dtype=torch.float32).view(shape)
    inf = float("inf")  # a Python scalar: a device tensor made from it would cost a host-device copy
    last = torch.where(target, idx, -inf).cummax(dim=1).values
    nxt = torch.where(target, idx, inf).flip(1).cummin(dim=1).values.flip(1)
    d = torch.minimum(idx - last, nxt - idx) * spacing
    return torch.where(torch.isinf(d), torch.full_like(d, big), d * d)


def _min_plus_block(lines: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    return (lines[:, None, :] + sq[None]).amin(dim=-1)


_compiled_min_plus = None
_compile_failed = False


def _use_compiled_kernel(t: torch.Tensor) -> bool:
    # on CUDA, torch.compile fuses the broadcast and the reduction into one kernel that never materialises
    # the (lines, n, n) intermediate; nnU-Net's own switch (nnUNet_compile) turns it off as well
    setting = os.environ.get("nnUNet_compile", "true").lower()
    return t.is_cuda and not _compile_failed and setting in ("true", "1", "t")


def _min_plus_last_axis(f: torch.Tensor, spacing: float) -> torch.Tensor:
    """g[..., i] = min_j f[..., j] + (spacing * (i - j))^2, exact, over the last dim."""
    global _compiled_min_plus, _compile_failed
    n = f.shape[-1]
    pos = torch.arange(n, device=f.device, dtype=torch.float32)
    sq = ((pos[:, None] - pos[None, :]) * spacing) ** 2  # (i, j)
    lines = f.reshape(-1, n)
    if _use_compiled_kernel(lines):
        try:
            if _compiled_min_plus is None:
                _compiled_min_plus = torch.compile(_min_plus_block, dynamic=False)
            return _compiled_min_plus(lines, sq).reshape(f.shape)
        except Exception as e:  # no working compiler toolchain: the eager path gives the same result
            _compile_failed = True
            warnings.warn(f"torch.compile of the SDM kernel failed ({type(e).__name__}); using eager mode")
    rows_per_chunk = max(1, _MIN_PLUS_CHUNK_ELEMENTS // (n * n))
    out = torch.empty_like(lines)
    for start in range(0, lines.shape[0], rows_per_chunk):
        out[start:start + rows_per_chunk] = _min_plus_block(lines[start:start + rows_per_chunk], sq)
    return out.reshape(f.shape)


def _squared_edt_torch(target: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Squared Euclidean distance of every voxel to the nearest True voxel; (N, *spatial) bool input."""
    spatial = target.shape[1:]
    # larger than any in-patch squared distance, small enough to stay exact in float32
    big = float(sum((s * n) ** 2 for s, n in zip(spacing, spatial)) + 1.0)
    f = _distance_1d_first_axis(target, spacing[0], big)
    for axis in range(1, len(spatial)):
        f = _min_plus_last_axis(f.movedim(axis + 1, -1), spacing[axis]).movedim(-1, axis + 1)
    return f


def signed_distance_map_torch(masks: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Normalised signed distance maps of a batch of binary masks, on the masks' device.

    Parameters
    ----------
    masks : Tensor
        (N, *spatial) binary masks (bool or 0/1), 1 to 3 spatial dims; each of the N maps is normalised
        on its own, as :func:`signed_distance_map` does.
    spacing : sequence of float, optional
        Voxel spacing per spatial axis (physical units); default voxel units.

    Returns
    -------
    Tensor of float32, shape (N, *spatial), values in [-1, 1]; no host-device synchronisation.
    """
    if masks.ndim < 2:
        raise ValueError("masks must be (N, *spatial)")
    masks = masks.bool()
    ndim = masks.ndim - 1
    spacing = _validate_spacing(spacing, ndim) or (1.0,) * ndim
    n = masks.shape[0]
    if masks.numel() == 0:
        return torch.zeros(masks.shape, dtype=torch.float32, device=masks.device)
    # one batched EDT for both directions: d_in (targets = background), d_out (targets = foreground)
    sq = _squared_edt_torch(torch.cat((~masks, masks)), spacing)
    d_in, d_out = sq.sqrt().split(n)
    reduce_dims = tuple(range(1, ndim + 1))
    d_in = torch.where(masks, d_in, 0.0)
    d_out = torch.where(masks, 0.0, d_out)
    max_in = d_in.amax(dim=reduce_dims, keepdim=True)
    max_out = d_out.amax(dim=reduce_dims, keepdim=True)
    # clamp: an empty mask has max_in 0, a full one max_out 0; those terms are 0 anyway
    sdm = d_out / max_out.clamp_min(1e-12) - d_in / max_in.clamp_min(1e-12)
    boundary = masks & _has_background_face_neighbour(masks)
    sdm = torch.where(boundary, 0.0, sdm)
    has_fg = masks.flatten(1).any(1).view(-1, *([1] * ndim))
    has_bg = (~masks).flatten(1).any(1).view(-1, *([1] * ndim))
    sdm = torch.where(has_fg, sdm, 0.0)  # empty mask: all 0
    sdm = torch.where(has_bg, sdm, -1.0)  # full mask: all -1
    return sdm.float()


def _has_background_face_neighbour(masks: torch.Tensor) -> torch.Tensor:
    """True where a voxel has a background face neighbour inside the patch; (N, *spatial) bool input."""
    bg = ~masks
    out = torch.zeros_like(masks)
    for dim in range(1, masks.ndim):
        n = masks.shape[dim]
        if n < 2:
            continue
        out.narrow(dim, 0, n - 1).logical_or_(bg.narrow(dim, 1, n - 1))
        out.narrow(dim, 1, n - 1).logical_or_(bg.narrow(dim, 0, n - 1))
    return out


def signed_distance_maps(masks: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Batched SDMs on the masks' device: the ``edt`` package on the CPU, the torch EDT elsewhere.

    Same definition and result as :func:`signed_distance_map` applied to each ``masks[i]``.
    """
    if masks.device.type != "cpu":
        return signed_distance_map_torch(masks, spacing)
    array = masks.bool().numpy()
    return torch.from_numpy(np.stack([signed_distance_map(m, spacing) for m in array])) if len(array) else \
        torch.zeros(masks.shape, dtype=torch.float32)


def signed_distance_maps_where_known(masks: torch.Tensor, known: torch.Tensor,
                                     spacing: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDMs of masks that are known only in part, and where their values are determined.

    An SDM value is a global function of the mask: a voxel's distance, whether it lies on the boundary and the
    patch's largest distance (the normalisation) may all depend on the voxels whose label is unknown. Every
    completion ``M`` of the unknown voxels lies between the two extreme ones, ``low`` (unknown voxels as background)
    and ``high`` (as foreground), and each of those quantities is monotone in ``M``: a background voxel's distance
    to the foreground and the largest such distance shrink as ``M`` grows, a foreground voxel's distance to the
    background and the largest such distance grow, the boundary shrinks. So a known voxel whose distance, boundary
    status and side's largest distance are the same for ``low`` and ``high`` has the same SDM value for every
    completion: that value is the target, and such voxels are the ones marked determined.

    Parameters
    ----------
    masks : Tensor
        (N, *spatial) foreground where known (values at unknown voxels are not read).
    known : Tensor
        (N, *spatial) bool, True where the label is known.
    spacing : sequence of float, optional
        As :func:`signed_distance_maps`.

    Returns
    -------
    (sdm, determined): float32 SDMs of ``low`` (:func:`signed_distance_maps`; on determined voxels the value of
    every completion) and a bool tensor, True where that value is determined. Fully known masks are determined
    everywhere. On the masks' device, without host-device synchronisation.
    """
    if masks.shape != known.shape or masks.ndim < 2:
        raise ValueError(f"masks and known must both be (N, *spatial), got {tuple(masks.shape)} and "
                         f"{tuple(known.shape)}")
    known = known.bool()
    low = masks.bool() & known
    high = low | ~known
    ndim = masks.ndim - 1
    if masks.numel() == 0:
        return torch.zeros(masks.shape, dtype=torch.float32, device=masks.device), known
    both = torch.cat((low, high))
    edt_spacing = _validate_spacing(spacing, ndim) or (1.0,) * ndim
    # squared distance of every voxel to the nearest voxel of the other side of its filling; exact sums of squared
    # integer steps (times squared spacings), so equal distances compare equal; a side with no voxel gives the
    # same large value for both fillings
    to_background = _squared_edt_torch(~both, edt_spacing)
    to_foreground = _squared_edt_torch(both, edt_spacing)
    distance = torch.where(both, to_background, to_foreground)
    reduce_dims = tuple(range(1, ndim + 1))
    max_inside = torch.where(both, distance, 0.0).amax(dim=reduce_dims)
    max_outside = torch.where(both, 0.0, distance).amax(dim=reduce_dims)
    boundary = both & _has_background_face_neighbour(both)
    n = masks.shape[0]
    per_patch = (n,) + (1,) * ndim
    same_inside = (max_inside[:n] == max_inside[n:]).view(per_patch) & (boundary[:n] == boundary[n:])
    same_outside = (max_outside[:n] == max_outside[n:]).view(per_patch)
    determined = known & (distance[:n] == distance[n:]) & torch.where(low, same_inside, same_outside)
    return signed_distance_maps(low, spacing), determined
