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
from nnunet_sassnet.networks import unwrap_module
from nnunet_sassnet.sdm import signed_distance_map
from nnunet_sassnet.trainers.bcp import (bidirectional_sources, cuboid_mask, largest_component_per_class, mix,
                                         part_target, pretraining_epochs, pseudo_labels)
from nnunet_sassnet.trainers.consistency_views import add_channel_dropout, apply_per_patch, random_mirror_dims
from nnunet_sassnet.trainers.dtc import dual_task_consistency, sdm_to_soft_mask
from nnunet_sassnet.trainers.mean_teacher import ema_update, make_teacher, probabilities
from nnunet_sassnet.trainers.output_layers import load_output_layers, pretrained_weights_argument

TRAINERS = ("nnUNetTrainerDTC", "nnUNetTrainerDTCSASSNet", "nnUNetTrainerMeanTeacher", "nnUNetTrainerBCP",
            "nnUNetTrainerMeanTeacherTwoView", "nnUNetTrainerDTCPublishedBalance",
            "nnUNetTrainerMeanTeacherTwoViewPublishedBalance")

# A user's module in a folder of nnUNet_extTrainer: short schedules of the trainers (a narrow discriminator keeps
# the CPU steps quick; the code path is the same); checkpoint_latest after every epoch, so that a run stopped after
# epoch 0 can resume
SMOKE_MODULE = '''
from nnunet_sassnet.trainers.bcp import nnUNetTrainerBCP
from nnunet_sassnet.trainers.dtc import nnUNetTrainerDTC, nnUNetTrainerDTCSASSNet
from nnunet_sassnet.trainers.mean_teacher import nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacherTwoView
from nnunet_sassnet.trainers.variant_factory import trainer_variant
from nnunet_sassnet.variants import nnUNetTrainerDTCPublishedBalance, nnUNetTrainerMeanTeacherTwoViewPublishedBalance

SMOKE = dict(num_epochs=2, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, discriminator_features=16,
             save_every=1)
for _base in (nnUNetTrainerDTC, nnUNetTrainerDTCSASSNet, nnUNetTrainerMeanTeacher, nnUNetTrainerBCP,
              nnUNetTrainerMeanTeacherTwoView, nnUNetTrainerDTCPublishedBalance,
              nnUNetTrainerMeanTeacherTwoViewPublishedBalance):
    globals()[_base.__name__ + "_smoke"] = trainer_variant(_base, _base.__name__ + "_smoke", __name__, **SMOKE)

# BCP's two stages: 4 epochs of one step, pre-training for the first two
nnUNetTrainerBCP_stages = trainer_variant(nnUNetTrainerBCP, "nnUNetTrainerBCP_stages", __name__, num_epochs=4,
                                          num_iterations_per_epoch=1, num_val_iterations_per_epoch=1,
                                          pretraining_fraction=0.5, gradient_probe_steps_per_epoch=0)
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


def make_trainer(name: str, schedule: str = "smoke"):
    from nnunetv2.run.run_training import get_trainer_from_args

    return get_trainer_from_args("990", "3d_fullres", "all", f"{name}_{schedule}", SMALL_PLANS,
                                 device=torch.device("cpu"))


def started(name: str, schedule: str = "smoke"):
    torch.manual_seed(0)
    trainer = make_trainer(name, schedule)
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
    if name == "nnUNetTrainerBCP":
        trainer.start_self_training()  # BCP's unlabeled term begins after its pre-training stage
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
    if name == "nnUNetTrainerBCP":
        trainer.start_self_training()
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


# ---- BCP's two stages -------------------------------------------------------------------------------------------
class NoUnlabeledPatches:
    """An unlabeled stream that must not be read (BCP's pre-training uses labeled patches only)."""

    def __next__(self):
        raise AssertionError("the pre-training stage read an unlabeled patch")


def train_epochs(trainer, batches: list, until_epoch: int, checkpoints: list | None = None) -> list[dict]:
    """nnU-Net's epoch loop (its training part) over fixed batches with one seed per step, up to ``until_epoch``;
    a checkpoint after every epoch, as nnU-Net writes checkpoint_latest."""
    outputs = []
    while trainer.current_epoch < until_epoch:
        trainer.on_train_epoch_start()
        for _ in range(trainer.num_iterations_per_epoch):
            torch.manual_seed(100 + trainer.current_iteration)  # the same cuboid in the run and in its resumptions
            outputs.append(trainer.train_step(batches[trainer.current_iteration]))
        if checkpoints is not None:
            checkpoints.append(f"{trainer.output_folder}/checkpoint_epoch{trainer.current_epoch}.pth")
            trainer.save_checkpoint(checkpoints[-1])
        trainer.current_epoch += 1
    return outputs


def test_bcp_pretraining_stage_length():
    # the default 0.2: 2 of the LA benchmark's 12 epochs, 200 of nnU-Net's 1,000; at least one epoch of each stage
    assert [pretraining_epochs(0.2, n) for n in (12, 1000, 2, 1)] == [2, 200, 1, 0]
    assert pretraining_epochs(0.0, 12) == 0 and pretraining_epochs(0.99, 12) == 11


def test_bcp_two_stages_and_resume_before_at_and_after_the_switch(trainer_paths):
    trainer = started("nnUNetTrainerBCP", "stages")
    assert trainer.switch_iteration == 2
    batches = [next(trainer.dataloader_train) for _ in range(4)]
    unlabeled = FixedLoader(next(trainer.dataloader_unlabeled))

    # pre-training: labeled patch i with the cuboid of labeled patch i - 1, images and labels
    data, target = batches[0]["data"], batches[0]["target"][0]
    inside = cuboid_mask((16, 16, 16), trainer.copy_paste_size)
    mixed = trainer.pretraining_batch(data, target, inside)
    assert torch.equal(mixed["data"][1][:, ~inside], data[1][:, ~inside])
    assert torch.equal(mixed["data"][1][:, inside], data[0][:, inside])
    assert torch.equal(mixed["target"][0][:, inside], target[1][:, inside])
    assert torch.equal(mixed["target"][0][:, ~inside], target[0][:, ~inside])

    teacher_at_start = copy.deepcopy(trainer.teacher.state_dict())
    trainer.dataloader_unlabeled = NoUnlabeledPatches()
    checkpoints: list[str] = []
    outputs = train_epochs(trainer, batches, 2, checkpoints)
    assert [np.isnan(o["unlabeled_loss"]) and o["unlabeled_weight"] == 0 for o in outputs] == [True, True]
    assert not trainer.self_training_started
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in teacher_at_start.items())

    # the switch: the teacher becomes the pre-trained student (output layers included), then follows its EMA
    pretrained = copy.deepcopy(unwrap_module(trainer.network).state_dict())
    trainer.dataloader_unlabeled = unlabeled
    outputs = train_epochs(trainer, batches, 3, checkpoints)
    assert trainer.self_training_started and np.isfinite(outputs[0]["unlabeled_loss"])
    student, teacher = unwrap_module(trainer.network).state_dict(), trainer.teacher.state_dict()
    for key in ("decoder.seg_layers.0.weight", "sdm_head.seg_layers.0.weight", "encoder.stages.0.0.convs.0.conv.weight"):
        assert torch.allclose(teacher[key], 0.99 * pretrained[key] + 0.01 * student[key], atol=1e-6), key
    train_epochs(trainer, batches, 4, checkpoints)
    final = [copy.deepcopy(s) for s in (trainer.network.state_dict(), trainer.teacher.state_dict())]

    # --c from the checkpoint before the switch, at it (after the last pre-training epoch) and after it
    for epoch, path in enumerate(checkpoints[:3]):
        resumed = make_trainer("nnUNetTrainerBCP", "stages")
        resumed.load_checkpoint(path)
        resumed.on_train_start()
        assert resumed.current_iteration == epoch + 1 and resumed.self_training_started == (epoch == 2)
        resumed.dataloader_unlabeled = unlabeled
        train_epochs(resumed, batches, 4)
        for mine, theirs in zip((resumed.network.state_dict(), resumed.teacher.state_dict()), final):
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"resumed after epoch {epoch}"


# ---- -pretrained_weights: the output layers too -------------------------------------------------------------------
def stock_checkpoint(path: Path) -> Path:
    """A checkpoint of nnU-Net's own nnUNetTrainer for the tiny plans, written by nnU-Net (untrained weights)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args("990", "3d_fullres", 0, "nnUNetTrainer", SMALL_PLANS, device=torch.device("cpu"))
    trainer.initialize()
    trainer.save_checkpoint(str(path))
    return path


def test_pretrained_weights_argument():
    assert pretrained_weights_argument(["990", "3d_fullres", "0", "-pretrained_weights", "a.pth"]) == "a.pth"
    assert pretrained_weights_argument(["990", "-pretrained_weights=b.pth", "--c"]) == "b.pth"
    assert pretrained_weights_argument(["990", "3d_fullres", "0", "-p", "nnUNetPlans"]) is None


@pytest.mark.parametrize("name", ["nnUNetTrainerBCP", "nnUNetTrainerMeanTeacherTwoView"])
def test_pretrained_weights_load_the_output_layers_into_student_and_teacher(trainer_paths, tmp_path, monkeypatch,
                                                                           capsys, name):
    from nnunetv2.run.run_training import maybe_load_checkpoint

    path = stock_checkpoint(tmp_path / "stock.pth")
    saved = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    monkeypatch.setattr("sys.argv", ["nnUNetv2_train", "990", "3d_fullres", "all", "-tr", f"{name}_smoke",
                                     "-pretrained_weights", str(path)])
    trainer = make_trainer(name)
    maybe_load_checkpoint(trainer, False, False, str(path))  # what nnUNetv2_train -pretrained_weights does
    head = copy.deepcopy(unwrap_module(trainer.network).sdm_head.state_dict())
    trainer.on_train_start()
    if name == "nnUNetTrainerBCP":
        trainer.start_self_training()
    student, teacher = unwrap_module(trainer.network).state_dict(), trainer.teacher.state_dict()
    assert any(".seg_layers." in k for k in saved)
    for key, value in saved.items():  # every layer of the stock model, its output layers included
        assert torch.equal(student[key], value) and torch.equal(teacher[key], value), key
    assert all(torch.equal(v, student[f"sdm_head.{k}"]) for k, v in head.items())  # not in the file: fresh
    out = capsys.readouterr().out
    assert f"Output layers from {path}: loaded decoder.seg_layers.0, decoder.seg_layers.1" in out
    assert "starts fresh: sdm_head.seg_layers.0 (not in the file)" in out

    # another label set, or other shapes: the output layers keep their weights, and the reason is given
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    other = copy.deepcopy(checkpoint)
    other["init_args"]["dataset_json"]["labels"] = {"background": 0, "liver": 1}
    loaded, fresh = load_output_layers(trainer.network, other, trainer.dataset_json["labels"])
    assert loaded == [] and "labels" in fresh["decoder.seg_layers.0"]
    checkpoint["network_weights"]["decoder.seg_layers.0.weight"] = torch.zeros(3, 1, 1, 1, 1)
    loaded, fresh = load_output_layers(trainer.network, checkpoint, trainer.dataset_json["labels"])
    assert "decoder.seg_layers.0" not in loaded and "decoder.seg_layers.1" in loaded
    assert fresh["decoder.seg_layers.0"].startswith("shape (3, 1, 1, 1, 1) in the file")


# ---- the two-view mean teacher -----------------------------------------------------------------------------------
def test_random_mirror_dims_are_nonempty_subsets_of_the_axes():
    generator = torch.Generator().manual_seed(0)
    drawn = {random_mirror_dims((0, 1, 2), generator) for _ in range(200)}
    assert drawn == {(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)}
    assert random_mirror_dims(()) == ()


def test_mirror_view_maps_the_teacher_back_onto_the_students_voxels(trainer_paths):
    trainer = started("nnUNetTrainerMeanTeacherTwoView")
    trainer.consistency_view, trainer.teacher_noise_std = "mirror", 0.0
    data = next(trainer.dataloader_unlabeled)["data"]
    seen = []

    def voxelwise_teacher(x: torch.Tensor) -> torch.Tensor:  # a teacher whose output at a voxel is its input's
        seen.append(x)
        return torch.cat((x, -x), 1)

    trainer.teacher_logits = voxelwise_teacher
    for _ in range(10):
        assert torch.equal(trainer.teacher_probabilities(data), probabilities(torch.cat((data, -data), 1), False))
    flips = {dims for x in seen for dims in [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
             if torch.equal(x, torch.flip(data, dims))}
    assert len(flips) > 1 and not any(torch.equal(x, data) for x in seen)


def test_intensity_view_is_a_second_draw_of_nnunets_intensity_augmentation(trainer_paths):
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    trainer = make_trainer("nnUNetTrainerMeanTeacherTwoView")
    trainer.consistency_view = "intensity"
    trainer.on_train_start()
    steps = trainer.view_transforms
    assert [(type(t.transform).__name__, t.apply_probability) for t in steps] == [
        ("GaussianNoiseTransform", 0.1), ("GaussianBlurTransform", 0.2), ("MultiplicativeBrightnessTransform", 0.15),
        ("ContrastTransform", 0.15), ("SimulateLowResolutionTransform", 0.25), ("GammaTransform", 0.1),
        ("GammaTransform", 0.3)]  # nnU-Net's own, with its probabilities; no spatial transform, no mirroring
    data = next(trainer.dataloader_unlabeled)["data"]
    torch.manual_seed(0)
    view = apply_per_patch([RandomTransform(t.transform, 1.0) for t in steps], data)
    assert view.shape == data.shape and not torch.equal(view[0], data[0]) and not torch.equal(view[1], data[1])


def test_dropout_view_in_student_and_teacher_but_not_at_inference(trainer_paths):
    from nnunet_sassnet.errors import UserInputError
    from nnunet_sassnet.trainers import nnUNetTrainerMeanTeacherTwoView

    trainer = make_trainer("nnUNetTrainerMeanTeacherTwoView")
    for wrong in ("blur", "mirror+mirror"):
        cls = type("nnUNetTrainerWrongView", (nnUNetTrainerMeanTeacherTwoView,), {"consistency_view": wrong})
        with pytest.raises(UserInputError, match="consistency_view"):
            cls(plans={**trainer.plans_manager.plans, "continue_training": False}, configuration="3d_fullres",
                fold="all", dataset_json=trainer.dataset_json, device=torch.device("cpu"))
    trainer.consistency_view = "mirror+dropout"  # views combine
    assert trainer.views == {"mirror", "dropout"}
    trainer.initialize()
    keys = set(trainer.network.state_dict())
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        trainer.network.eval()  # nnU-Net's validation and inference
        assert torch.equal(trainer.network(x)[0], trainer.network(x)[0])
        trainer.network.train()
        assert not torch.equal(trainer.network(x)[0], trainer.network(x)[0])
        assert not trainer.teacher.training and not torch.equal(trainer.teacher(x), trainer.teacher(x))
    assert set(trainer.network.state_dict()) == keys  # hooks, no weights: checkpoints are unchanged
    plain = make_teacher(trainer.network)
    for handle in add_channel_dropout(plain, 0.5, always=False):
        handle.remove()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


# ---- the published balance ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,ce,dice,sdm", [("nnUNetTrainerDTCPublishedBalance", 0.0, 1.0, 0.3),
                                              ("nnUNetTrainerMeanTeacherTwoViewPublishedBalance", 0.5, 0.5, 0.0)])
def test_published_balance_is_the_published_supervised_loss(trainer_paths, name, ce, dice, sdm):
    from benchmarks.la_semisup.trainer_lookup import class_settings

    trainer = started(name)
    batch = next(trainer.dataloader_train)
    # the full-resolution output and target only: nnU-Net's own switch, in the loader and the network
    assert not trainer.enable_deep_supervision and torch.is_tensor(batch["target"])
    with torch.no_grad():
        seg = trainer.network(batch["data"])
        assert torch.is_tensor(seg)
        target = batch["target"]
        expected = ce * trainer.loss.ce(seg, target[:, 0].long()) + dice * trainer.loss.dc(seg, target)
        assert torch.allclose(trainer.loss(seg, target), expected)
    settings = class_settings(type(trainer))
    assert (settings["supervised_ce_weight"], settings["supervised_dice_weight"], settings["sdm_loss_weight"],
            settings["supervised_deep_supervision"]) == (ce, dice, sdm, False)


def test_gradient_ratio_benchmark_measures_settings_as_subclasses(trainer_paths):
    from benchmarks.gradient_ratio import parse_trainer_spec, trainer_class

    from nnunet_sassnet.trainers import nnUNetTrainerBCP, nnUNetTrainerMeanTeacherTwoView
    from nnunet_sassnet.trainers.published_loss import PublishedLossBalance

    name, overrides = parse_trainer_spec("nnUNetTrainerBCP:pretraining_fraction=0,supervised_ce_weight=0.5")
    assert (name, overrides) == ("nnUNetTrainerBCP", {"pretraining_fraction": 0, "supervised_ce_weight": 0.5})
    measured = trainer_class(name, overrides)  # the published balance's settings bring its mixin along
    assert issubclass(measured, nnUNetTrainerBCP) and issubclass(measured, PublishedLossBalance)
    assert measured.pretraining_fraction == 0 and measured.supervised_ce_weight == 0.5
    view = trainer_class(*parse_trainer_spec("nnUNetTrainerMeanTeacherTwoView:consistency_view='intensity'"))
    assert view.consistency_view == "intensity" and not issubclass(view, PublishedLossBalance)
    assert trainer_class("nnUNetTrainerMeanTeacherTwoView", {}) is nnUNetTrainerMeanTeacherTwoView


# ---- nnU-Net's own commands ------------------------------------------------------------------------------------
@pytest.mark.slow
# DTC + discriminator (DTC's consistency term with SASSNet's D on top) and DTC with the published balance (Dice alone,
# full-resolution output only: nnU-Net's deep supervision off); BCP and the two-view mean teacher go through the CLI
# in the test below (the one-view mean teacher's path is the two-view one's); every trainer's own step is tested
# in-process above
@pytest.mark.parametrize("base", ["nnUNetTrainerDTCSASSNet", "nnUNetTrainerDTCPublishedBalance"])
def test_trainer_trains_through_stock_cli_and_predicts(trainer_paths, tiny_dataset, smoke_dir, tmp_path, base):
    """nnUNetv2_train finds each trainer in a user's folder of nnUNet_extTrainer; nnU-Net's predictor serves it."""
    env = training_environment(tiny_dataset["env"])
    env["nnUNet_extTrainer"] = os.environ["nnUNet_extTrainer"]
    root, name = tiny_dataset["root"], tiny_dataset["dataset_name"]
    trainer = f"{base}_smoke"
    run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", trainer, "-p", SMALL_PLANS, "-device", "cpu"], env)
    model = root / "results" / name / f"{trainer}__{SMALL_PLANS}__3d_fullres"
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = checkpoint["sassnet"]
    assert checkpoint["trainer_name"] == trainer and state["current_iteration"] == 2 * 2
    if base == "nnUNetTrainerDTCSASSNet":
        assert state["discriminator_optimizer_state"]["state"], "the discriminator was never updated"
    log_text = "".join(p.read_text() for p in (model / "fold_0").glob("training_log_*.txt"))
    assert "unlabeled_losses" in log_text and ("dtc_losses" in log_text) == (base == "nnUNetTrainerDTCSASSNet")

    assert_fold_0_predicts(model, root / "raw" / name / "imagesTs", tmp_path / trainer)


def assert_fold_0_predicts(model: Path, images: Path, output: Path) -> None:
    """nnU-Net's predictor serves fold 0 of ``model`` on the tiny test images, in this process (its sequential mode,
    no worker processes): it finds the trainer by the name in the checkpoint and builds the network as
    nnUNetv2_predict does, at a fraction of the cost."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    assert type(predictor.network).__name__ == "SASSNetwork"
    output.mkdir()
    predictor.predict_from_files_sequential(str(images), str(output))
    for case in ("ts000", "ts001"):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{case}.nii.gz")))
        assert seg.shape == (24, 24, 24) and set(np.unique(seg)) <= {0, 1}, model.name


@pytest.mark.slow
# the two-view mean teacher with the published balance: the two-view path and nnU-Net's deep supervision switched off
@pytest.mark.parametrize("base", ["nnUNetTrainerBCP", "nnUNetTrainerMeanTeacherTwoViewPublishedBalance"])
def test_teacher_trainer_starts_from_nnunet_resumes_and_predicts_through_the_cli(trainer_paths, tiny_dataset,
                                                                                 smoke_dir, tmp_path, base):
    """From a stock nnU-Net model (-pretrained_weights, output layers included), stopped after epoch 0 (BCP: at the
    switch to self-training), continued with --c, then served by nnU-Net's predictor."""
    from test_pretrained_resenc import train_until_epoch_1

    env = training_environment(tiny_dataset["env"])
    env["nnUNet_extTrainer"] = os.environ["nnUNet_extTrainer"]
    root, name = tiny_dataset["root"], tiny_dataset["dataset_name"]
    trainer = f"{base}_smoke"
    stock = stock_checkpoint(tmp_path / "stock.pth")
    first = train_until_epoch_1(env, trainer, SMALL_PLANS, "-pretrained_weights", str(stock))
    assert f"Output layers from {stock}: loaded decoder.seg_layers.0" in first
    resumed = run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", trainer, "-p", SMALL_PLANS, "-device", "cpu",
                   "--c"], env).stdout
    assert "Epoch 0\n" not in resumed and "Training done." in resumed and "Output layers from" not in resumed
    # BCP's one epoch of pre-training ended with the stop; the resumed run makes the switch
    assert ("BCP: 2 pre-training iterations done" in resumed) == (base == "nnUNetTrainerBCP")
    model = root / "results" / name / f"{trainer}__{SMALL_PLANS}__3d_fullres"
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = checkpoint["sassnet"]
    assert state["current_iteration"] == 4 and state["teacher_weights"].keys() == checkpoint["network_weights"].keys()
    assert state.get("self_training_started", True)
    assert_fold_0_predicts(model, root / "raw" / name / "imagesTs", tmp_path / "pred")
