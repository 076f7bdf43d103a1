"""DTC, mean teacher and bidirectional copy-paste: definitions on hand-made tensors, real steps on the tiny
dataset, resume, and train -> predict through nnU-Net's own commands."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SMALL_PLANS, run, training_environment
from nnunet_sassnet.sdm import signed_distance_map
from nnunet_sassnet.trainers.bcp import (bidirectional_sources, cuboid_mask, largest_component_per_class, mix,
                                         part_target, pseudo_labels)
from nnunet_sassnet.trainers.dtc import dual_task_consistency, sdm_to_soft_mask
from nnunet_sassnet.trainers.mean_teacher import ema_update, make_teacher

TRAINERS = ("nnUNetTrainerDTC", "nnUNetTrainerDTCSASSNet", "nnUNetTrainerMeanTeacher", "nnUNetTrainerBCP")

# A user's module in a folder of nnUNet_extTrainer: short schedules of the four trainers (a narrow
# discriminator keeps the CPU steps quick; the code path is the same)
SMOKE_MODULE = '''
from nnunet_sassnet.trainers.bcp import nnUNetTrainerBCP
from nnunet_sassnet.trainers.dtc import nnUNetTrainerDTC, nnUNetTrainerDTCSASSNet
from nnunet_sassnet.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_sassnet.trainers.variant_factory import trainer_variant

SMOKE = dict(num_epochs=2, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, discriminator_features=16)
for _base in (nnUNetTrainerDTC, nnUNetTrainerDTCSASSNet, nnUNetTrainerMeanTeacher, nnUNetTrainerBCP):
    globals()[_base.__name__ + "_smoke"] = trainer_variant(_base, _base.__name__ + "_smoke", __name__, **SMOKE)
'''


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("semisup_trainers")
    (folder / "semisup_smoke_trainers.py").write_text(SMOKE_MODULE)
    return folder


@pytest.fixture()
def trainer_paths(nnunet_paths, smoke_dir, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(smoke_dir), os.environ["nnUNet_extTrainer"]]))
    return nnunet_paths


def make_trainer(name: str):
    from nnunetv2.run.run_training import get_trainer_from_args

    return get_trainer_from_args("990", "3d_fullres", "all", f"{name}_smoke", SMALL_PLANS, device=torch.device("cpu"))


def started(name: str):
    torch.manual_seed(0)
    trainer = make_trainer(name)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer  # augmentation runs in-process in the tests: no workers to shut down


class FixedLoader:
    """Always the same unlabeled batch: two steps from one state then see identical inputs."""

    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return self.batch


# ---- DTC -------------------------------------------------------------------------------------------------------
def test_dtc_soft_mask_follows_the_sdm_sign_convention():
    mask = np.zeros((12, 12, 12), bool)
    mask[3:9, 4:9, 2:10] = True
    sdm = torch.from_numpy(signed_distance_map(mask))  # this package's SDM: negative inside, 0 on the boundary
    soft = sdm_to_soft_mask(sdm, 1500.0)
    boundary = sdm == 0
    assert torch.all(soft[torch.from_numpy(mask) & ~boundary] > 0.999)
    assert torch.all(soft[~torch.from_numpy(mask)] < 0.001)
    assert torch.all(soft[boundary] == 0.5)


@pytest.mark.parametrize("has_regions", [False, True])
def test_dtc_consistency_pairs_each_sdm_channel_with_its_class(has_regions):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, 5)
    sdm = torch.rand(2, 3, 5, 5, 5) * 2 - 1
    channels = slice(0, 3) if has_regions else slice(1, 3)  # labels: channel 0 (background) has no SDM
    probs = torch.sigmoid(logits) if has_regions else torch.softmax(logits, 1)
    expected = torch.stack([((torch.sigmoid(-1500 * sdm[:, c]) - probs[:, c]) ** 2)
                            for c in range(channels.start, channels.stop)]).mean()
    value = dual_task_consistency(logits, sdm, channels, has_regions, 1500.0)
    assert torch.allclose(value, expected)
    # a perfect pair: probabilities equal to the soft masks of the SDM
    soft = torch.sigmoid(-1500 * sdm)
    perfect = torch.logit(soft.clamp(1e-4, 1 - 1e-4)) if has_regions else None
    if perfect is not None:
        assert dual_task_consistency(perfect, sdm, channels, True, 1500.0) < 1e-6


# ---- mean teacher ----------------------------------------------------------------------------------------------
def test_ema_update_is_the_definition():
    student = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    old = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.add_(3.0)
    ema_update(teacher, student, 0.99)
    for name, p in student.named_parameters():
        assert torch.allclose(teacher.state_dict()[name], 0.99 * old[name] + 0.01 * p)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)  # buffers are copied


# ---- BCP: masks and targets on a hand-made batch ---------------------------------------------------------------
def test_bcp_copy_paste_masks_and_mixed_targets_are_the_definition():
    generator = torch.Generator().manual_seed(3)
    inside = cuboid_mask((9, 6, 12), 2 / 3, generator)
    # one cuboid of int(2/3 * s) voxels per axis, inside the patch
    idx = inside.nonzero()
    lo, hi = idx.min(0).values, idx.max(0).values + 1
    assert (hi - lo).tolist() == [6, 4, 8] and int(inside.sum()) == 6 * 4 * 8
    # hand-made batch: labeled images are 1, 2; unlabeled 10, 20; labels 1 everywhere; pseudo-labels 0
    labeled = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1, 1).expand(2, 1, 9, 6, 12)
    unlabeled = torch.tensor([10.0, 20.0]).view(2, 1, 1, 1, 1).expand(2, 1, 9, 6, 12)
    sources = bidirectional_sources(inside, 2)
    mixed = mix(labeled, unlabeled, sources)
    # "in": the unlabeled cuboid inside the labeled patch; "out": the labeled cuboid inside the unlabeled patch
    assert torch.all(mixed[0, 0][inside] == 10) and torch.all(mixed[0, 0][~inside] == 1)
    assert torch.all(mixed[1, 0][inside] == 2) and torch.all(mixed[1, 0][~inside] == 20)
    label, pseudo = torch.ones(2, 1, 9, 6, 12), torch.zeros(2, 1, 9, 6, 12)
    target = mix(label, pseudo, sources)
    assert torch.equal(target[0, 0], (~inside).float()) and torch.equal(target[1, 0], inside.float())
    # labels: each part's target keeps its own voxels and marks the others with the ignore value
    labeled_part = part_target(target, sources, False, 7)
    pseudo_part = part_target(target, ~sources, False, 7)
    assert torch.equal(labeled_part[0, 0], torch.where(inside, 7.0, 1.0))
    assert torch.equal(pseudo_part[0, 0], torch.where(inside, 0.0, 7.0))
    assert torch.equal(labeled_part[1, 0], torch.where(inside, 1.0, 7.0))
    # regions: an ignore channel (1 = ignored) after the region channels
    regions = torch.ones(2, 2, 9, 6, 12)
    part = part_target(regions, sources, True, 7)
    assert part.shape == (2, 3, 9, 6, 12) and torch.equal(part[:, 2:], (~sources).float())
    # odd batches: the extra pair goes "in"
    assert [bool(s[0][~inside].all()) for s in bidirectional_sources(inside, 3)] == [True, True, False]


def test_pseudo_labels_argmax_regions_and_largest_component():
    logits = torch.zeros(1, 3, 4, 4, 8)
    logits[0, 1, :, :, :2] = 5  # a big class-1 block
    logits[0, 1, 0, 0, 6] = 5  # and a separate class-1 voxel
    logits[0, 2, 1:3, 1:3, 3:5] = 5  # class 2
    labels = pseudo_labels(logits, has_regions=False)
    assert labels.shape == (1, 1, 4, 4, 8) and labels[0, 0, 0, 0, 6] == 1 and labels[0, 0, 1, 1, 3] == 2
    kept = pseudo_labels(logits, has_regions=False, largest_component=True)
    assert kept[0, 0, 0, 0, 6] == 0 and torch.equal(kept[0, 0, ..., :6], labels[0, 0, ..., :6])
    regions = pseudo_labels(torch.tensor([[[[[-1.0, 2.0]]], [[[3.0, -0.5]]]]]), has_regions=True)
    assert regions.tolist() == [[[[[0.0, 1.0]]], [[[1.0, 0.0]]]]]  # sigmoid > 0.5 per region
    two = np.array([[1, 1, 0, 1]])
    assert largest_component_per_class(two, [1]).tolist() == [[1, 1, 0, 0]]


# ---- real steps on the tiny dataset -----------------------------------------------------------------------------
def test_bcp_targets_on_a_real_batch(trainer_paths):
    trainer = started("nnUNetTrainerBCP")
    batch = next(trainer.dataloader_train)
    # nnU-Net's own downsampling of the full-resolution target gives back the loader's target list exactly
    rebuilt = trainer.deep_supervision_targets(batch["target"][0])
    assert [t.shape for t in rebuilt] == [t.shape for t in batch["target"]]
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(rebuilt, batch["target"]))
    unlabeled = next(trainer.dataloader_unlabeled)
    pseudo = pseudo_labels(trainer.teacher_logits(unlabeled["data"]), False, True)
    inside = cuboid_mask((16, 16, 16), trainer.copy_paste_size)
    mixed = trainer.mixed_batch(batch["data"], batch["target"][0], unlabeled["data"], pseudo, inside)
    assert torch.equal(mixed["data"][0][:, ~inside], batch["data"][0][:, ~inside])
    assert torch.equal(mixed["data"][0][:, inside], unlabeled["data"][0][:, inside])
    assert torch.equal(mixed["target"][1][:, inside], batch["target"][0][1][:, inside].float())
    assert torch.equal(mixed["target"][1][:, ~inside], pseudo[1][:, ~inside])
    with torch.no_grad():
        seg, sdm = trainer.network(mixed["data"], return_sdm=True)
        losses = trainer.mixed_losses(seg, sdm, mixed)
        # nothing masked: nnU-Net's own loss; masked voxels do not count, whatever their target
        full = {**mixed, "labeled_part": mixed["target"]}
        assert torch.allclose(trainer.mixed_losses(seg, sdm, full)["seg_loss"],
                              trainer.loss(seg, trainer.deep_supervision_targets(mixed["target"])))
        # each part's loss reads only its own voxels: flipping the labels changes the labeled part's loss only,
        # flipping the pseudo-labels the pseudo-labeled part's only
        flip_labels = trainer.mixed_losses(seg, sdm, trainer.mixed_batch(
            batch["data"], 1 - batch["target"][0], unlabeled["data"], pseudo, inside))
        flip_pseudo = trainer.mixed_losses(seg, sdm, trainer.mixed_batch(
            batch["data"], batch["target"][0], unlabeled["data"], 1 - pseudo, inside))
    assert not torch.allclose(flip_labels["seg_loss"], losses["seg_loss"])
    assert torch.equal(flip_labels["unlabeled_loss"], losses["unlabeled_loss"])
    assert not torch.allclose(flip_pseudo["unlabeled_loss"], losses["unlabeled_loss"])
    assert torch.equal(flip_pseudo["seg_loss"], losses["seg_loss"])


@pytest.mark.parametrize("labels,regions_class_order", [
    ({"background": 0, "a": 1, "b": 2}, None),  # two foreground classes
    ({"background": 0, "whole": [1, 2], "core": 2}, [1, 2]),  # nnU-Net's regions
])
def test_bcp_loss_parts_with_several_classes_and_regions(trainer_paths, labels, regions_class_order):
    """The masked parts through nnU-Net's own loss for these label layouts (hand-made logits and targets)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    trainer = make_trainer("nnUNetTrainerBCP")
    trainer.initialize()
    trainer.label_manager = LabelManager(labels, regions_class_order)
    has_regions = trainer.label_manager.has_regions
    trainer.ignore_value = trainer.label_manager.num_segmentation_heads
    trainer.masked_loss = trainer._build_masked_loss()
    torch.manual_seed(0)
    heads = trainer.label_manager.num_segmentation_heads
    assert heads == (2 if has_regions else 3)
    # the network's deep-supervision outputs for the tiny plan's scales
    seg = [torch.randn(2, heads, *[round(16 * f) for f in scale]) for scale in trainer._get_deep_supervision_scales()]
    sdm = torch.zeros(2, heads, 16, 16, 16)
    teacher = torch.randn(2, heads, 16, 16, 16)
    pseudo = pseudo_labels(teacher, has_regions, largest_component=True)
    label = (torch.rand(2, heads, 16, 16, 16) > 0.5).float() if has_regions else \
        torch.randint(0, 3, (2, 1, 16, 16, 16)).float()
    assert pseudo.shape == label.shape
    inside = cuboid_mask((16, 16, 16), 2 / 3)
    data = torch.zeros(2, 1, 16, 16, 16)

    def losses(label, pseudo):
        return trainer.mixed_losses(seg, sdm, trainer.mixed_batch(data, label, data, pseudo, inside))

    base = losses(label, pseudo)
    changed_labels = losses(1 - label if has_regions else (label + 1) % 3, pseudo)
    changed_pseudo = losses(label, 1 - pseudo if has_regions else (pseudo + 1) % 3)
    assert torch.equal(changed_labels["unlabeled_loss"], base["unlabeled_loss"])
    assert not torch.allclose(changed_labels["seg_loss"], base["seg_loss"])
    assert torch.equal(changed_pseudo["seg_loss"], base["seg_loss"])
    assert not torch.allclose(changed_pseudo["unlabeled_loss"], base["unlabeled_loss"])


@pytest.mark.parametrize("name", TRAINERS)
def test_unlabeled_term_reaches_the_students_update(trainer_paths, name):
    """From one state and one batch, the update with the unlabeled term differs from the one without it."""
    trainer = started(name)
    batch = next(trainer.dataloader_train)
    trainer.dataloader_unlabeled = FixedLoader(next(trainer.dataloader_unlabeled))
    trainer.gradient_probe_steps_per_epoch = 0
    state = copy.deepcopy({"network": trainer.network.state_dict(), "optimizer": trainer.optimizer.state_dict()})
    extra = copy.deepcopy(trainer.extra_checkpoint_state())

    def step(weight: float) -> dict:
        trainer.network.load_state_dict(state["network"])
        trainer.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        trainer.load_extra_checkpoint_state(copy.deepcopy(extra))
        trainer.unlabeled_weight = lambda iteration: weight
        torch.manual_seed(1)  # the same teacher noise, discriminator dropout and copy-paste cuboid
        out = trainer.train_step(batch)
        assert np.isfinite(out["loss"]) and np.isfinite(out["unlabeled_loss"])
        return {k: v.clone() for k, v in trainer.network.state_dict().items()}

    without, again, with_term = step(0.0), step(0.0), step(1.0)
    assert all(torch.equal(without[k], again[k]) for k in without)  # the comparison is deterministic
    changed = [k for k in without if not torch.equal(without[k], with_term[k])]
    assert any(k.startswith("encoder.") for k in changed), "the unlabeled term never reached the shared layers"


@pytest.mark.parametrize("name", ["nnUNetTrainerMeanTeacher", "nnUNetTrainerBCP"])
def test_teacher_follows_the_student_and_resumes(trainer_paths, name):
    trainer = started(name)
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    for _ in range(2):
        trainer.train_step(next(trainer.dataloader_train))
    student = trainer.network.state_dict()
    teacher = trainer.teacher.state_dict()
    decay = trainer.teacher_decay(1)
    assert decay == 0.99 if name.endswith("BCP") else decay == 0.5  # UA-MT's warm-up: min(1 - 1/(t+1), a)
    assert not torch.equal(teacher["encoder.stages.0.0.convs.0.conv.weight"],
                           before["encoder.stages.0.0.convs.0.conv.weight"])
    assert not torch.equal(teacher["encoder.stages.0.0.convs.0.conv.weight"],
                           student["encoder.stages.0.0.convs.0.conv.weight"])
    path = f"{trainer.output_folder}/checkpoint_teacher_test.pth"
    trainer.save_checkpoint(path)

    resumed = make_trainer(name)
    resumed.load_checkpoint(path)
    resumed.on_train_start()  # must not replace the restored teacher with a copy of the student
    assert resumed.current_iteration == 2
    assert all(torch.equal(v, resumed.teacher.state_dict()[k]) for k, v in teacher.items())
    resumed.on_train_epoch_start()
    out = resumed.train_step(next(resumed.dataloader_train))
    assert np.isfinite(out["loss"]) and resumed.current_iteration == 3


def test_bcp_refuses_unpaired_batches(trainer_paths, smoke_dir):
    from nnunet_sassnet.errors import UserInputError

    trainer = make_trainer("nnUNetTrainerBCP")
    trainer.unlabeled_batch_size = 3
    with pytest.raises(UserInputError, match="unlabeled_batch_size"):
        trainer.initialize()


# ---- nnU-Net's own commands ------------------------------------------------------------------------------------
@pytest.mark.slow
# the command-line path of DTC is that of DTC + discriminator (its consistency term, SASSNet's D on top); the
# mean teacher's and BCP's differ from it in the teacher they checkpoint, which
# test_teacher_follows_the_student_and_resumes saves and loads in-process; every trainer's own step is tested
# in-process above
@pytest.mark.parametrize("base", ["nnUNetTrainerDTCSASSNet"])
def test_trainer_trains_through_stock_cli_and_predicts(trainer_paths, tiny_dataset, smoke_dir, tmp_path, base):
    """nnUNetv2_train finds each trainer in a user's folder of nnUNet_extTrainer; nnU-Net's predictor serves it.

    The predictor runs in this process (its sequential mode, no worker processes): it finds the trainer class by
    the name stored in the checkpoint and builds the network as nnUNetv2_predict does, at a fraction of the cost.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    env = training_environment(tiny_dataset["env"])
    env["nnUNet_extTrainer"] = os.environ["nnUNet_extTrainer"]
    root, name = tiny_dataset["root"], tiny_dataset["dataset_name"]
    trainer = f"{base}_smoke"
    run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", trainer, "-p", SMALL_PLANS, "-device", "cpu"], env)
    model = root / "results" / name / f"{trainer}__{SMALL_PLANS}__3d_fullres"
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = checkpoint["sassnet"]
    assert checkpoint["trainer_name"] == trainer and state["current_iteration"] == 2 * 2
    if base == "nnUNetTrainerBCP":
        assert state["teacher_weights"].keys() == checkpoint["network_weights"].keys()
    if base == "nnUNetTrainerDTCSASSNet":
        assert state["discriminator_optimizer_state"]["state"], "the discriminator was never updated"
    log_text = "".join(p.read_text() for p in (model / "fold_0").glob("training_log_*.txt"))
    assert "unlabeled_losses" in log_text and ("dtc_losses" in log_text) == (base == "nnUNetTrainerDTCSASSNet")

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    assert type(predictor.network).__name__ == "SASSNetwork"
    pred = tmp_path / trainer
    pred.mkdir()
    predictor.predict_from_files_sequential(str(root / "raw" / name / "imagesTs"), str(pred))
    for case in ("ts000", "ts001"):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        assert seg.shape == (24, 24, 24) and set(np.unique(seg)) <= {0, 1}, trainer
