"""Preprocessing unlabeled scans with the dataset's plans into a versioned folder that runs lease.

One process preprocesses under the writer lock while the others wait; a new version is swapped in whole; damaged
cases are preprocessed again; a full disk leaves the previous version untouched (see the package docstring). Where
``nnUNet_preprocessed`` may not be written (a read-only file system, another user's folders), up-to-date data is
used as it is, as nnU-Net uses its own.
"""
from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from time import sleep
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from nnunet_sassnet.atomic_files import write_json_atomic
from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.unlabeled.cases import (STAMP_FILE, UNLABELED_IMAGES_FOLDER, compute_stamp, list_unlabeled_cases,
                                            unlabeled_data_is_current, unlabeled_preprocessed_folder)
from nnunet_sassnet.unlabeled.image_checks import check_normalised, read_case_images
from nnunet_sassnet.unlabeled.labeled_copies import describe_labeled_copies, find_labeled_copies
from nnunet_sassnet.unlabeled.raw_fingerprints import fingerprint_cache_for
from nnunet_sassnet.unlabeled.integrity import case_records, clear_damage_notes, damaged_cases, load_records
from nnunet_sassnet.versioned_folder import Lease, VersionedFolder

__all__ = ["UnlabeledData", "ensure_preprocessed", "preprocess_unlabeled"]

#: below this much free space, a failed write is taken for a full disk (blosc2 reports one without errno)
_FULL_DISK_BYTES = 16 * 1024 ** 2


def _preprocess_one_case(output_filename_truncated: str, image_files: list[str], plans: dict,
                         configuration_name: str, dataset_json: dict) -> None:
    """Preprocess one unlabeled case with the plan's preprocessor and save it as a blosc2 case."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration_name)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    reader = plans_manager.image_reader_writer_class()
    # nnU-Net's readers return (c, x, y, z), 2D images as (c, 1, y, x); the plans' median shape tells which
    # kind the dataset has
    dataset_is_2d = plans["original_median_shape_after_transp"][0] == 1
    images, image_properties = read_case_images(reader, image_files, dataset_is_2d)
    extremes = [(float(channel.min()), float(channel.max())) for channel in images]
    data, seg, properties = preprocessor.run_case_npy(images, None, image_properties, plans_manager,
                                                      configuration_manager, dataset_json)
    check_normalised(data, image_files, [max(abs(lo), abs(hi)) for lo, hi in extremes],
                     configuration_manager.normalization_schemes, varies=[lo != hi for lo, hi in extremes])
    label_manager = plans_manager.get_label_manager(dataset_json)
    keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    # nnU-Net's loader reads class_locations for every case; an unlabeled case has none
    properties["class_locations"] = {k if not isinstance(k, list) else tuple(k): np.zeros((0, 4), dtype=np.int64)
                                     for k in keys}
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    patch_size = tuple(configuration_manager.patch_size)
    blocks, chunks = comp_blosc2_params(data.shape, patch_size, data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch_size, seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, output_filename_truncated, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)


@dataclass
class UnlabeledData:
    """Preprocessed unlabeled data ready to read: the version folder and, for a training run, its lease (which
    may not be held: see :meth:`Lease.held`)."""

    folder: str
    num_cases: int
    store: VersionedFolder
    lease: Lease | None = None

    def release(self) -> None:
        """End the lease and delete the versions that no run uses any more (if no one is writing just now)."""
        if self.lease is None:
            return
        self.lease.release()
        self.lease = None
        if not self.store.writable():
            return
        with self.store.writer_lock(blocking=False) as locked:
            if locked:
                self.store.remove_unused()


def _load_dataset(dataset_name_or_id: str | int, configuration: str, plans_identifier: str
                  ) -> tuple[str, str, dict, dict]:
    """The raw folder, the preprocessed folder, the plans and dataset.json of a planned dataset."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_raw.is_set() or not nnUNet_preprocessed.is_set():
        raise UserInputError("nnUNet_raw and nnUNet_preprocessed must be set: the unlabeled scans are read from "
                             f"nnUNet_raw/DatasetXXX/{UNLABELED_IMAGES_FOLDER} (see nnU-Net's "
                             "documentation/setting_up_paths.md)")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserInputError(f"unknown dataset {dataset_name_or_id!r}: no such dataset in nnUNet_raw "
                             f"({nnUNet_raw.get()}) or nnUNet_preprocessed; check the ID or name") from e
    raw_folder = os.path.join(str(nnUNet_raw), dataset_name)
    base = os.path.join(str(nnUNet_preprocessed), dataset_name)
    plans_file = os.path.join(base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UserInputError(f"{plans_file} not found: plan the dataset first with "
                             f"nnUNetv2_plan_and_preprocess -d {dataset_name_or_id} -c {configuration}")
    with open(plans_file) as f:
        plans = json.load(f)
    if configuration not in plans.get("configurations", {}):
        raise UserInputError(f"{plans_file} has no configuration {configuration!r}; available: "
                             f"{', '.join(plans.get('configurations', {}))}")
    dataset_json_file = os.path.join(base, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise UserInputError(f"{dataset_json_file} not found: run nnUNetv2_plan_and_preprocess -d "
                             f"{dataset_name_or_id} first")
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    return raw_folder, base, plans, dataset_json


def ensure_preprocessed(dataset_name_or_id: str | int, configuration: str = "3d_fullres",
                        plans_identifier: str = "nnUNetPlans", num_processes: int = 4, *, force: bool = False,
                        lease: bool = True, progress: bool = True, log: Callable[[str], None] = print
                        ) -> UnlabeledData:
    """Current, complete preprocessed unlabeled data for the dataset's plans; preprocess what is missing.

    Under the writer lock (other processes wait and ``log`` says so): delete what interrupted runs left and the
    versions no run uses; preprocess every case into a new version when there is none, when it was made from
    other plans, dataset.json or images, or with ``force``; preprocess again the cases whose files are damaged
    (missing, another size or other sampled blocks than written, or noted as damaged by a training run: see
    :mod:`~nnunet_sassnet.unlabeled.integrity`). With ``lease``, the returned version is kept until
    :meth:`UnlabeledData.release` or the end of the process, whatever replaces it meanwhile. Where this process
    may not write, the current version is used as it is if it is up to date and whole, else refused.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw_folder, base, plans, dataset_json = _load_dataset(dataset_name_or_id, configuration, plans_identifier)
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    cases = list_unlabeled_cases(raw_folder, dataset_json)
    store = VersionedFolder(unlabeled_preprocessed_folder(base, data_identifier))
    if not store.writable():
        cases, stamp, _ = _fingerprinted_cases(raw_folder, cases, plans, configuration, dataset_json, log)
        command = (f"nnunet_sassnet_preprocess_unlabeled -d {dataset_name_or_id} -c {configuration} "
                   f"-p {plans_identifier}")
        return _use_as_it_is(store, cases, stamp, lease, log, command)  # the fingerprints are not kept there
    with store.writer_lock(on_wait=lambda why: log(f"Unlabeled data: {why}")):
        # the raw scans are hashed under the lock: runs that waited find the hashes the run before them kept
        cases, stamp, fingerprints = _fingerprinted_cases(raw_folder, cases, plans, configuration, dataset_json, log)
        build = _Builder(cases, plans, configuration, plans_identifier, dataset_json, stamp, num_processes, progress)
        if store.adopt_plain_folder() is not None:
            log(f"Unlabeled data: moved {store.path} (written by an earlier version of nnunet_sassnet) into "
                f"{store.versions_dir}")
        _report_removed(store, log)
        folder = store.current()
        if force or folder is None or not unlabeled_data_is_current(folder, stamp):
            reason = "to be replaced (--force)" if force else \
                "missing or was made from other plans, dataset.json or images (or by an earlier nnunet_sassnet)"
            log(f"Unlabeled data in {store.path} is {reason}: preprocessing {len(cases)} unlabeled cases now")
            build_folder = store.new_build_folder()
            try:
                with _full_disk_as_user_error(build_folder, store.path):
                    build.run(cases, build_folder)
                    build.write_stamp(build_folder, case_records(build_folder, cases))
                    folder = store.publish(build_folder, stamp[:16])
            finally:
                if os.path.isdir(build_folder):
                    shutil.rmtree(build_folder, ignore_errors=True)
            log(f"Preprocessed {len(cases)} unlabeled cases into {folder}")
        else:
            records = load_records(folder)
            damaged = damaged_cases(folder, cases, records)
            if damaged:
                log(f"Unlabeled data in {folder}: damaged {'; '.join(damaged.values())}: preprocessing "
                    f"{len(damaged)} case(s) again")
                _repair(store, build, folder, {case: cases[case] for case in damaged}, records)
            else:
                log(f"Unlabeled data in {folder} is up to date ({len(cases)} cases)")
        held = store.lease(folder) if lease else None
        if held is not None and not held.held:
            log(f"Unlabeled data: this run cannot lease {folder}: {held.why_not}")
        _report_removed(store, log)  # the version just replaced, unless a run still reads it
        fingerprints.save()  # under the lock, and only now: a failed run (a full disk) writes nothing
    return UnlabeledData(folder=folder, num_cases=len(cases), store=store, lease=held)


def _fingerprinted_cases(raw_folder: str, cases: dict[str, list[str]], plans: dict, configuration: str,
                         dataset_json: dict, log: Callable[[str], None]):
    """``cases`` less the labeled copies (said in ``log``), their stamp, and the raw scans' fingerprint cache."""
    fingerprints = fingerprint_cache_for(raw_folder)
    cases = _without_labeled_copies(raw_folder, cases, fingerprints, log)
    return cases, compute_stamp(plans, configuration, dataset_json, cases, fingerprints), fingerprints


def _without_labeled_copies(raw_folder: str, cases: dict[str, list[str]], fingerprints, log: Callable[[str], None]
                            ) -> dict[str, list[str]]:
    """``cases`` less those that are labeled cases (see :mod:`~nnunet_sassnet.unlabeled.labeled_copies`), said
    in one line of ``log``."""
    copies = find_labeled_copies(raw_folder, list(cases), fingerprints)
    if not copies:
        return cases
    log(describe_labeled_copies(raw_folder, copies))
    kept = {case: files for case, files in cases.items() if case not in copies}
    if not kept:
        folder = os.path.join(raw_folder, UNLABELED_IMAGES_FOLDER)
        raise UserInputError(f"{folder}: every scan there is a case of imagesTr (by name or by voxels); a labeled "
                             f"case is never unlabeled data: put scans without labels there")
    return kept


def _use_as_it_is(store: VersionedFolder, cases: dict[str, list[str]], stamp: str, lease: bool,
                  log: Callable[[str], None], command: str) -> UnlabeledData:
    """The current version of a store that this process may not write: used as it is when it is up to date and
    whole (as nnU-Net uses its own preprocessed data), else refused; nothing is preprocessed or deleted."""
    where = os.path.dirname(store.path)
    fix = f"run {command} as a user who may write there, or point nnUNet_preprocessed to a writable copy"
    folder = store.current()
    if folder is None or not unlabeled_data_is_current(folder, stamp):
        raise UserInputError(f"{store.path}: the unlabeled data is missing or was made from other plans, "
                             f"dataset.json or images, and this process may not write in {where} to preprocess "
                             f"it; {fix}")
    damaged = damaged_cases(folder, cases, load_records(folder))
    if damaged:
        raise UserInputError(f"{folder}: damaged {'; '.join(damaged.values())}; this process may not write there "
                             f"to preprocess it again: {fix}")
    held = store.lease(folder) if lease else None
    if held is None:
        leased = ""
    elif held.held:
        leased = "; this run holds a lease on it (through a read-only handle)"
    else:
        leased = f"; this run cannot lease it ({held.why_not}): do not preprocess it again while this run trains"
    log(f"Unlabeled data in {folder} is up to date ({len(cases)} cases); {where} is not writable here, so it is "
        f"used as it is{leased}")
    return UnlabeledData(folder=folder, num_cases=len(cases), store=store, lease=held)


def _report_removed(store: VersionedFolder, log: Callable[[str], None]) -> None:
    cleanup = store.remove_unused()
    if cleanup.orphans:
        log(f"Unlabeled data: removed {len(cleanup.orphans)} unfinished folder(s) left by an interrupted "
            f"preprocessing run in {store.versions_dir}: {', '.join(cleanup.orphans)}")
    if cleanup.removed:
        log(f"Unlabeled data: removed {len(cleanup.removed)} older version(s) that no run uses any more: "
            f"{', '.join(cleanup.removed)}")
    for name, why in cleanup.kept.items():
        log(f"Unlabeled data: kept the older version {os.path.join(store.versions_dir, name)}: {why}")


@dataclass
class _Builder:
    """What preprocessing the unlabeled cases needs, and the stamp file it writes."""

    cases: dict[str, list[str]]
    plans: dict
    configuration: str
    plans_identifier: str
    dataset_json: dict
    stamp: str
    num_processes: int
    progress: bool

    def run(self, cases: dict[str, list[str]], folder: str) -> None:
        _run_cases(cases, folder, self.plans, self.configuration, self.dataset_json, self.num_processes,
                   self.progress)

    def write_stamp(self, folder: str, records: dict[str, dict]) -> None:
        """The stamp and the records of every case file (see :func:`case_records`), written last (atomically): a
        folder with a stamp is complete."""
        content = {"stamp": self.stamp, "plans_identifier": self.plans_identifier,
                   "configuration": self.configuration, "num_cases": len(self.cases), "files": records}
        write_json_atomic(os.path.join(folder, STAMP_FILE), content)


def _repair(store: VersionedFolder, build: _Builder, folder: str, cases: dict[str, list[str]],
            records: dict[str, dict]) -> None:
    """Preprocess ``cases`` again and put their files into ``folder``, one atomic rename per file; ``records``:
    those of the stamp file, kept for the other cases."""
    build_folder = store.new_build_folder()
    try:
        with _full_disk_as_user_error(build_folder, store.path):
            build.run(cases, build_folder)
            repaired = case_records(build_folder, cases)
            # a run reading the version meanwhile opens the old file or the new one, never a partial one
            for name in os.listdir(build_folder):
                target = os.path.join(folder, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)  # a folder where the file belongs (made by hand): no rename replaces it
                os.replace(os.path.join(build_folder, name), target)
            build.write_stamp(folder, {**records, **repaired})
            clear_damage_notes(folder, cases)
    finally:
        shutil.rmtree(build_folder, ignore_errors=True)


@contextlib.contextmanager
def _full_disk_as_user_error(build_folder: str, target: str) -> Iterator[None]:
    """Turn a write that failed for lack of space into one clear line (the caller removes ``build_folder``)."""
    try:
        yield
    except UserInputError:
        raise
    except Exception as e:
        full = any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in _chain(e))
        try:
            free = shutil.disk_usage(build_folder).free
        except OSError:
            free = None
        # blosc2 reports a failed write as a RuntimeError without errno: judge by the space left
        if not full and (free is None or free >= _FULL_DISK_BYTES):
            raise
        written = sum(os.path.getsize(os.path.join(build_folder, n)) for n in os.listdir(build_folder)) \
            if os.path.isdir(build_folder) else 0
        raise UserInputError(
            f"{os.path.dirname(target)}: no space left on the device while preprocessing the unlabeled cases "
            f"({written / 1024 ** 2:.1f} MiB written, {(free or 0) / 1024 ** 2:.1f} MiB free); the previous "
            f"unlabeled data is unchanged and the unfinished folder is removed. Free some space and run again"
        ) from e


def _chain(e: BaseException) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def preprocess_unlabeled(dataset_name_or_id: str | int, configuration: str = "3d_fullres",
                         plans_identifier: str = "nnUNetPlans", num_processes: int = 4,
                         progress: bool = True, force: bool = False, log=print) -> str:
    """Preprocess ``imagesUnlabeled`` with the dataset's plans (see :func:`ensure_preprocessed`).

    Returns ``<data_identifier>_unlabeled``, the link to the current version. Nothing is done when the data is
    current and complete (unless ``force``); a failure leaves the previous data untouched.
    """
    return ensure_preprocessed(dataset_name_or_id, configuration, plans_identifier, num_processes, force=force,
                               lease=False, progress=progress, log=log).store.path


def _run_cases(cases: dict[str, list[str]], folder: str, plans: dict, configuration: str, dataset_json: dict,
               num_processes: int, progress: bool) -> None:
    jobs = [(os.path.join(folder, case), files, plans, configuration, dataset_json)
            for case, files in sorted(cases.items())]
    if num_processes <= 1:
        for job in tqdm(jobs, desc="Preprocessing unlabeled cases", disable=not progress):
            _preprocess_one_case(*job)
        return
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        results = [pool.apply_async(_preprocess_one_case, job) for job in jobs]
        with tqdm(total=len(jobs), desc="Preprocessing unlabeled cases", disable=not progress) as bar:
            pending = list(results)
            while pending:
                done = [r for r in pending if r.ready()]
                for r in done:
                    r.get()  # re-raises a worker's error here
                    bar.update()
                pending = [r for r in pending if r not in done]
                if pending:
                    sleep(0.05)
