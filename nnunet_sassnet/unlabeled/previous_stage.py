"""The previous stage's segmentations of the unlabeled scans, for nnU-Net's cascade (``3d_cascade_fullres``).

nnU-Net's cascade gives each training case of ``3d_cascade_fullres`` the segmentation its ``3d_lowres`` model
predicted in that model's final validation (``<lowres model>/predicted_next_stage/3d_cascade_fullres/``), resampled
to the case's ``3d_fullres`` grid; the network reads it as extra one-hot input channels. The unlabeled scans get
theirs the same way: at the start of a cascade training the fold's ``3d_lowres`` model (``fold_<f>``, else
``fold_all``; ``checkpoint_final.pth``) predicts every unlabeled scan from its own ``3d_lowres`` preprocessing, and
nnU-Net's ``resample_and_save`` (what its validation calls for the next stage) writes the segmentation on the scan's
``3d_cascade_fullres`` grid into

    <lowres model>/predicted_next_stage_unlabeled/<configuration>/fold_<f>/<key>/<case>.b2nd

``key`` hashes the lowres checkpoint's bytes and the two preprocessed unlabeled versions it was made from, so a
retrained lowres model, new scans or new plans give a new folder (made again), and the same ones are reused. A
folder appears whole (written beside, renamed into place) or not at all; older keys of the fold are deleted.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Callable

from nnunet_sassnet.errors import UserInputError

__all__ = ["previous_stage_model_fold", "previous_stage_key", "predict_previous_stage"]

PREDICTIONS_FOLDER = "predicted_next_stage_unlabeled"
CHECKPOINT = "checkpoint_final.pth"


def previous_stage_model_fold(model_folder: str, fold: int | str, command: str) -> str:
    """The lowres model's fold folder that predicts the unlabeled scans: ``fold_<fold>``, else ``fold_all``.

    ``command``: how to train it, for the message when neither has a final checkpoint.
    """
    for name in (f"fold_{fold}", "fold_all"):
        if os.path.isfile(os.path.join(model_folder, name, CHECKPOINT)):
            return name
    raise UserInputError(f"{model_folder}: no fold_{fold}/{CHECKPOINT} (nor fold_all): the cascade's previous stage "
                         f"predicts the unlabeled scans; train it first: {command}")


def previous_stage_key(checkpoint_file: str, *version_folders: str) -> str:
    """A short hash of the checkpoint's bytes and the (resolved) names of the preprocessed versions used."""
    digest = hashlib.sha256()
    with open(checkpoint_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    for folder in version_folders:
        digest.update(os.path.basename(os.path.realpath(folder)).encode())
    return digest.hexdigest()[:16]


def predict_previous_stage(model_folder: str, fold: int | str, lowres_unlabeled: str, cascade_unlabeled: str,
                           configuration: str, device, command: str, log: Callable[[str], None] = print) -> str:
    """The folder with the lowres model's segmentation of every unlabeled case on the cascade's grid (made now if
    missing or made from another checkpoint or other preprocessed data).

    ``lowres_unlabeled``/``cascade_unlabeled``: the unlabeled cases preprocessed for the lowres stage and for the
    cascade configuration ``configuration``; ``device``: where the lowres model predicts.
    """
    import blosc2
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.inference.export_prediction import resample_and_save
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    fold_name = previous_stage_model_fold(model_folder, fold, command)
    checkpoint = os.path.join(model_folder, fold_name, CHECKPOINT)
    key = previous_stage_key(checkpoint, lowres_unlabeled, cascade_unlabeled)
    parent = os.path.join(model_folder, PREDICTIONS_FOLDER, configuration, fold_name)
    target = os.path.join(parent, key)
    cases = sorted(f[:-len(".pkl")] for f in os.listdir(cascade_unlabeled) if f.endswith(".pkl"))
    if os.path.isdir(target):
        log(f"Previous stage of the unlabeled scans: {target} (made from {checkpoint})")
        return target

    log(f"Previous stage of the unlabeled scans: {model_folder} ({fold_name}) predicts {len(cases)} cases into {target}")
    predictor = nnUNetPredictor(device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(fold_name[len("fold_"):],),
                                                   checkpoint_name=CHECKPOINT)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{key}.", dir=parent)
    try:
        for case in cases:
            data = blosc2.open(os.path.join(lowres_unlabeled, case + ".b2nd"), mode="r")[:]
            properties = load_pickle(os.path.join(lowres_unlabeled, case + ".pkl"))
            target_shape = blosc2.open(os.path.join(cascade_unlabeled, case + ".b2nd"), mode="r").shape[1:]
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.ascontiguousarray(data)))
            resample_and_save(logits.cpu(), list(target_shape), os.path.join(scratch, case),
                              predictor.plans_manager, predictor.configuration_manager, properties,
                              predictor.dataset_json, num_threads_torch=torch.get_num_threads())
        os.chmod(scratch, 0o777 & ~_umask())
        try:
            os.rename(scratch, target)
        except OSError:
            if not os.path.isdir(target):  # else another run made the same one meanwhile
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for old in os.listdir(parent):
        if old != key and not old.startswith("."):
            shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
