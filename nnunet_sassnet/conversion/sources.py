"""The two LA 2018 input layouts: finding the case folders, reading their headers, then their voxels.

- the challenge's own: ``<ID>/lgemri.nrrd`` (LGE-MRI) and ``<ID>/laendo.nrrd`` (cavity, 0/255), geometry from
  the NRRD header;
- UA-MT's (read by UA-MT, SASSNet and most semi-supervised LA papers): ``<ID>/mri_norm2.h5`` with ``image``
  (axes x, y, z) and ``label`` (0/1); the spacing is not stored (0.625 mm, or ``--spacing``).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import SimpleITK as sitk

from nnunet_sassnet.errors import UserInputError, short_reason

__all__ = ["H5_FILE", "NRRD_IMAGE", "NRRD_LABEL", "UAMT_SPACING_MM", "Case", "probe_cases", "read_case"]

H5_FILE = "mri_norm2.h5"
NRRD_IMAGE = "lgemri.nrrd"
NRRD_LABEL = "laendo.nrrd"
UAMT_SPACING_MM = 0.625


@dataclass
class Case:
    """One input case as seen from its headers (the voxels are read only while writing)."""

    case_id: str
    folder: Path
    layout: str  # "h5" or "nrrd"
    image_path: Path
    label_path: Path | None  # for h5 the same file as the image, when it holds a 'label' dataset
    size: tuple[int, ...]  # (x, y, z), as SimpleITK's GetSize
    spacing: tuple[float, ...] = field(default=(UAMT_SPACING_MM,) * 3)

    @property
    def has_label(self) -> bool:
        return self.label_path is not None


# ---------------------------------------------------------------------------------------------- headers

def _find_case_folders(input_dir: Path) -> list[tuple[Path, str]]:
    """(case folder, layout) for every folder holding a case, at any depth, following symlinked folders."""
    if not input_dir.exists():
        raise UserInputError(f"{input_dir}: input folder not found; pass -i the folder that holds the case "
                             f"folders (<ID>/lgemri.nrrd or <ID>/{H5_FILE})")
    if not input_dir.is_dir():
        raise UserInputError(f"{input_dir}: not a folder; pass -i the folder that holds the case folders "
                             f"(<ID>/lgemri.nrrd or <ID>/{H5_FILE}), not a file")
    found: list[tuple[Path, str]] = []
    visited: set[str] = set()
    for root, dirs, files in os.walk(input_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a symlink loop, or the same folder linked twice
            dirs[:] = []
            continue
        visited.add(real)
        dirs.sort()
        names = set(files)
        has_h5 = H5_FILE in names
        has_nrrd = NRRD_IMAGE in names or NRRD_LABEL in names
        if has_h5 and has_nrrd:
            raise UserInputError(f"{root}: holds both {H5_FILE} and {NRRD_IMAGE}/{NRRD_LABEL}; convert one "
                                 f"layout at a time (point -i at a folder with only one of them)")
        if has_h5:
            found.append((Path(root), "h5"))
        elif has_nrrd:
            found.append((Path(root), "nrrd"))
    if not found:
        raise UserInputError(f"{input_dir}: no LA 2018 cases found (no <ID>/{NRRD_IMAGE} + {NRRD_LABEL} and no "
                             f"<ID>/{H5_FILE} at any depth); point -i at the challenge's or UA-MT's data folder")
    layouts = Counter(layout for _, layout in found)
    if len(layouts) > 1:
        example_h5 = next(f for f, layout in found if layout == "h5")
        example_nrrd = next(f for f, layout in found if layout == "nrrd")
        raise UserInputError(f"{input_dir}: mixes the UA-MT layout (cases: {layouts['h5']}, e.g. {example_h5}) "
                             f"and the challenge layout (cases: {layouts['nrrd']}, e.g. {example_nrrd}); convert "
                             f"one layout at a time")
    return found


def _read_nrrd_info(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise UserInputError(f"{path}: unreadable NRRD file ({short_reason(e)}); replace it with an intact copy "
                             f"of this case") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise UserInputError(f"{path}: expected a 3D single-channel image, found {reader.GetDimension()}D with "
                             f"{reader.GetNumberOfComponents()} component(s); replace it with the challenge's file")
    return reader


def _probe_nrrd(folder: Path) -> Case:
    image_path, label_path = folder / NRRD_IMAGE, folder / NRRD_LABEL
    if not image_path.is_file():
        raise UserInputError(f"{folder}: has {NRRD_LABEL} but no {NRRD_IMAGE}; add the image or remove the case "
                             f"folder")
    info = _read_nrrd_info(image_path)
    size = tuple(int(s) for s in info.GetSize())
    if label_path.is_file():
        label_size = tuple(int(s) for s in _read_nrrd_info(label_path).GetSize())
        if label_size != size:
            raise UserInputError(f"{label_path}: label size {label_size} differs from the image's {size} "
                                 f"({image_path}); replace the label with the one made for this image")
    else:
        label_path = None
    return Case(folder.name, folder, "nrrd", image_path, label_path, size,
                tuple(float(s) for s in info.GetSpacing()))


def _unreadable_h5(path: Path, e: BaseException) -> UserInputError:
    return UserInputError(f"{path}: unreadable or truncated HDF5 file ({short_reason(e)}); replace it with an "
                          f"intact copy of this case")


def _probe_h5(folder: Path, spacing: float) -> Case:
    path = folder / H5_FILE
    try:
        with h5py.File(path, "r") as f:
            image, label = f.get("image"), f.get("label")
            if not isinstance(image, h5py.Dataset):
                raise UserInputError(f"{path}: no 'image' dataset (found {sorted(f.keys())}); expected UA-MT's "
                                     f"{H5_FILE} with 'image' and 'label'")
            shape, dtype = tuple(image.shape), image.dtype
            label_shape = tuple(label.shape) if isinstance(label, h5py.Dataset) else None
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise _unreadable_h5(path, e) from None
    if len(shape) != 3:
        raise UserInputError(f"{path}: 'image' has shape {shape}, expected 3D (x, y, z); replace it with UA-MT's "
                             f"file")
    if dtype.kind not in "uif":
        raise UserInputError(f"{path}: 'image' has dtype {dtype}, expected a numeric type; replace it with "
                             f"UA-MT's file")
    if label_shape is not None and label_shape != shape:
        raise UserInputError(f"{path}: 'label' shape {label_shape} differs from 'image' shape {shape}; replace "
                             f"the file with one whose image and label match")
    return Case(folder.name, folder, "h5", path, path if label_shape is not None else None, shape, (spacing,) * 3)


def probe_cases(input_dir: Path, spacing: float | None) -> list[Case]:
    """Every case under ``input_dir`` (one layout), from its headers; ``spacing`` is for the h5 layout only.

    Raises:
        UserInputError: no case, mixed layouts, a case found twice, an unreadable or inconsistent header.
    """
    folders = _find_case_folders(input_dir)
    layout = folders[0][1]
    if layout == "nrrd" and spacing is not None:
        raise UserInputError(f"{input_dir}: --spacing applies to the UA-MT h5 layout only; the challenge's NRRD "
                             f"headers carry the spacing. Leave --spacing out")
    cases = [_probe_h5(folder, UAMT_SPACING_MM if spacing is None else spacing) if kind == "h5"
             else _probe_nrrd(folder) for folder, kind in folders]
    first_seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in first_seen:
            raise UserInputError(f"case {case.case_id} found twice: {first_seen[case.case_id].folder} and "
                                 f"{case.folder}; keep one of them")
        first_seen[case.case_id] = case
    return cases


# ---------------------------------------------------------------------------------------------- voxels

def _list_values(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:8].tolist())
    return f"{{{shown}{', ...' if len(values) > 8 else ''}}}"


def _with_h5_geometry(image: sitk.Image, case: Case) -> sitk.Image:
    image.SetSpacing(case.spacing)
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _read_h5(case: Case, with_label: bool) -> tuple[sitk.Image, sitk.Image | None]:
    try:
        with h5py.File(case.image_path, "r") as f:
            image = f["image"][()]
            label = f["label"][()] if with_label else None
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise _unreadable_h5(case.image_path, e) from None
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise UserInputError(f"{case.image_path}: 'image' holds NaN or infinite values; replace the file")
    # h5 axes are (x, y, z); SimpleITK's arrays are (z, y, x): the transpose keeps x as the image's first axis
    image_itk = _with_h5_geometry(sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0))), case)
    if label is None:
        return image_itk, None
    valid = (label == 0) | (label == 1)
    if not valid.all():
        raise UserInputError(f"{case.image_path}: 'label' holds values {_list_values(np.unique(label))}, expected "
                             f"0 and 1 only; fix the label (UA-MT's labels are 0/1)")
    label_itk = sitk.GetImageFromArray(np.ascontiguousarray(label.transpose(2, 1, 0)).astype(np.uint8))
    return image_itk, _with_h5_geometry(label_itk, case)


def _read_nrrd_file(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise UserInputError(f"{path}: unreadable or truncated NRRD file ({short_reason(e)}); replace it with an "
                             f"intact copy of this case") from None


def _read_nrrd(case: Case, with_label: bool) -> tuple[sitk.Image, sitk.Image | None]:
    image = _read_nrrd_file(case.image_path)
    label_path = case.label_path
    if not with_label or label_path is None:
        return image, None
    mask = sitk.GetArrayFromImage(_read_nrrd_file(label_path))
    valid = (mask == 0) | (mask == 255)
    if not valid.all():
        raise UserInputError(f"{label_path}: holds values {_list_values(np.unique(mask))}, expected 0 and "
                             f"255 only (the challenge's cavity mask); fix or replace the label")
    label = sitk.GetImageFromArray((mask == 255).astype(np.uint8))
    # nnU-Net requires identical geometry for image and label; the challenge writes both from the same grid
    label.CopyInformation(image)
    return image, label


def read_case(case: Case, with_label: bool) -> tuple[sitk.Image, sitk.Image | None]:
    """(image, label as 0/1 uint8 or None) of a case with its geometry; the image keeps the source dtype.

    Raises:
        UserInputError: the file is unreadable or truncated, the image holds NaN, or the label other values
            than the layout's two.
    """
    return (_read_h5 if case.layout == "h5" else _read_nrrd)(case, with_label)
