"""Where unlabeled scans live, which files make a case, and the stamp that says what preprocessed data was made from."""
from __future__ import annotations

import hashlib
import json
import os
import re

from nnunet_sassnet.errors import UserInputError

UNLABELED_IMAGES_FOLDER = "imagesUnlabeled"
STAMP_FILE = "sassnet_unlabeled_stamp.json"
#: changes when the preprocessed data or its stamp file change form: data of another form is preprocessed again
#: (3: the stamp follows the input files' content, not their modification time)
STAMP_FORMAT = 3

#: the files nnU-Net's blosc2 dataset keeps per case
CASE_FILE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")

__all__ = ["UNLABELED_IMAGES_FOLDER", "STAMP_FILE", "CASE_FILE_SUFFIXES", "unlabeled_preprocessed_folder",
           "read_raw_dataset_json", "list_unlabeled_cases", "compute_stamp", "unlabeled_data_is_current"]


def read_raw_dataset_json(raw_dataset_folder: str) -> dict:
    """``nnUNet_raw/DatasetXXX/dataset.json``, read; a missing file or one that is not a JSON object is refused
    with one line naming it."""
    path = os.path.join(raw_dataset_folder, "dataset.json")
    fix = "write it as nnU-Net's dataset_format.md describes (channel_names, labels, numTraining, file_ending)"
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise UserInputError(f"{path} not found: every dataset in nnUNet_raw has one; {fix}") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the "
                             f"file: {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e}); {fix}") from None
    if not isinstance(content, dict):
        raise UserInputError(f"{path}: holds a JSON {type(content).__name__}, not an object; {fix}")
    return content


def unlabeled_preprocessed_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    """``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled`` (a link to the current version)."""
    return os.path.join(preprocessed_dataset_folder_base, data_identifier + "_unlabeled")


def list_unlabeled_cases(raw_dataset_folder: str, dataset_json: dict,
                         needed_by: str = "the semi-supervised trainers learn from them") -> dict[str, list[str]]:
    """Map case identifier -> its channel files in ``imagesUnlabeled``, checked against dataset.json.

    Raises :class:`UserInputError` for a missing or empty folder (its message says why the scans are needed:
    ``needed_by``), files with another ending, and cases with a missing or an extra channel file.
    """
    folder = os.path.join(raw_dataset_folder, UNLABELED_IMAGES_FOLDER)
    file_ending = dataset_json.get("file_ending", ".nii.gz")

    def no_scans(state: str) -> UserInputError:
        return UserInputError(f"no unlabeled images: {folder} {state}; {needed_by}: put the unlabeled scans there, "
                              f"named like imagesTr (CASE_0000{file_ending}, one file per channel)")

    if not os.path.isdir(folder):
        raise no_scans("does not exist")
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    num_channels = len(channels)
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    cases: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or os.path.isdir(path):
            continue
        if os.path.islink(path) and not os.path.exists(path):
            raise UserInputError(f"{path}: a link to {os.readlink(path)}, which does not exist; fix the link or "
                                 f"remove it")
        match = pattern.match(name)
        if match is None:
            raise UserInputError(
                f"{path}: unexpected file name; unlabeled images must be named CASE_XXXX{file_ending} "
                f"(the dataset's file_ending, a 4-digit channel index), like imagesTr. Rename or remove it")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    if not cases:
        raise no_scans("is empty")
    # nnU-Net's blosc2 dataset stores case X's mask as X_seg.b2nd: a case named X_seg would overwrite it
    for case in cases:
        if case.endswith("_seg") and case[:-len("_seg")] in cases:
            raise UserInputError(
                f"{os.path.join(folder, case)}_0000{file_ending}: the case name {case} clashes with case "
                f"{case[:-len('_seg')]} (nnU-Net stores that case's mask as {case}.b2nd); rename it, e.g. without "
                f"the _seg ending")
    result = {}
    for case, files in cases.items():
        expected = set(range(num_channels))
        missing = sorted(expected - set(files))
        extra = sorted(set(files) - expected)
        if missing:
            raise UserInputError(
                f"{os.path.join(folder, case)}: channel file(s) "
                f"{', '.join(f'{case}_{c:04d}{file_ending}' for c in missing)} missing; dataset.json declares "
                f"{num_channels} channel(s): add the file(s) or remove the case")
        if extra:
            raise UserInputError(
                f"{files[extra[0]]}: extra channel; dataset.json declares {num_channels} channel(s) "
                f"(_0000 to _{num_channels - 1:04d}): remove the file")
        result[case] = [files[c] for c in range(num_channels)]
    return result


def compute_stamp(plans: dict, configuration_name: str, dataset_json: dict, cases: dict[str, list[str]],
                  fingerprints=None) -> str:
    """Hash of everything the preprocessed unlabeled data depends on.

    The plans (the configuration as resolved, and the plan-wide settings it reads: transposition,
    intensity statistics, reader), dataset.json, the input files (names and the SHA-256 of their content, from
    ``fingerprints``, a :class:`~nnunet_sassnet.unlabeled.raw_fingerprints.FingerprintCache`; one kept in memory
    when None) and :data:`STAMP_FORMAT`.
    """
    from nnunet_sassnet.unlabeled.raw_fingerprints import FingerprintCache

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(configuration_name).configuration
    relevant_plans = {
        "configuration": configuration,
        "transpose_forward": plans.get("transpose_forward"),
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "image_reader_writer": plans.get("image_reader_writer"),
    }
    fingerprints = fingerprints if fingerprints is not None else FingerprintCache(None)
    files = [[os.path.basename(path), fingerprints.content_sha256(path)]
             for case in sorted(cases) for path in cases[case]]
    payload = json.dumps({"plans": relevant_plans, "dataset_json": dataset_json, "files": files,
                          "format": STAMP_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def unlabeled_data_is_current(folder: str, stamp: str) -> bool:
    """True when ``folder`` holds unlabeled data made from exactly what ``stamp`` describes."""
    stamp_file = os.path.join(folder, STAMP_FILE)
    if not os.path.isfile(stamp_file):
        return False
    try:
        with open(stamp_file) as f:
            return json.load(f).get("stamp") == stamp
    except (OSError, ValueError):
        return False
