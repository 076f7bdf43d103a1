"""Datasets with nnU-Net's ignore label (sparse annotations): the trainers train, resume and predict, and an
ignored voxel moves no supervised term."""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SMALL_PLANS, run, training_environment
from planned_copies import copy_planned_dataset
from nnunet_sassnet.discovery import trainer_dir
from nnunet_sassnet.nnunet_tools import stop_process_group
from nnunet_sassnet.sdm import signed_distance_maps, signed_distance_maps_where_known

DATASET = 990  # a copy of the tiny dataset
IGNORE = 2
TRAINER_DIR = Path(__file__).parent / "failure_trainers"
RESUMABLE_TRAINER = "nnUNetTrainerSASSNet_failures"  # the smoke schedule with a checkpoint after every epoch


# ---- the SDM target where labels are unknown ----------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [None, (1.0, 0.7, 2.5)])
def test_a_determined_sdm_target_is_the_sdm_of_every_labeling_of_the_unknown_voxels(spacing):
    generator = torch.Generator().manual_seed(0)
    determined_fraction = []
    for trial in range(12):
        shape = (3, 12, 10, 9)
        noise = (torch.rand(shape, generator=generator) < 0.4).float()[:, None]
        masks = torch.nn.functional.avg_pool3d(noise, 3, 1, 1)[:, 0] > 0.35  # blobs, not salt
        known = torch.rand(shape, generator=generator) < (0.97 if trial % 2 else 0.7)
        known[0, :, :3] = False  # a hidden slab besides scattered unknown voxels
        target, determined = signed_distance_maps_where_known(masks, known, spacing)
        assert not determined[~known].any()
        for p in (0.0, 1.0, 0.5, 0.1, 0.9):  # both extremes and random labelings of the unknown voxels
            completion = torch.where(known, masks, torch.rand(shape, generator=generator) < p)
            reference = signed_distance_maps(completion, spacing)
            assert torch.allclose(reference[determined], target[determined], atol=1e-6), (trial, p)
        determined_fraction.append(float(determined.sum() / known.sum()))
        everything, all_determined = signed_distance_maps_where_known(masks, torch.ones_like(known), spacing)
        assert all_determined.all() and torch.equal(everything, signed_distance_maps(masks, spacing))
    assert 0.05 < np.mean(determined_fraction) < 0.9  # neither nothing nor everything: the rule does choose


# ---- a tiny dataset with scribbles --------------------------------------------------------------------------------
def scribbles(raw: Path) -> None:
    """Case tr000 keeps its full label; the others keep only three orthogonal planes through the middle (88 %
    of their voxels ignored); dataset.json gets the ignore label."""
    for path in sorted((raw / "labelsTr").glob("*.nii.gz"))[1:]:
        image = sitk.ReadImage(str(path))
        label = sitk.GetArrayFromImage(image)
        known = np.zeros(label.shape, bool)
        for axis, size in enumerate(label.shape):
            index = [slice(None)] * label.ndim
            index[axis] = size // 2
            known[tuple(index)] = True
        scribbled = sitk.GetImageFromArray(np.where(known, label, IGNORE).astype(label.dtype))
        scribbled.CopyInformation(image)
        sitk.WriteImage(scribbled, str(path))
    dataset_json = json.loads((raw / "dataset.json").read_text())
    dataset_json["labels"]["ignore"] = IGNORE
    (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=2))


@pytest.fixture(scope="module")
def scribble_dataset(tiny_dataset, tmp_path_factory) -> dict:
    """The tiny dataset with scribbles: a copy of its raw folder and plans, its labels scribbled, preprocessed."""
    return copy_planned_dataset(tiny_dataset, tmp_path_factory.mktemp("ignore"), edit_raw=scribbles)


@pytest.fixture()
def scribble_paths(scribble_dataset, monkeypatch) -> dict:
    env = training_environment(scribble_dataset["env"])
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_compile",
                "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(key, env[key])
    return scribble_dataset


def started_trainer(name: str):
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(0)
    np.random.seed(0)  # nnU-Net's loader draws its cases and crops with NumPy
    trainer = get_trainer_from_args(str(DATASET), "3d_fullres", "all", name, SMALL_PLANS, device=torch.device("cpu"))
    trainer.discriminator_features = 16
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def partly_ignored_target(trainer, batch: dict) -> torch.Tensor:
    """The batch's full-resolution target with, in its first patch, a blob whose one side is hidden: ignored
    voxels next to labeled ones whose SDM targets are still determined."""
    from nnunet_sassnet.trainers.mean_teacher import full_resolution

    target = full_resolution(batch["target"]).clone()
    shape = target.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    centre = torch.tensor([s / 2 for s in shape]).view(-1, 1, 1, 1)
    target[0, 0] = (((grid - centre) / 4) ** 2).sum(0) <= 1
    target[0, 0, :, :, :3] = IGNORE  # a hidden slab at one side, away from the blob
    return target


def deep_supervision_targets(trainer, target: torch.Tensor) -> list[torch.Tensor]:
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    transform = DownsampleSegForDSTransform(trainer._get_deep_supervision_scales())
    per_patch = [transform(segmentation=t)["segmentation"] for t in target]
    return [torch.stack([p[s] for p in per_patch]) for s in range(len(per_patch[0]))]


@pytest.mark.parametrize("name", ["nnUNetTrainerSASSNet", "nnUNetTrainerMeanTeacher"])
def test_an_ignored_voxel_changes_no_supervised_term(scribble_paths, name):
    """The network's outputs where the label is ignored are perturbed: every supervised term keeps its value and
    has a zero gradient there (nnU-Net's segmentation loss at every deep-supervision scale, the SDM loss)."""
    trainer = started_trainer(name)
    batch = next(trainer.dataloader_train)
    targets = deep_supervision_targets(trainer, partly_ignored_target(trainer, batch))
    with torch.no_grad():
        seg, sdm = trainer.network(batch["data"], return_sdm=True)

    def terms(seg_outputs, sdm_output):
        seg_outputs = [s.clone().requires_grad_(True) for s in seg_outputs]
        sdm_output = sdm_output.clone().requires_grad_(True)
        losses = trainer.supervised_losses(seg_outputs, sdm_output, targets, batch["data"].shape[0])
        grads = {key: torch.autograd.grad(value, [*seg_outputs, sdm_output], allow_unused=True)
                 for key, value in losses.items()}
        return losses, grads

    losses, grads = terms(seg, sdm)
    generator = torch.Generator().manual_seed(1)
    perturbed_seg = [torch.where(t == IGNORE, s + 10 * torch.randn(s.shape, generator=generator), s)
                     for s, t in zip(seg, targets)]
    ignored = targets[0] == IGNORE
    perturbed_sdm = torch.where(ignored, torch.rand(sdm.shape, generator=generator) * 2 - 1, sdm)
    perturbed_losses, perturbed_grads = terms(perturbed_seg, perturbed_sdm)

    assert ignored.float().mean() > 0.25  # much of the batch is ignored
    assert set(losses) == {"seg_loss", "sdm_loss"}
    for key in losses:
        assert losses[key] > 0, key  # labeled voxels do act on every term
        assert torch.allclose(losses[key], perturbed_losses[key], rtol=1e-5, atol=1e-7), key
        for grad, target in zip(grads[key], [*targets, targets[0]]):
            if grad is not None:
                assert not grad.masked_select(target == IGNORE).any(), key
        for grad, perturbed in zip(grads[key], perturbed_grads[key]):
            if grad is not None:
                assert torch.allclose(grad, perturbed, atol=1e-7), key
    # the SDM term acts on the determined voxels of the first patch
    sdm_grad = grads["sdm_loss"][-1]
    assert sdm_grad[0].abs().sum() > 0


def test_bcp_keeps_ignored_voxels_ignored_in_both_parts_of_a_mixed_patch(scribble_paths):
    from nnunet_sassnet.trainers.bcp import cuboid_mask

    trainer = started_trainer("nnUNetTrainerBCP")
    batch = next(trainer.dataloader_train)
    target = partly_ignored_target(trainer, batch)
    target[1][target[1] == IGNORE] = 0  # a fully labeled second patch: its mixed patch keeps every SDM target
    unlabeled = next(trainer.dataloader_unlabeled)["data"]
    pseudo = torch.randint(0, 2, target.shape).float()  # any labels: the teacher's are complete
    inside = cuboid_mask(tuple(target.shape[2:]), trainer.copy_paste_size)
    mixed = trainer.mixed_batch(batch["data"], target, unlabeled, pseudo, inside)
    from_labeled = mixed["from_labeled"]
    ignored_here = from_labeled & (target == IGNORE)
    assert ignored_here.any() and trainer.ignore_value == IGNORE
    # an ignored voxel pasted from a labeled patch is ignored in the mixed target and in both parts' losses
    assert (mixed["target"][ignored_here] == IGNORE).all()
    assert (mixed["labeled_part"][ignored_here] == IGNORE).all()
    assert (mixed["pseudo_part"][from_labeled] == IGNORE).all()
    # and no term reads it: the losses on the mixed batch are finite and do not change when the network's
    # output there changes
    trainer.sdm_loss_weight = 0.3  # BCP's default 0 would leave the SDM term out
    with torch.no_grad():
        seg, sdm = trainer.network(mixed["data"], return_sdm=True)
    losses = trainer.mixed_losses(seg, sdm, mixed)
    generator = torch.Generator().manual_seed(2)
    shifted = trainer.mixed_losses(
        [torch.where(t == IGNORE, s + 10 * torch.randn(s.shape, generator=generator), s)
         for s, t in zip(seg, trainer.deep_supervision_targets(mixed["target"]))],
        torch.where(mixed["target"] == IGNORE, torch.rand(sdm.shape, generator=generator) * 2 - 1, sdm), mixed)
    for key in ("seg_loss", "unlabeled_loss", "sdm_loss"):
        assert torch.isfinite(losses[key]) and losses[key] > 0, key
        assert torch.allclose(losses[key], shifted[key], rtol=1e-5, atol=1e-7), key


def test_selftraining_accepts_this_packages_trainers_as_students_of_ignore_below(tmp_path):
    from nnunet_sassnet.selftraining.checks import _check_trainers

    args = argparse.Namespace(student_trainer="nnUNetTrainerSASSNet", ignore_below=0.9, fine_tune_trainer="nnUNetTrainerDTC")
    teacher = argparse.Namespace(trainer="nnUNetTrainerMeanTeacher")
    dataset_json = {"labels": {"background": 0, "a": 1, "ignore": 2}}
    _check_trainers(args, teacher, dataset_json, tmp_path, teacher_trained_here=True)  # raises nothing


# ---- nnU-Net's commands -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_scribbles_train_resume_and_predict_with_nnunets_commands(scribble_dataset, tmp_path, monkeypatch):
    ds = scribble_dataset
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**training_environment(ds["env"]), "nnUNet_extTrainer": f"{TRAINER_DIR}{os.pathsep}{trainer_dir()}",
           "SASSNET_TEST_DIR": str(marks), "SASSNET_TEST_PAUSE_AT": "3", "SASSNET_TEST_SKIP_VALIDATION": "1"}
    model = ds["root"] / "results" / ds["dataset_name"] / f"{RESUMABLE_TRAINER}__{SMALL_PLANS}__3d_fullres"
    fold = model / "fold_0"
    started = []

    def stop_in_the_second_epoch() -> None:
        """At the second epoch's first step (checkpoint_latest.pth of the first epoch written): stop the run."""
        deadline = time.monotonic() + 300
        while not (marks / "paused_0_3").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_process_group(started[0])

    watcher = threading.Thread(target=stop_in_the_second_epoch, daemon=True)
    watcher.start()
    train = ["nnUNetv2_train", str(DATASET), "3d_fullres", "0", "-tr", RESUMABLE_TRAINER, "-p", SMALL_PLANS,
             "-device", "cpu"]
    stopped = run(train, env, check=False, on_start=started.append)
    watcher.join(timeout=60)
    assert stopped.returncode != 0 and not (fold / "checkpoint_final.pth").exists(), stopped.stdout[-3000:]
    interrupted = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert np.isfinite(interrupted["logging"]["train_losses"]).all()
    assert np.isfinite(interrupted["logging"]["sdm_losses"]).all()
    # nnU-Net's --c continues from checkpoint_latest.pth
    run([*train, "--c"], {**env, "SASSNET_TEST_PAUSE_AT": ""})
    log = "\n".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    assert "failure test: starts at iteration 3," in log
    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 2 and resumed["sassnet"]["current_iteration"] == 6
    # nnU-Net's predictor (what nnUNetv2_predict runs; here in this process: no worker processes to start)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    image = ds["root"] / "raw" / ds["dataset_name"] / "imagesTs" / "ts000_0000.nii.gz"
    data, properties = SimpleITKIO().read_images([str(image)])
    prediction = predictor.predict_single_npy_array(data, properties)
    assert prediction.shape == (24, 24, 24) and set(np.unique(prediction)) <= {0, 1}  # never the ignore label
