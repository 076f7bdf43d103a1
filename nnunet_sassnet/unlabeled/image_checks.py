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

    declared = None
    try:
        image = nibabel.load(path)
        declared = _declared_voxels(image.header)
        voxels = np.asarray(image.dataobj.get_unscaled())  # reads and decompresses the whole file
    except MemoryError as e:
        raise UserInputError(
            f"{path}: its header declares {declared or 'more voxels'}, more than this process may allocate: a "
            f"corrupt header, or a scan too large for this machine; replace the file, crop or resample the scan, "
            f"or run with more memory") from e
    except Exception as e:  # nibabel and gzip raise many types for a damaged file
        raise UserInputError(f"{path}: could not read this image: truncated or corrupt ({short_reason(e)}); "
                             f"replace the file (write or copy it again) or remove the case") from e
    if voxels.dtype.kind in "fc":
        finite = np.isfinite(voxels)
        if not finite.all():
            raise _non_finite_error(path, finite)


def _declared_voxels(header) -> str:
    """What a NIfTI header says the file holds, e.g. "1200 x 1200 x 1200 float32 voxels (6.4 GiB)"."""
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = header.get_data_dtype()
    size = float(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    return f"{' x '.join(map(str, shape))} {dtype} voxels ({size / 1024 ** 3:.1f} GiB)"


def _what_the_file_holds(path: str) -> str | None:
    """A 4D or vector image described from its header (SimpleITK, without reading the voxels), else None."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size = reader.GetSize()
    components = reader.GetNumberOfComponents()
    grid = " x ".join(str(n) for n in reversed(size[:3]))  # SimpleITK's (x, y, z) as the array's (z, y, x)
    if components > 1:
        return f"a vector image: {components} components per voxel on a {grid} grid"
    if len(size) == 4:
        return f"a 4D image: {size[3]} volumes of {grid} voxels"
    return None


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
            holds = _what_the_file_holds(path) or f"read as {image.shape[0]} channels (array shape " \
                                                  f"{tuple(image.shape)})"
            return UserInputError(
                f"{path}: {holds}; each file holds one channel of one 3D (or 2D) image, as in imagesTr: split it "
                f"into CASE_0000, CASE_0001, ... as dataset.json declares, or remove the case")
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


def check_normalised(data: np.ndarray, image_files: list[str], largest: list[float], schemes: list[str],
                     varies: list[bool] | None = None) -> None:
    """Refuse a case that the plan's normalisation destroyed: preprocessed channels holding NaN or infinite values,
    or a constant channel made from one whose values vary (statistics that overflowed: a z-score's standard
    deviation of values near 1e20 is infinite in float32, and every voxel becomes 0). ``largest``: each input
    channel's largest magnitude; ``schemes``: the plan's normalisation per channel; ``varies``: whether each input
    channel holds more than one value."""
    for c, path in enumerate(image_files):
        finite = np.isfinite(data[c])
        if not finite.all():
            raise UserInputError(
                f"{path}: {int(finite.size - finite.sum())} of {finite.size} voxels become NaN or infinite in the "
                f"plan's {schemes[c]} (largest magnitude in the image {largest[c]:.3g}: too large for float32 "
                f"arithmetic); rescale the image or remove the case")
        if varies is not None and varies[c] and data[c].size and float(data[c].min()) == float(data[c].max()):
            raise UserInputError(
                f"{path}: the image's values vary, but every voxel becomes {float(data[c].min()):g} in the plan's "
                f"{schemes[c]} (largest magnitude in the image {largest[c]:.3g}: its statistics overflow float32, "
                f"or only one value is left after cropping to the nonzero region); rescale the image or remove the "
                f"case")
