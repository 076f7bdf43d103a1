"""What the content checks of preprocessed unlabeled cases cost, at 100 and at 1,000 cases.

Cases are written as nnU-Net writes them (``nnUNetDatasetBlosc2.save_case``: z-scored float32 image, int16 mask,
pickled properties) from real LA scans (UA-MT h5 layout; repeated to reach the count, each case a file of its
own), then timed, page cache warm (the files were just written), as wall-clock time:

* ``records``: SHA-256 of every file and of its sampled blocks, once when a version is written
  (:func:`~nnunet_sassnet.unlabeled.integrity.case_records`);
* ``before training``: sizes, sampled blocks and damage notes (:func:`~nnunet_sassnet.unlabeled.integrity.
  damaged_cases`), at every training start;
* ``whole content``: every case's SHA-256 (:func:`~nnunet_sassnet.unlabeled.integrity.check_case`), what the
  loader spends per augmentation process over a run, one case at a time on its first use.

And, per raw scan (the first one, written as .nii.gz), the check of the NIfTI file before preprocessing
(:func:`~nnunet_sassnet.unlabeled.image_checks.check_nifti_file`) beside SimpleITK's read of the same file.

    python benchmarks/unlabeled_check_cost.py --data ../shared/data/la2018_uamt_lite_1.25mm --counts 100 1000
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
from pathlib import Path

from sdm_speed import time_call as seconds  # median wall-clock seconds of fn() over reps calls


def write_template_cases(data_dir: Path, folder: Path, limit: int) -> list[str]:
    """One nnU-Net case per LA scan under ``data_dir`` (at most ``limit``); returns their names."""
    import h5py
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    names = []
    for i, h5_file in enumerate(sorted(data_dir.rglob("mri_norm2.h5"))[:limit]):
        with h5py.File(h5_file, "r") as f:
            image = np.asarray(f["image"], dtype=np.float32)
        data = ((image - image.mean()) / max(float(image.std()), 1e-8))[None]
        seg = np.where(image > 0, 0, -1).astype(np.int16)[None]
        blocks, chunks = comp_blosc2_params(data.shape, (48, 80, 96), data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, (48, 80, 96), seg.itemsize)
        properties = {"spacing": [1.0] * 3, "shape_before_cropping": image.shape, "class_locations": {1: []}}
        name = f"t{i:03d}"
        nnUNetDatasetBlosc2.save_case(data, seg, properties, str(folder / name), chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        names.append(name)
    return names


def make_cases(templates: Path, names: list[str], folder: Path, count: int) -> list[str]:
    from nnunet_sassnet.unlabeled.cases import CASE_FILE_SUFFIXES

    folder.mkdir()
    cases = [f"un{i:04d}" for i in range(count)]
    for i, case in enumerate(cases):
        for suffix in CASE_FILE_SUFFIXES:
            shutil.copyfile(templates / (names[i % len(names)] + suffix), folder / (case + suffix))
    return cases


def nifti_check_seconds(data_dir: Path, folder: Path, repeats: int) -> str:
    """The NIfTI check and SimpleITK's read of the first scan, written as .nii.gz."""
    import h5py
    import numpy as np
    import SimpleITK as sitk

    from nnunet_sassnet.unlabeled.image_checks import check_nifti_file

    with h5py.File(sorted(data_dir.rglob("mri_norm2.h5"))[0], "r") as f:
        image = np.asarray(f["image"], dtype=np.float32)
    path = str(folder / "scan_0000.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(image), path)
    check = seconds(lambda: check_nifti_file(path), repeats)
    read = seconds(lambda: sitk.GetArrayFromImage(sitk.ReadImage(path)), repeats)
    return f"  raw scan {image.shape} float32 .nii.gz: NIfTI check {check:.3f} s, SimpleITK's read {read:.3f} s"


def main() -> None:
    from nnunet_sassnet.unlabeled.integrity import case_records, check_case, damaged_cases

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of LA scans in the UA-MT h5 layout")
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--templates", type=int, default=20, help="distinct scans to repeat (default 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the cases (default: a temporary "
                                                                 "folder, removed afterwards)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unlabeled_check_cost_", dir=args.workdir))
    try:
        templates = work / "templates"
        templates.mkdir()
        names = write_template_cases(args.data, templates, args.templates)
        if not names:
            raise SystemExit(f"no mri_norm2.h5 under {args.data}")
        case_mb = sum(p.stat().st_size for p in templates.iterdir()) / len(names) / 1024 ** 2
        print(f"{datetime.date.today()} {platform.node()} ({os.cpu_count()} CPUs), {args.data.name}: "
              f"{len(names)} scans repeated, {case_mb:.2f} MB per case (3 files); wall-clock, median of "
              f"{args.repeats}, page cache warm")
        print(nifti_check_seconds(args.data, work, args.repeats))
        for count in args.counts:
            folder = work / f"cases_{count}"
            cases = make_cases(templates, names, folder, count)
            records = case_records(str(folder), cases)
            timings = {
                "records (once per version)": seconds(lambda: case_records(str(folder), cases), args.repeats),
                "before training (sizes, sampled blocks)": seconds(
                    lambda: damaged_cases(str(folder), cases, records), args.repeats),
                "whole content (loader, per process)": seconds(
                    lambda: [check_case(str(folder), case, records) for case in cases], args.repeats),
            }
            for what, s in timings.items():
                print(f"  {count:>5} cases  {what:<42} {s:8.3f} s  ({1000 * s / count:.3f} ms per case)")
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
