"""Binary masks: input checks, bounding boxes and the largest connected component (no file I/O)."""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["as_mask", "validate_pair", "bounding_box", "largest_component", "keep_largest_component"]


def as_mask(array: Any, name: str) -> np.ndarray:
    """A boolean view of ``array`` in which every non-zero value is foreground (medpy's rule).

    Args:
        array: numeric or boolean array-like.
        name: the argument's name, for the error message.

    Raises:
        TypeError: ``array`` is neither numeric nor boolean.
    """
    arr = np.asarray(array)
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a numeric or boolean array, got dtype {arr.dtype}")
    return np.atleast_1d(arr if arr.dtype == bool else arr != 0)


def validate_pair(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both arguments as boolean masks of the same shape.

    Raises:
        TypeError: an argument is neither numeric nor boolean.
        ValueError: the shapes differ.
    """
    p = as_mask(pred, "pred")
    r = as_mask(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref differ in shape: {p.shape} vs {r.shape}")
    return p, r


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the foreground of a boolean mask (one pass in C); None if the mask is empty."""
    found = ndimage.find_objects(mask.view(np.uint8), max_label=1)
    return found[0] if found else None


def largest_component(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """(largest fully connected component of a boolean mask, whether anything was removed).

    When nothing is removed the input array itself is returned, so that callers can reuse its scores.
    """
    box = bounding_box(mask)
    if box is None:
        return mask, False
    sub = mask[box]
    # Full connectivity (26 in 3D) like the paper's NMS and nnU-Net's post-processing.
    labels, n = ndimage.label(sub, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if n <= 1:
        return mask, False
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = np.zeros(mask.shape, dtype=bool)
    # argmax takes the first of equally large components, so the result is deterministic.
    out[box] = labels == int(sizes.argmax())
    return out, True


def keep_largest_component(mask: Any) -> np.ndarray:
    """Boolean mask of the largest 26-connected (full connectivity) component of ``mask``.

    Args:
        mask: numeric or boolean array; non-zero is foreground. An empty mask stays empty.

    Raises:
        TypeError: ``mask`` is neither numeric nor boolean.
    """
    m = as_mask(mask, "mask")
    out, changed = largest_component(m)
    return out if changed else out.copy()
