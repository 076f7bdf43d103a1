"""Surfaces of binary masks and the exact distances between them, shared by the distance metrics.

The surface is medpy's (the mask minus its erosion by the connectivity-1 structure); distances come from the
exact, multi-threaded ``edt`` transform on the masks' joint bounding box, which gives medpy's values in a
fraction of its time.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from nnunet_sassnet.evaluation.masks import bounding_box
from nnunet_sassnet.nnunet_tools import usable_cores

__all__ = ["validate_spacing", "surface", "surface_distances"]

SurfaceDistances = tuple[np.ndarray, np.ndarray]
"""(distances prediction surface -> reference surface, distances reference surface -> prediction surface)."""


def validate_spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray | None:
    """The spacing as one float per array axis (a scalar means isotropic); None stays None (voxel units).

    Raises:
        ValueError: wrong number of values, or a value that is not positive and finite.
    """
    if spacing is None:
        return None
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.ndim == 0:
        sp = np.full(ndim, float(sp))
    if sp.shape != (ndim,):
        raise ValueError(f"spacing needs one value per array axis ({ndim}), got {tuple(np.atleast_1d(spacing))}")
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be positive and finite, got {tuple(sp.tolist())}")
    return sp


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask minus its erosion by the connectivity-1 cross, voxels outside the array being background.

    This is medpy's surface (``mask ^ binary_erosion(mask, generate_binary_structure(ndim, 1))``, whose
    border value is 0), written with shifted slices because that is several times faster.
    """
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = mask.copy()
    inner = [slice(1, -1)] * mask.ndim
    for axis in range(mask.ndim):
        for start in (0, 2):
            window = list(inner)
            window[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(window)]
    return mask & ~interior


def _distance_to(border: np.ndarray, spacing: np.ndarray | None, threads: int) -> np.ndarray:
    """Exact Euclidean distance of every voxel to the nearest voxel of ``border``."""
    target = ~border
    if border.ndim <= 3:
        import edt

        if spacing is None:
            anisotropy: Any = 1.0 if border.ndim == 1 else (1.0,) * border.ndim
        else:
            anisotropy = float(spacing[0]) if border.ndim == 1 else tuple(float(s) for s in spacing)
        return edt.edt(target, anisotropy=anisotropy, black_border=False, parallel=threads)
    return ndimage.distance_transform_edt(target, sampling=spacing)


def _both_directions(pred_surface: np.ndarray, ref_surface: np.ndarray, spacing: np.ndarray | None,
                     threads: int) -> SurfaceDistances:
    return (_distance_to(ref_surface, spacing, threads)[pred_surface].astype(np.float64),
            _distance_to(pred_surface, spacing, threads)[ref_surface].astype(np.float64))


def surface_distances(
    pred: np.ndarray,
    ref: np.ndarray,
    spacings: Sequence[np.ndarray | None],
    threads: int | None = None,
) -> list[SurfaceDistances]:
    """The surface distances of two non-empty boolean masks, once per spacing.

    Cropping to the joint bounding box keeps the values exact: every surface voxel of either mask lies inside
    it, and outside it both masks are background, which the zero padding in :func:`surface` reproduces.

    Args:
        pred, ref: boolean masks of the same shape, both with foreground.
        spacings: per entry, the spacing per array axis (from :func:`validate_spacing`) or None (voxels).
        threads: threads of the distance transform (default: every CPU of this process).

    Raises:
        ValueError: a mask is empty.
    """
    threads = threads or usable_cores()
    box = bounding_box(pred | ref)
    if box is None or not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    pred_surface = surface(pred[box])
    ref_surface = surface(ref[box])

    unit: SurfaceDistances | None = None
    out: list[SurfaceDistances] = []
    for spacing in spacings:
        if spacing is None or bool(np.all(spacing == spacing[0])):
            # One transform in voxel units serves every isotropic spacing (a pure scale).
            if unit is None:
                unit = _both_directions(pred_surface, ref_surface, None, threads)
            scale = 1.0 if spacing is None else float(spacing[0])
            out.append((unit[0] * scale, unit[1] * scale))
        else:
            out.append(_both_directions(pred_surface, ref_surface, spacing, threads))
    return out
