"""LA 2018 (Left Atrium) data into an nnU-Net v2 raw dataset with an ``imagesUnlabeled/`` folder.

Two input layouts are recognised, with case folders at any depth under the input folder:

- the challenge's own: ``<ID>/lgemri.nrrd`` (LGE-MRI) and ``<ID>/laendo.nrrd`` (cavity, 0/255), geometry from
  the NRRD header;
- UA-MT's (read by UA-MT, SASSNet and most semi-supervised LA papers): ``<ID>/mri_norm2.h5`` with ``image``
  (axes x, y, z) and ``label`` (0/1); the spacing is not stored (0.625 mm, or ``--spacing``).

The conversion runs in two passes: the first reads only headers and decides every case's destination, so
that most mistakes are reported before anything is written; the second reads the voxels, checks the label
values and writes into a hidden temporary folder inside ``nnUNet_raw`` that is renamed into place only when
every case has been written. A failed run therefore leaves ``nnUNet_raw`` as it found it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_sassnet.errors import UserInputError, run_cli

__all__ = ["convert_la2018", "main", "build_parser", "UAMT_SPACING_MM", "load_uamt_split"]

H5_FILE = "mri_norm2.h5"
NRRD_IMAGE = "lgemri.nrrd"
NRRD_LABEL = "laendo.nrrd"
UAMT_SPACING_MM = 0.625
FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "left_atrium": 1}
SPLIT_KEYS = ("labeled", "unlabeled", "test")
_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MAX_WORKERS = 8  # cases converted at once; each holds one scan in memory


@dataclass
class _Case:
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


@dataclass
class _Plan:
    """Where each case goes, and what the summary reports."""

    labeled: list[_Case]
    unlabeled: list[_Case]
    test: list[_Case]
    skipped: list[_Case]  # present in the input but not named by a split JSON
    rule: str
    missing: dict[str, list[str]]  # list name -> its IDs absent from the input


def load_uamt_split() -> tuple[list[str], list[str]]:
    """UA-MT's split as shipped with the package: (train.list IDs in order, test.list IDs)."""
    def read(name: str) -> list[str]:
        text = (_DATA_DIR / name).read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]
    return read("uamt_train.list"), read("uamt_test.list")


def _short(exc: BaseException) -> str:
    """A one-line description of a library error (ITK and HDF5 messages span several lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------------------- discovery

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
        raise UserInputError(f"{path}: unreadable NRRD file ({_short(e)}); replace it with an intact copy of "
                             f"this case") from None
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise UserInputError(f"{path}: expected a 3D single-channel image, found {reader.GetDimension()}D with "
                             f"{reader.GetNumberOfComponents()} component(s); replace it with the challenge's file")
    return reader


def _probe_nrrd(folder: Path) -> _Case:
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
    return _Case(folder.name, folder, "nrrd", image_path, label_path, size,
                 tuple(float(s) for s in info.GetSpacing()))


def _probe_h5(folder: Path, spacing: float) -> _Case:
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
        raise UserInputError(f"{path}: unreadable or truncated HDF5 file ({_short(e)}); replace it with an "
                             f"intact copy of this case") from None
    if len(shape) != 3:
        raise UserInputError(f"{path}: 'image' has shape {shape}, expected 3D (x, y, z); replace it with UA-MT's "
                             f"file")
    if dtype.kind not in "uif":
        raise UserInputError(f"{path}: 'image' has dtype {dtype}, expected a numeric type; replace it with "
                             f"UA-MT's file")
    if label_shape is not None and label_shape != shape:
        raise UserInputError(f"{path}: 'label' shape {label_shape} differs from 'image' shape {shape}; replace "
                             f"the file with one whose image and label match")
    return _Case(folder.name, folder, "h5", path, path if label_shape is not None else None, shape,
                 (spacing,) * 3)


def _probe_cases(input_dir: Path, spacing: float | None) -> list[_Case]:
    folders = _find_case_folders(input_dir)
    layout = folders[0][1]
    if layout == "nrrd" and spacing is not None:
        raise UserInputError(f"{input_dir}: --spacing applies to the UA-MT h5 layout only; the challenge's NRRD "
                             f"headers carry the spacing. Leave --spacing out")
    cases = [_probe_h5(folder, UAMT_SPACING_MM if spacing is None else spacing) if kind == "h5"
             else _probe_nrrd(folder) for folder, kind in folders]
    first_seen: dict[str, _Case] = {}
    for case in cases:
        if case.case_id in first_seen:
            raise UserInputError(f"case {case.case_id} found twice: {first_seen[case.case_id].folder} and "
                                 f"{case.folder}; keep one of them")
        first_seen[case.case_id] = case
    return cases


# ---------------------------------------------------------------------------------------------- split

def _load_split_json(path: Path) -> dict[str, list[str]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserInputError(f"{path}: cannot read the split file ({_short(e)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: not valid JSON ({_short(e)}); expected {{\"labeled\": [...], "
                             f"\"unlabeled\": [...], \"test\": [...]}}") from None
    if not isinstance(content, dict):
        raise UserInputError(f"{path}: expected a JSON object {{\"labeled\": [...], \"unlabeled\": [...], "
                             f"\"test\": [...]}}, found {type(content).__name__}")
    unknown = sorted(set(content) - set(SPLIT_KEYS))
    if unknown:
        raise UserInputError(f"{path}: unknown key(s) {unknown}; the split file has the keys "
                             f"{list(SPLIT_KEYS)} only")
    if "labeled" not in content:
        raise UserInputError(f"{path}: no \"labeled\" list; nnU-Net needs labeled training cases")
    split: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for key in SPLIT_KEYS:
        ids = content.get(key, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise UserInputError(f"{path}: \"{key}\" must be a list of case IDs (strings)")
        for case_id in ids:
            if case_id in owner:
                raise UserInputError(f"{path}: case {case_id} is listed twice (in \"{owner[case_id]}\" and "
                                     f"\"{key}\"); list each case once")
            owner[case_id] = key
        split[key] = ids
    if not split["labeled"]:
        raise UserInputError(f"{path}: the \"labeled\" list is empty; nnU-Net needs labeled training cases")
    return split


def _plan_uamt(cases: list[_Case], num_labeled: int, input_dir: Path) -> _Plan:
    train_ids, test_ids = load_uamt_split()
    by_id = {c.case_id: c for c in cases}
    listed = set(train_ids) | set(test_ids)
    train_present = [by_id[i] for i in train_ids if i in by_id]
    test_present = [by_id[i] for i in test_ids if i in by_id]
    if num_labeled < 1:
        raise UserInputError(f"--num-labeled {num_labeled}: must be at least 1 (nnU-Net needs labeled cases)")
    if num_labeled > len(train_present):
        raise UserInputError(f"--num-labeled {num_labeled}, but only {len(train_present)} of the {len(train_ids)} "
                             f"cases of UA-MT's train.list are under {input_dir}; pass --num-labeled "
                             f"{max(len(train_present), 1)} or fewer, or use --split none / a split JSON")
    others = [c for c in cases if c.case_id not in listed]
    return _Plan(
        labeled=train_present[:num_labeled], unlabeled=train_present[num_labeled:],
        test=test_present + others, skipped=[],
        rule=f"uamt: labeled = the first {num_labeled} of UA-MT's train.list among the cases present, "
             f"unlabeled = the other train.list cases, test = test.list and unlisted cases",
        missing={"train.list": [i for i in train_ids if i not in by_id],
                 "test.list": [i for i in test_ids if i not in by_id]})


def _plan_json(cases: list[_Case], path: Path, input_dir: Path) -> _Plan:
    split = _load_split_json(path)
    by_id = {c.case_id: c for c in cases}
    absent = [i for key in SPLIT_KEYS for i in split[key] if i not in by_id]
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise UserInputError(f"{path}: case(s) {', '.join(absent[:5])}{more} are not under {input_dir}; "
                             f"remove them from the split file or add their case folders")
    named = {i for key in SPLIT_KEYS for i in split[key]}
    return _Plan(
        labeled=[by_id[i] for i in split["labeled"]], unlabeled=[by_id[i] for i in split["unlabeled"]],
        test=[by_id[i] for i in split["test"]], skipped=[c for c in cases if c.case_id not in named],
        rule=f"split file {path}", missing={})


def _plan(cases: list[_Case], split: str, num_labeled: int, input_dir: Path) -> _Plan:
    if split == "uamt":
        plan = _plan_uamt(cases, num_labeled, input_dir)
    elif split == "none":
        plan = _Plan(labeled=[c for c in cases if c.has_label], unlabeled=[c for c in cases if not c.has_label],
                     test=[], skipped=[], rule="none: cases with a label are labeled, the others unlabeled",
                     missing={})
        if not plan.labeled:
            raise UserInputError(f"{input_dir}: no case has a label ({NRRD_LABEL} or 'label' in {H5_FILE}); "
                                 f"nnU-Net needs labeled training cases")
    else:
        plan = _plan_json(cases, Path(split), input_dir)
    for case in plan.labeled:
        if not case.has_label:
            where = case.folder / NRRD_LABEL if case.layout == "nrrd" else f"'label' in {case.image_path}"
            # with --split none only cases with a label are labeled, so this is uamt or a split file
            fix = ("choose the labeled cases with --split FILE.json"
                   if split == "uamt" else "move it to \"unlabeled\" in the split file")
            raise UserInputError(f"case {case.case_id} ({case.folder}) must be labeled but has no label (no "
                                 f"{where}); add its label, or {fix}")
    return plan


# ---------------------------------------------------------------------------------------------- reading

def _read_h5(case: _Case, with_label: bool) -> tuple[sitk.Image, sitk.Image | None]:
    try:
        with h5py.File(case.image_path, "r") as f:
            image = f["image"][()]
            label = f["label"][()] if with_label else None
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise UserInputError(f"{case.image_path}: unreadable or truncated HDF5 file ({_short(e)}); replace it "
                             f"with an intact copy of this case") from None
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise UserInputError(f"{case.image_path}: 'image' holds NaN or infinite values; replace the file")
    # h5 axes are (x, y, z); SimpleITK's arrays are (z, y, x): the transpose keeps x as the image's first axis
    image_itk = _with_h5_geometry(sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0))), case)
    if label is None:
        return image_itk, None
    valid = (label == 0) | (label == 1)
    if not valid.all():
        found = np.unique(label)
        raise UserInputError(f"{case.image_path}: 'label' holds values {_list_values(found)}, expected 0 and 1 "
                             f"only; fix the label (UA-MT's labels are 0/1)")
    label_itk = sitk.GetImageFromArray(np.ascontiguousarray(label.transpose(2, 1, 0)).astype(np.uint8))
    return image_itk, _with_h5_geometry(label_itk, case)


def _with_h5_geometry(image: sitk.Image, case: _Case) -> sitk.Image:
    image.SetSpacing(case.spacing)
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _read_nrrd(case: _Case, with_label: bool) -> tuple[sitk.Image, sitk.Image | None]:
    def read(path: Path) -> sitk.Image:
        try:
            return sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise UserInputError(f"{path}: unreadable or truncated NRRD file ({_short(e)}); replace it with an "
                                 f"intact copy of this case") from None

    image = read(case.image_path)
    label_path = case.label_path
    if not with_label or label_path is None:
        return image, None
    mask = sitk.GetArrayFromImage(read(label_path))
    valid = (mask == 0) | (mask == 255)
    if not valid.all():
        raise UserInputError(f"{label_path}: holds values {_list_values(np.unique(mask))}, expected 0 and "
                             f"255 only (the challenge's cavity mask); fix or replace the label")
    label = sitk.GetImageFromArray((mask == 255).astype(np.uint8))
    # nnU-Net requires identical geometry for image and label; the challenge writes both from the same grid
    label.CopyInformation(image)
    return image, label


def _list_values(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:8].tolist())
    return f"{{{shown}{', ...' if len(values) > 8 else ''}}}"


# ---------------------------------------------------------------------------------------------- writing

def _write(image: sitk.Image, path: Path) -> None:
    try:
        sitk.WriteImage(image, str(path), True)
    except RuntimeError as e:
        raise UserInputError(f"{path}: cannot write ({_short(e)}); check free disk space and permissions") from None


def _convert_case(case: _Case, folder: Path, image_dir: str, label_dir: str | None) -> None:
    reader = _read_h5 if case.layout == "h5" else _read_nrrd
    image, label = reader(case, label_dir is not None)
    _write(image, folder / image_dir / f"{case.case_id}_0000{FILE_ENDING}")
    if label is not None and label_dir is not None:
        _write(label, folder / label_dir / f"{case.case_id}{FILE_ENDING}")


def _write_cases(plan: _Plan, folder: Path, progress: bool) -> None:
    jobs: list[tuple[_Case, str, str | None]] = (
        [(c, "imagesTr", "labelsTr") for c in plan.labeled]
        + [(c, "imagesUnlabeled", None) for c in plan.unlabeled]
        + [(c, "imagesTs", "labelsTs" if c.has_label else None) for c in plan.test])
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        (folder / sub).mkdir()
    # SimpleITK releases the GIL while reading and gzip-writing, the bulk of the time for full-size scans
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1, len(jobs)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_convert_case, case, folder, image_dir, label_dir)
                   for case, image_dir, label_dir in jobs]
        try:
            # in submission order, so that with several bad cases the error names the first one
            for future in tqdm(futures, desc="Writing", unit="case", disable=not progress):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _dataset_json(name: str, plan: _Plan, layout: str, split: str) -> dict:
    return {
        "name": name,
        "description": "Left atrium in LGE-MRI (2018 Atrial Segmentation Challenge), converted by "
                       "nnunet_sassnet_convert_la2018; unlabeled training scans are in imagesUnlabeled",
        "reference": "Xiong et al., Medical Image Analysis 2021 (2018 Atrial Segmentation Challenge)",
        "channel_names": {"0": "MRI"},
        "labels": dict(LABELS),
        "numTraining": len(plan.labeled),
        "file_ending": FILE_ENDING,
        "numUnlabeled": len(plan.unlabeled),
        "numTest": len(plan.test),
        "conversion": {"source_layout": "UA-MT h5" if layout == "h5" else "challenge nrrd",
                       "split": split, "rule": plan.rule},
    }


def _move_into_place(tmp: Path, final: Path, existing: list[Path]) -> None:
    """Rename the finished folder into place; replaced datasets are parked first so a failure restores them."""
    parked: list[tuple[Path, Path]] = []
    try:
        for old in existing:
            spot = old.with_name(f".{old.name}.replaced-{uuid.uuid4().hex[:8]}")
            old.rename(spot)
            parked.append((old, spot))
        tmp.rename(final)
    except OSError as e:
        for old, spot in reversed(parked):
            spot.rename(old)
        raise UserInputError(f"{final}: cannot move the converted dataset into place ({_short(e)})") from None
    for _, spot in parked:
        shutil.rmtree(spot, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- summary

def _summary(plan: _Plan, cases: list[_Case], final: Path, input_dir: Path, spacing_given: bool) -> str:
    layout = cases[0].layout
    n_test_labels = sum(c.has_label for c in plan.test)
    lines = [
        f"LA 2018 -> {final}",
        f"  input: {input_dir} ({len(cases)} cases, "
        f"{'UA-MT h5 layout' if layout == 'h5' else 'challenge NRRD layout'})",
        f"  split {plan.rule}",
        f"  imagesTr + labelsTr : {len(plan.labeled)}",
        f"  imagesUnlabeled     : {len(plan.unlabeled)}",
        f"  imagesTs            : {len(plan.test)} ({n_test_labels} with labelsTs)",
    ]
    if plan.skipped:
        lines.append(f"  not in the split file, not converted: {len(plan.skipped)} "
                     f"({_examples([c.case_id for c in plan.skipped])})")
    for list_name, ids in plan.missing.items():
        lines.append(f"  {list_name} entries missing from the input: {len(ids)}"
                     + (f" ({_examples(ids)})" if ids else ""))
    spacings = Counter(tuple(round(s, 4) for s in c.spacing) for c in cases)
    where_from = ("--spacing" if spacing_given else "UA-MT's default, not stored in the files") if layout == "h5" \
        else "NRRD headers"
    for spacing, count in spacings.most_common():
        lines.append(f"  spacing (x, y, z) mm: {' x '.join(f'{s:g}' for s in spacing)} ({count} cases; {where_from})")
    return "\n".join(lines)


def _examples(ids: Sequence[str], n: int = 3) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


# ---------------------------------------------------------------------------------------------- entry points

def convert_la2018(input_dir: str, dataset_id: int, name: str = "LA2018", num_labeled: int = 16,
                   split: str = "uamt", spacing: float | None = None, overwrite: bool = False,
                   raw_dir: str | None = None, progress: bool = True) -> str:
    """Convert LA 2018 data (challenge NRRD or UA-MT h5 layout) into ``<raw_dir>/DatasetXXX_<name>``.

    ``split`` is ``"uamt"`` (UA-MT's lists; the first ``num_labeled`` training cases present are labeled),
    ``"none"`` (every case with a label is labeled) or the path of a JSON file
    ``{"labeled": [...], "unlabeled": [...], "test": [...]}``. ``raw_dir`` defaults to ``$nnUNet_raw``.
    Raises :class:`UserInputError` for bad input, in which case nothing is written. Returns the dataset folder.
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise UserInputError(f"dataset ID {dataset_id!r}: must be an integer from 1 to 999 (nnU-Net's DatasetXXX)")
    if not _NAME_PATTERN.match(name):
        raise UserInputError(f"dataset name {name!r}: use letters, digits, '_' and '-' only (it becomes "
                             f"Dataset{dataset_id:03d}_<name>)")
    if spacing is not None and not (np.isfinite(spacing) and spacing > 0):
        raise UserInputError(f"--spacing {spacing}: must be a positive number of millimetres")
    if split not in ("uamt", "none") and not Path(split).is_file():
        raise UserInputError(f"--split {split}: not 'uamt', 'none' or an existing JSON file; pass one of them")
    raw = raw_dir if raw_dir is not None else os.environ.get("nnUNet_raw")
    if not raw:
        raise UserInputError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's "
                             "set_environment_variables.md) and run again")
    raw_path = Path(raw).expanduser().resolve()
    if raw_path.exists() and not raw_path.is_dir():
        raise UserInputError(f"{raw_path}: nnUNet_raw is a file, not a folder; point nnUNet_raw at a folder")
    final = raw_path / f"Dataset{dataset_id:03d}_{name}"
    existing = sorted(p for p in raw_path.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir()) \
        if raw_path.is_dir() else []
    if existing and not overwrite:
        raise UserInputError(f"{existing[0]}: a dataset with ID {dataset_id} already exists; pass --overwrite to "
                             f"replace it, or choose another -d")
    source = Path(input_dir).expanduser().resolve()
    for old in existing:
        if source == old.resolve() or old.resolve() in source.parents:
            raise UserInputError(f"{source}: the input is inside {old}, which --overwrite would delete; move the "
                                 f"input elsewhere first")

    cases = _probe_cases(source, spacing)
    plan = _plan(cases, split, num_labeled, source)
    print(_summary(plan, cases, final, source, spacing is not None), flush=True)

    created_raw = not raw_path.exists()
    raw_path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=raw_path))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the dataset's permissions
        _write_cases(plan, tmp, progress)
        with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
            json.dump(_dataset_json(name, plan, cases[0].layout, split), f, indent=4)
        _move_into_place(tmp, final, existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_raw:
            try:
                raw_path.rmdir()
            except OSError:
                pass
        raise
    print(f"Done: {final}", flush=True)
    return str(final)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``nnunet_sassnet_convert_la2018``."""
    parser = argparse.ArgumentParser(
        prog="nnunet_sassnet_convert_la2018",
        description="Convert the LA 2018 left-atrium data (challenge <ID>/lgemri.nrrd + laendo.nrrd, or UA-MT's "
                    "<ID>/mri_norm2.h5) into $nnUNet_raw/DatasetXXX_<name> with imagesTr/labelsTr (labeled), "
                    "imagesUnlabeled (unlabeled training scans) and imagesTs/labelsTs (test).")
    parser.add_argument("-i", dest="input_dir", required=True, help="folder holding the case folders (any depth)")
    parser.add_argument("-d", dest="dataset_id", type=int, required=True, help="dataset ID, e.g. 601")
    parser.add_argument("-n", dest="name", default="LA2018", help="dataset name (default: LA2018)")
    parser.add_argument("--num-labeled", type=int, default=None,
                        help="with --split uamt: the first N train.list cases present are labeled (default: 16)")
    parser.add_argument("--split", default="uamt",
                        help="'uamt' (UA-MT's lists, default), 'none' (every case with a label is labeled) or a "
                             "JSON file {\"labeled\": [...], \"unlabeled\": [...], \"test\": [...]}")
    parser.add_argument("--spacing", type=float, default=None,
                        help=f"isotropic spacing in mm of UA-MT h5 scans (default: {UAMT_SPACING_MM}; 1.25 for "
                             f"the half-resolution copy)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this ID")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``nnunet_sassnet_convert_la2018``: returns 0, or 2 after a one-line ``error:`` for bad input."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.num_labeled is not None and args.split != "uamt":
            chosen = "those with a label" if args.split == "none" else "those listed in the file"
            raise UserInputError(f"--num-labeled applies to --split uamt only; with --split {args.split} the "
                                 f"labeled cases are {chosen}. Leave --num-labeled out")
        convert_la2018(args.input_dir, args.dataset_id, name=args.name,
                       num_labeled=16 if args.num_labeled is None else args.num_labeled, split=args.split,
                       spacing=args.spacing, overwrite=args.overwrite)
        return 0

    return run_cli(run)
