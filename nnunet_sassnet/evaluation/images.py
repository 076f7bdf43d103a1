"""Label images on disk: finding the pairs of two folders, reading headers and voxels, checking them.

Every problem is a :class:`~nnunet_sassnet.errors.UserInputError` whose one-line message names the case, the
file and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunet_sassnet.errors import UserInputError

__all__ = ["IMAGE_ENDINGS", "case_id", "match_cases", "read_header", "read_labels", "present_labels",
           "check_geometry"]

# Longest ending first, so that "a.nii.gz" is case "a" and not "a.nii".
IMAGE_ENDINGS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tif", ".tiff", ".png", ".bmp"
)
SPACING_RTOL = 1e-4


def case_id(name: str) -> str | None:
    """The case identifier of a file name (the name minus its image ending), None for other files."""
    lower = name.lower()
    for ending in IMAGE_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _list_images(folder: str, role: str, flag: str) -> dict[str, Path]:
    path = Path(folder)
    if not path.exists():
        raise UserInputError(f"the {role} folder {folder} does not exist; check {flag}")
    if not path.is_dir():
        raise UserInputError(f"{folder} is not a folder; {flag} takes the folder that holds the {role} files")
    found: dict[str, Path] = {}
    for entry in sorted(path.iterdir()):
        case = case_id(entry.name)
        # nnU-Net leaves plans.json, dataset.json, *.npz, *.pkl, ... beside the predictions: not images.
        if case is None or not entry.is_file():
            continue
        if case in found:
            raise UserInputError(
                f"case {case}: two {role} files ({found[case].name}, {entry.name}) in {folder}; keep one"
            )
        found[case] = entry
    if not found:
        raise UserInputError(
            f"no {role} images ({', '.join(IMAGE_ENDINGS)}) in {folder}; point {flag} at the folder with the "
            f"{role} label maps"
        )
    return found


def _first_and_more(items: list[str]) -> str:
    more = len(items) - 1
    return f" (and {more} more: {', '.join(items[1:6])}{', ...' if more > 5 else ''})" if more else ""


def match_cases(ref_dir: str, pred_dir: str) -> list[tuple[str, Path, Path]]:
    """(case, reference file, prediction file) for every case, sorted by case.

    Raises:
        UserInputError: a folder is missing or holds no image, a case has two files, or a case lacks its
            prediction or its reference.
    """
    refs = _list_images(ref_dir, "reference", "-ref")
    preds = _list_images(pred_dir, "prediction", "-pred")
    missing = sorted(set(refs) - set(preds))
    if missing:
        hint = ""
        if all(c.endswith("_0000") for c in refs):
            hint = " (the reference names end in _0000: is -ref the images folder instead of the labels folder?)"
        raise UserInputError(
            f"case {missing[0]}: no prediction in {pred_dir}{_first_and_more(missing)}; predict it or remove "
            f"the reference from {ref_dir}{hint}"
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        raise UserInputError(
            f"case {extra[0]}: prediction {preds[extra[0]].name} has no reference in {ref_dir}"
            f"{_first_and_more(extra)}; remove it from {pred_dir} or add its reference"
        )
    return [(case, refs[case], preds[case]) for case in sorted(refs)]


def _short_itk_error(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def _unreadable(path: Path, case: str, role: str, exc: Exception) -> UserInputError:
    return UserInputError(
        f"case {case}: cannot read the {role} {path} ({_short_itk_error(exc)}); replace it with a readable image"
    )


def _single_component(components: int, path: Path, case: str, role: str) -> None:
    if components != 1:
        raise UserInputError(
            f"case {case}: the {role} {path} has {components} components per voxel; save a single-component "
            "label map"
        )


def read_header(path: Path, case: str, role: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(size, spacing), both in the header's (x, y, z) order, without reading the voxels.

    Raises:
        UserInputError: the file is unreadable or has more than one component per voxel.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, case, role, exc) from None
    _single_component(reader.GetNumberOfComponents(), path, case, role)
    return tuple(reader.GetSize()), tuple(reader.GetSpacing())


def read_labels(path: Path, case: str, role: str) -> tuple[np.ndarray, np.ndarray]:
    """(label array in numpy (z, y, x) order, spacing per array axis).

    Raises:
        UserInputError: the file is unreadable, has several components or does not hold integer labels >= 0.
    """
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _unreadable(path, case, role, exc) from None
    _single_component(image.GetNumberOfComponentsPerPixel(), path, case, role)
    arr = sitk.GetArrayFromImage(image)
    # SimpleITK's spacing is (x, y, z); the array is (z, y, x).
    spacing = np.asarray(image.GetSpacing()[::-1], dtype=np.float64)
    return _integer_labels(arr, path, case, role), spacing


def _integer_labels(arr: np.ndarray, path: Path, case: str, role: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            example = arr[bad].flat[0]
            raise UserInputError(
                f"case {case}: the {role} {path} has non-integer label values (e.g. {example:g}); save label "
                "maps with integer labels (argmax or threshold probabilities first)"
            )
    elif not np.issubdtype(arr.dtype, np.integer):
        raise UserInputError(f"case {case}: the {role} {path} has pixel type {arr.dtype}; save integer labels")
    if arr.size == 0:
        raise UserInputError(f"case {case}: the {role} {path} is empty (size 0); replace it")
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise UserInputError(
            f"case {case}: the {role} {path} has a negative label ({lo:g}); labels must be integers >= 0"
        )
    if hi > np.iinfo(np.int32).max:
        raise UserInputError(f"case {case}: the {role} {path} has a label > 2^31 ({hi:g}); relabel it")
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.uint8 if hi < 256 else np.int32)
    return arr


def present_labels(arr: np.ndarray) -> set[int]:
    """The label values that occur in a non-negative integer array."""
    hi = int(arr.max())
    if hi <= 65535:
        # bincount is one pass; np.unique sorts the whole volume.
        return {int(v) for v in np.flatnonzero(np.bincount(arr.ravel(), minlength=1))}
    return {int(v) for v in np.unique(arr)}


def _fmt_tuple(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def check_geometry(
    case: str,
    ref_size: Sequence[int],
    pred_size: Sequence[int],
    ref_spacing: Sequence[float],
    pred_spacing: Sequence[float],
) -> None:
    """Refuse a prediction on another grid than its reference's.

    Sizes and spacings are in the header's (x, y, z) order, as users see them in ITK tools.

    Raises:
        UserInputError: the sizes differ, or a spacing differs by more than a relative 1e-4.
    """
    if tuple(ref_size) != tuple(pred_size):
        raise UserInputError(
            f"case {case}: prediction size {tuple(int(s) for s in pred_size)} differs from reference size "
            f"{tuple(int(s) for s in ref_size)} (x, y, z); predict on the reference's grid or resample the "
            "prediction onto it"
        )
    rs = np.asarray(ref_spacing, dtype=np.float64)
    ps = np.asarray(pred_spacing, dtype=np.float64)
    if not np.all(np.abs(rs - ps) <= SPACING_RTOL * np.maximum(np.abs(rs), np.abs(ps))):
        raise UserInputError(
            f"case {case}: prediction spacing {_fmt_tuple(ps)} differs from reference spacing {_fmt_tuple(rs)} "
            "(x, y, z); resample the prediction onto the reference's grid or fix its header"
        )
