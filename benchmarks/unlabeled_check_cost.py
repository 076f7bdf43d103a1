"""What the content checks of preprocessed unlabeled cases cost, at 100 and at 1,000 cases.

Cases are written as nnU-Net writes them (``nnUNetDatasetBlosc2.save_case``: z-scored float32 image, int16 mask,
pickled properties) from real LA scans (UA-MT h5 layout; repeated to reach the count, each case a file of its
own), then timed, page cache warm (the files were just written), as wall-clock time:

* ``records``: SHA-256 of every file and of its sampled blocks, once when a version is written
  (:func:`~nnunet_sassnet.unlabeled.integrity.case_records`);
* ``before training``: sizes, sampled blocks and damage notes (:func:`~nnunet_sassnet.unlabeled.integrity.
  damaged_cases`), at every training start;
* ``whole content``: every case's SHA-256 (:func:`~nnunet_sassnet.unlabeled.integrity.check_case`), what the
  loader spends on one read of every case.

The raw scans' fingerprints (``--raw-scans N``: N raw .nii.gz files, copies of the LA scans, each a file of its
own): the unlabeled stamp follows each file's SHA-256, computed once per version of the file
(:mod:`~nnunet_sassnet.unlabeled.raw_fingerprints`): the first time (every file read and hashed) and at every later
start (a stat per file and the cache file read), and the voxel hash of one scan, which finding labeled copies
computes once for a file whose grid matches a labeled case's.

Per read while training (``--per-read``, the 0.625 mm LA plan: the UA-MT h5 scans, 0.625 mm, as cases; patch
96 x 128 x 192, batch 2, nnU-Net's training augmentation): the loader checks each case it draws
(:class:`~nnunet_sassnet.unlabeled.checked_loader.CheckedDataLoader`); its check of one batch's cases beside the
time of making one augmented batch, in one run, and their ratio.

And, per raw scan (the first one, written as .nii.gz), the check of the NIfTI file before preprocessing
(:func:`~nnunet_sassnet.unlabeled.image_checks.check_nifti_file`) beside SimpleITK's read of the same file.

    python benchmarks/unlabeled_check_cost.py --data ../shared/data/la2018_uamt_lite_1.25mm --counts 100 1000
    python benchmarks/unlabeled_check_cost.py --data ../shared/data/la2018_uamt_h5 --counts --per-read 10 \
        --json docs/cpu_runs/DATE_unlabeled_check_cost.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdm_speed import time_call as seconds  # median wall-clock seconds of fn() over reps calls


def write_template_cases(data_dir: Path, folder: Path, limit: int, patch=(48, 80, 96), transpose=(0, 1, 2)
                         ) -> list[str]:
    """One nnU-Net case per LA scan under ``data_dir`` (at most ``limit``), its axes in ``transpose`` order, stored
    in blosc2 chunks for ``patch``; returns their names."""
    import h5py
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    names = []
    for i, h5_file in enumerate(sorted(data_dir.rglob("mri_norm2.h5"))[:limit]):
        with h5py.File(h5_file, "r") as f:
            image = np.asarray(f["image"], dtype=np.float32).transpose(transpose)
        data = ((image - image.mean()) / max(float(image.std()), 1e-8))[None]
        seg = np.where(image > 0, 0, -1).astype(np.int16)[None]
        blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
        blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
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


#: nnU-Net's 3d_fullres plan for LA at its native 0.625 mm (docs/benchmarks.md); the UA-MT scans are (x, y, z)
LA_0625_PATCH = (96, 128, 192)
LA_0625_TRANSPOSE = (2, 1, 0)


def per_read_cost(data_dir: Path, work: Path, batches: int, limit: int) -> dict:
    """The loader's check of a batch's cases against the time of one augmented batch (0.625 mm LA plan)."""
    import numpy as np
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_sassnet.atomic_files import write_json_atomic
    from nnunet_sassnet.unlabeled.cases import STAMP_FILE
    from nnunet_sassnet.unlabeled.checked_loader import CheckedDataLoader, UnlabeledDataset
    from nnunet_sassnet.unlabeled.integrity import case_records, check_case

    folder = work / "la_0625"
    folder.mkdir()
    names = write_template_cases(data_dir, folder, limit, LA_0625_PATCH, LA_0625_TRANSPOSE)
    write_json_atomic(str(folder / STAMP_FILE), {"files": case_records(str(folder), names)})
    rotation = (-30. / 360 * 2. * np.pi, 30. / 360 * 2. * np.pi)  # nnU-Net's for an isotropic 3D patch
    initial = get_patch_size(LA_0625_PATCH, rotation, rotation, rotation, (0.85, 1.25))
    transforms = nnUNetTrainer.get_training_transforms(LA_0625_PATCH, rotation, None, (0, 1, 2), False,
                                                       use_mask_for_norm=[True], foreground_labels=[1])
    loader = CheckedDataLoader(UnlabeledDataset(str(folder)), 2, initial, LA_0625_PATCH,
                               LabelManager({"background": 0, "LA": 1}, None), transforms=transforms)
    checked_keys: list[list[str]] = []
    plain_get_indices = loader.get_indices
    check_seconds = 0.0

    def timed_get_indices():  # the check is done in get_indices: time it apart from the rest of the batch
        nonlocal check_seconds
        t0 = time.perf_counter()
        keys = plain_get_indices()
        check_seconds += time.perf_counter() - t0
        checked_keys.append(list(keys))
        return keys

    loader.get_indices = timed_get_indices
    loader.generate_train_batch()  # warm-up: imports, first allocation
    check_seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.generate_train_batch()
    batch_seconds = (time.perf_counter() - t0) / batches
    records = loader._records
    t0 = time.perf_counter()
    for keys in checked_keys[1:]:
        for key in keys:
            check_case(str(folder), key, records)
    check_only = (time.perf_counter() - t0) / batches
    case_mb = sum(p.stat().st_size for p in folder.glob("t*")) / len(names) / 1024 ** 2
    shutil.rmtree(folder)
    return {"plan": "LA 0.625 mm, 3d_fullres patch 96x128x192, batch 2, nnU-Net's training augmentation",
            "scans": len(names), "case_mb": round(case_mb, 2), "batches": batches,
            "s_per_batch_with_check": round(batch_seconds, 4),
            "check_s_per_batch": round(check_seconds / batches, 4),
            "check_alone_s_per_batch": round(check_only, 4),
            "ratio_check_to_batch": round(check_seconds / batches / batch_seconds, 4)}


def raw_fingerprint_cost(data_dir: Path, work: Path, count: int, limit: int) -> dict:
    """The unlabeled stamp's fingerprints of ``count`` raw scans, without and with the cache."""
    import h5py
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sassnet.unlabeled.raw_fingerprints import FingerprintCache

    folder = work / "raw_scans"
    folder.mkdir()
    templates = []
    for i, h5_file in enumerate(sorted(data_dir.rglob("mri_norm2.h5"))[:limit]):
        with h5py.File(h5_file, "r") as f:
            image = sitk.GetImageFromArray(np.asarray(f["image"], dtype=np.float32).transpose(LA_0625_TRANSPOSE))
        image.SetSpacing((0.625,) * 3)
        path = folder / f"template{i:02d}.nii.gz"
        sitk.WriteImage(image, str(path))
        templates.append(path)
    paths = []
    for i in range(count):
        path = folder / f"scan{i:04d}_0000.nii.gz"
        shutil.copyfile(templates[i % len(templates)], path)
        paths.append(str(path))
    cache_file = str(work / "fingerprints.json")
    t0 = time.perf_counter()
    cache = FingerprintCache(cache_file)
    for path in paths:
        cache.content_sha256(path)
    cache.save()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = FingerprintCache(cache_file)
    for path in paths:
        cache.content_sha256(path)
    later = time.perf_counter() - t0
    t0 = time.perf_counter()
    FingerprintCache(None).voxel_sha256(paths[0], SimpleITKIO())
    voxel = time.perf_counter() - t0
    scan_mb = sum(os.path.getsize(p) for p in templates) / len(templates) / 1024 ** 2
    shutil.rmtree(folder)
    return {"scans": count, "scan_mb": round(scan_mb, 2), "first_s": round(first, 3), "later_s": round(later, 4),
            "first_ms_per_scan": round(1000 * first / count, 3), "later_ms_per_scan": round(1000 * later / count, 4),
            "voxel_hash_s": round(voxel, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of LA scans in the UA-MT h5 layout")
    parser.add_argument("--counts", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--per-read", type=int, default=0, metavar="BATCHES",
                        help="time the check per read against this many augmented batches (0.625 mm LA plan)")
    parser.add_argument("--raw-scans", type=int, default=0, metavar="N",
                        help="time the raw scans' fingerprints (the unlabeled stamp) at N scans")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--templates", type=int, default=20, help="distinct scans to repeat (default 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the cases (default: a temporary "
                                                                 "folder, removed afterwards)")
    args = parser.parse_args()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs",
               "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
               "data": args.data.name, "timing": "wall-clock, page cache warm"}
    print(f"{results['date']} {results['machine']}, {args.data.name}")
    work = Path(tempfile.mkdtemp(prefix="unlabeled_check_cost_", dir=args.workdir))
    try:
        if args.counts:
            results["per_count"] = counts_cost(args, work)
        if args.raw_scans:
            results["raw_fingerprints"] = raw_fingerprint_cost(args.data, work, args.raw_scans, args.templates)
            r = results["raw_fingerprints"]
            print(f"  raw stamp at {r['scans']} scans ({r['scan_mb']} MB each): first time {r['first_s']:.2f} s, "
                  f"later starts {r['later_s']:.3f} s; voxel hash of one scan {r['voxel_hash_s']:.3f} s")
        if args.per_read:
            results["per_read"] = per_read_cost(args.data, work, args.per_read, args.templates)
            r = results["per_read"]
            print(f"  per read ({r['plan']}; {r['scans']} scans, {r['case_mb']} MB per case): check "
                  f"{r['check_s_per_batch']:.4f} s per batch of {r['s_per_batch_with_check']:.3f} s = "
                  f"{100 * r['ratio_check_to_batch']:.1f} %")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def counts_cost(args, work: Path) -> dict:
    """The checks of the stamp's records at each of ``args.counts`` cases, and the NIfTI check of a raw scan."""
    from nnunet_sassnet.unlabeled.integrity import case_records, check_case, damaged_cases

    templates = work / "templates"
    templates.mkdir()
    names = write_template_cases(args.data, templates, args.templates)
    if not names:
        raise SystemExit(f"no mri_norm2.h5 under {args.data}")
    case_mb = sum(p.stat().st_size for p in templates.iterdir()) / len(names) / 1024 ** 2
    print(f"  {len(names)} scans repeated, {case_mb:.2f} MB per case (3 files); median of {args.repeats}")
    line = nifti_check_seconds(args.data, work, args.repeats)
    print(line)
    out = {"scans": len(names), "case_mb": round(case_mb, 2), "nifti_check": line.strip()}
    for count in args.counts:
        folder = work / f"cases_{count}"
        cases = make_cases(templates, names, folder, count)
        records = case_records(str(folder), cases)
        timings = {
            "records (once per version)": seconds(lambda: case_records(str(folder), cases), args.repeats),
            "before training (sizes, sampled blocks)": seconds(
                lambda: damaged_cases(str(folder), cases, records), args.repeats),
            "whole content (every case read once)": seconds(
                lambda: [check_case(str(folder), case, records) for case in cases], args.repeats),
        }
        for what, s in timings.items():
            print(f"  {count:>5} cases  {what:<42} {s:8.3f} s  ({1000 * s / count:.3f} ms per case)")
        out[str(count)] = {what: round(s, 4) for what, s in timings.items()}
        shutil.rmtree(folder)
    return out


if __name__ == "__main__":
    main()
