"""Checks of the unlabeled scans before and after preprocessing, each refusal one line naming the file and the fix.

What nnU-Net's ``--verify_dataset_integrity`` checks for labeled images (finite values, the channel count,
dimensionality, the same shape and spacing in every channel file of a case), plus what SimpleITK lets through
silently: a NIfTI file cut short (read with zeros for the missing part), a corrupt gzip stream, and NaN or
infinite voxels (read as 0). Origin and direction differences between channels stay warnings, as in nnU-Net.
After the plan's normalisation, values that became NaN or infinite (intensities too large for float32
arithmetic) are refused rather than trained on.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

import numpy as np

from nnunet_sassnet.errors import UserInputError, short_reason

__all__ = ["check_nifti_file", "read_case_images", "check_normalised"]

_NIFTI_ENDINGS = (".nii", ".nii.gz")


def _non_finite_error(path: str, finite: np.ndarray) -> UserInputError:
    return UserInputError(f"{path}: {int(finite.size - finite.sum())} of {finite.size} voxels are NaN or infinite; "
                          f"replace them (e.g. with the background value) or remove the case")


def check_nifti_file(path: str) -> None:
    """Read a NIfTI file whole, as stored (nibabel, a dependency of nnU-Net): refuse a truncated or corrupt file
    and NaN or infinite voxels, which SimpleITK would read as zeros."""
    import nibabel

    try:
        image = nibabel.load(path)
        voxels = np.asarray(image.dataobj.get_unscaled())  # reads and decompresses the whole file
    except Exception as e:  # nibabel and gzip raise many types for a damaged file
        raise UserInputError(f"{path}: could not read this image: truncated or corrupt ({short_reason(e)}); "
                             f"replace the file (write or copy it again) or remove the case") from e
    if voxels.dtype.kind in "fc":
        finite = np.isfinite(voxels)
        if not finite.all():
            raise _non_finite_error(path, finite)


def read_case_images(reader, image_files: list[str], dataset_is_2d: bool) -> tuple[np.ndarray, dict]:
    """The case's channels read with the plan's reader, as nnU-Net reads them, after :func:`check_nifti_file`;
    a file that is unreadable, holds several channels, has another dimensionality, shape or spacing than the
    case's first file or the dataset, or holds non-finite values is refused by name."""
    for path in image_files:
        if path.lower().endswith(_NIFTI_ENDINGS):
            check_nifti_file(path)
    printed = io.StringIO()
    try:
        # nnU-Net's readers print their complaints before raising an empty RuntimeError
        with contextlib.redirect_stdout(printed):
            images, properties = reader.read_images(image_files)
    except Exception as e:
        raise _diagnose(reader, image_files, e) from e
    if images.ndim != 4 or images.shape[0] != len(image_files):
        raise _diagnose(reader, image_files, None)
    sys.stdout.write(printed.getvalue())  # its warnings (origin, direction) stay visible, as in nnU-Net
    if (images.shape[1] == 1) != dataset_is_2d:
        kind = "2D" if dataset_is_2d else "3D"
        raise UserInputError(f"{image_files[0]}: image shape {images.shape[1:]} does not match the dataset's "
                             f"{kind} images; unlabeled scans must have the labeled scans' dimensionality")
    for path, channel in zip(image_files, images):
        finite = np.isfinite(channel)
        if not finite.all():
            raise _non_finite_error(path, finite)
    return images, properties


def _diagnose(reader, image_files: list[str], error: Exception | None) -> UserInputError:
    """Which channel file of a case that the reader refused (or read into the wrong number of channels) is at fault:
    each one read alone, and compared with the first."""
    first = None
    for path in image_files:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                image, properties = reader.read_images([path])
        except Exception as e:
            return UserInputError(f"{path}: could not read this image ({short_reason(e)}); replace or remove "
                                  f"the case")
        if image.ndim != 4 or image.shape[0] != 1:
            return UserInputError(
                f"{path}: read as {image.shape[0]} channels (array shape {tuple(image.shape)}): a 4D image, or one "
                f"with several components per voxel; each file holds one channel, as in imagesTr: split it into "
                f"CASE_0000, CASE_0001, ... as dataset.json declares, or remove the case")
        spacing = tuple(float(s) for s in properties["spacing"])
        if first is None:
            first = (os.path.basename(path), image.shape[1:], spacing)
            continue
        fix = f"all channel files of a case share one voxel grid: resample it onto {first[0]}'s or remove the case"
        if image.shape[1:] != first[1]:
            return UserInputError(f"{path}: shape {image.shape[1:]} differs from {first[0]}'s {first[1]}; {fix}")
        if not np.allclose(spacing, first[2]):
            return UserInputError(f"{path}: spacing {spacing} differs from {first[0]}'s {first[2]}; {fix}")
    reason = f" ({short_reason(error)})" if error is not None and str(error).strip() else ""
    return UserInputError(f"{image_files[0]}: could not read this case{reason}; check its channel files "
                          f"{', '.join(os.path.basename(p) for p in image_files)}")


def check_normalised(data: np.ndarray, image_files: list[str], largest: list[float], schemes: list[str]) -> None:
    """Refuse a case whose preprocessed channels hold NaN or infinite values (``largest``: each input channel's
    largest magnitude, ``schemes``: the plan's normalisation per channel)."""
    for c, path in enumerate(image_files):
        finite = np.isfinite(data[c])
        if not finite.all():
            raise UserInputError(
                f"{path}: {int(finite.size - finite.sum())} of {finite.size} voxels become NaN or infinite in the "
                f"plan's {schemes[c]} (largest magnitude in the image {largest[c]:.3g}: too large for float32 "
                f"arithmetic); rescale the image or remove the case")
