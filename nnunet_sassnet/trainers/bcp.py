"""Bidirectional copy-paste (BCP, Bai et al., CVPR 2023) inside nnU-Net, both of its stages in one run.

**Pre-training** (the first ``pretraining_fraction`` of the epochs): labeled patch ``i`` receives one random
cuboid (``copy_paste_size`` of every axis, BCP: 2/3) of labeled patch ``i - 1`` (the batch's last patch for the
first), as the published ``img_a * mask + img_b * (1 - mask)``; the target is the real label of every voxel and
the loss nnU-Net's own. No unlabeled patch, no teacher.

**The switch** (the first self-training step): the EMA teacher becomes a full copy of the student, output layers
included, as the published code loads the pre-trained model into both networks.

**Self-training**: each step pairs labeled patch ``i`` with unlabeled patch ``i`` and cuts one cuboid at the same
place in all of them:

* the first half of the pairs ("in"): the unlabeled patch's cuboid is pasted into the labeled patch;
* the other half ("out"): the labeled patch's cuboid is pasted into the unlabeled patch.

The student sees only these mixed patches. Their target is the label where a voxel comes from a labeled patch
and the EMA teacher's pseudo-label (computed on the unmixed unlabeled patch) where it comes from an unlabeled one.
The loss is nnU-Net's own (Dice+CE, or Dice+BCE for regions, with deep supervision) on each part, the other part
masked out through nnU-Net's ignore-label code path: ``L(labeled part) + w * L(pseudo-labeled part)`` (BCP: w =
0.5, constant). Pseudo-labels are the teacher's argmax (regions: sigmoid > 0.5 per region), optionally reduced to
the largest connected component of each class, as the published code does for LA.

One optimizer and nnU-Net's one poly learning-rate schedule run through both stages (the published code starts a
new SGD optimizer at its base learning rate for self-training); see :class:`nnUNetTrainerBCP` for why.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from scipy import ndimage
from torch import nn

from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.networks import unwrap_module
from nnunet_sassnet.trainers.mean_teacher import full_resolution, nnUNetTrainerEMATeacher
from nnunet_sassnet.trainers.output_layers import PretrainedOutputLayers

__all__ = ["nnUNetTrainerBCP", "cuboid_mask", "bidirectional_sources", "labeled_pair_sources", "mix",
           "pseudo_labels", "largest_component_per_class", "part_target", "pretraining_epochs"]


def cuboid_mask(spatial_shape: tuple[int, ...], size: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask of ``spatial_shape``, True inside one cuboid of ``int(size * s)`` (at least 1) voxels per axis.

    The cuboid lies at a uniformly random position entirely inside the patch.
    """
    mask = torch.zeros(spatial_shape, dtype=torch.bool, device=device)
    region = []
    for s in spatial_shape:
        length = min(s, max(1, int(s * size)))
        start = int(torch.randint(0, s - length + 1, (1,), generator=generator))
        region.append(slice(start, start + length))
    mask[tuple(region)] = True
    return mask


def bidirectional_sources(inside: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Which voxels of each mixed patch come from the labeled patch: (num_pairs, 1, *spatial), bool.

    Pairs ``0 .. ceil(n/2) - 1`` are "in" (labeled outside the cuboid), the others "out" (labeled inside it), as
    the published code splits its labeled and unlabeled batches into halves a and b.
    """
    num_in = math.ceil(num_pairs / 2)
    sources = inside.unsqueeze(0).repeat(num_pairs, *([1] * inside.ndim))
    sources[:num_in] = ~sources[:num_in]
    return sources.unsqueeze(1)


def labeled_pair_sources(inside: torch.Tensor, num_patches: int) -> torch.Tensor:
    """BCP's pre-training mix: which voxels of each mixed patch come from patch ``i`` itself (the others from patch
    ``i - 1``): (num_patches, 1, *spatial), bool, True outside the cuboid."""
    return (~inside).expand(num_patches, 1, *inside.shape)


def pretraining_epochs(fraction: float, num_epochs: int) -> int:
    """Epochs of BCP's pre-training stage: ``fraction`` of ``num_epochs``, rounded, at least 1 when ``fraction`` > 0
    and at most ``num_epochs - 1`` (a run has a self-training stage)."""
    if fraction <= 0 or num_epochs < 2:
        return 0
    return min(max(1, int(fraction * num_epochs + 0.5)), num_epochs - 1)


def mix(labeled: torch.Tensor, unlabeled: torch.Tensor, from_labeled: torch.Tensor) -> torch.Tensor:
    """Copy-paste: ``labeled`` where ``from_labeled`` (broadcast over channels), ``unlabeled`` elsewhere."""
    return torch.where(from_labeled, labeled, unlabeled)


def largest_component_per_class(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Keep, per class in ``classes``, only its largest 26-connected (8 in 2D) component; the rest becomes 0."""
    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for c in classes:
        components, count = ndimage.label(labels == c, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components != 0) & (components != sizes.argmax())] = 0
    return out


def pseudo_labels(logits: torch.Tensor, has_regions: bool, largest_component: bool = False) -> torch.Tensor:
    """Hard pseudo-labels in nnU-Net's target layout from full-resolution logits (N, C, ...).

    Labels: the argmax, (N, 1, ...). Regions: sigmoid > 0.5 per region, (N, R, ...). ``largest_component`` keeps
    the largest connected component of each foreground class (each region) per patch, on the CPU.
    """
    if has_regions:
        hard = (logits > 0).to(torch.float32)  # sigmoid(x) > 0.5 <=> x > 0
    else:
        hard = logits.argmax(1, keepdim=True).to(torch.float32)
    if not largest_component:
        return hard
    array = hard.cpu().numpy()
    for i in range(array.shape[0]):
        if has_regions:
            for r in range(array.shape[1]):
                array[i, r] = largest_component_per_class(array[i, r], [1])
        else:
            array[i, 0] = largest_component_per_class(array[i, 0], list(range(1, logits.shape[1])))
    return torch.from_numpy(array).to(logits.device)


def part_target(target: torch.Tensor, keep: torch.Tensor, has_regions: bool, ignore_value: int) -> torch.Tensor:
    """``target`` restricted to the voxels where ``keep`` (N, 1, ...) is True, in nnU-Net's ignore layout.

    Labels (N, 1, ...): the other voxels get ``ignore_value``. Regions (N, R, ...): a last channel is appended
    that is 1 where a voxel is ignored (what nnU-Net's ``DC_and_BCE_loss(use_ignore_label=True)`` reads).
    """
    if has_regions:
        return torch.cat((target, (~keep).to(target.dtype)), dim=1)
    return torch.where(keep, target, torch.full_like(target, ignore_value))


class nnUNetTrainerBCP(PretrainedOutputLayers, nnUNetTrainerEMATeacher):
    """BCP: labeled-labeled copy-paste pre-training, then copy-paste self-training with an EMA teacher.

    The published code runs 2,000 pre-training and 15,000 self-training iterations (12 % of the run). Here the
    pre-training stage is ``pretraining_fraction`` of the epochs (default 0.2): 2 of the LA benchmark's 12 epochs
    (500 of 3,000 steps), 200 of nnU-Net's default 1,000. nnU-Net learns fast: in the LA runs at 8 labels whose
    unlabeled term hardly acted (mean teacher, DTC: supervised training in effect), the pseudo-Dice was 0.86 after
    250 steps, 0.91 after 500 and 0.93 after 1,000: after 500 steps the teacher's pseudo-labels start near a
    Dice of 0.91 instead of 0.86 after 250 (12 % of 3,000 steps would be 1.4 epochs), and self-training keeps
    83 % of the run (published: 88 %).

    The optimizer and nnU-Net's poly schedule continue through the switch; the published code starts a new SGD
    optimizer at its base learning rate. nnU-Net tunes one poly decay per run, and its learning rate at the switch
    (0.8^0.9 = 0.82 of the initial one) is close to the published restart at the base rate (the published
    pre-training never decays: its first step is at 2,500 iterations). A new optimizer would also empty the
    momentum buffer, which with nnU-Net's momentum 0.99 (published: 0.9) averages about 100 steps: the first 100
    self-training steps would move the network far less. One optimizer also keeps ``--c`` to nnU-Net's own state.

    ``-pretrained_weights`` of an nnU-Net model with the same labels loads the output layers too (see
    :mod:`~nnunet_sassnet.trainers.output_layers`); with ``pretraining_fraction = 0`` self-training starts at once
    from that model (the teacher is its full copy).
    """

    #: fraction of the epochs spent in BCP's labeled-labeled pre-training stage (published: 2,000 of 17,000
    #: iterations); rounded to whole epochs, at least one when > 0; 0: self-training from the first step
    pretraining_fraction: float = 0.2
    #: edge of the pasted cuboid as a fraction of each patch axis (BCP: 2/3)
    copy_paste_size: float = 2 / 3
    #: weight w of the pseudo-labeled voxels' loss, constant (BCP: 0.5; the labeled voxels' loss has weight 1)
    pseudo_label_weight: float = 0.5
    #: keep only the largest connected component of each class of the pseudo-labels (BCP's code for LA: yes)
    pseudo_label_largest_component: bool = True
    #: BCP's teacher: a fixed decay 0.99 from the start (no UA-MT warm-up)
    teacher_ema_warmup: bool = False
    #: the SDM head's loss on the mixed patches (target: the SDM of the mixed label map); BCP has no SDM head
    sdm_loss_weight: float = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not 0 < self.copy_paste_size < 1:
            raise UserInputError(f"{self.__class__.__name__}: copy_paste_size must be between 0 and 1 (a fraction "
                                 f"of each patch axis), got {self.copy_paste_size}; set it in your trainer class")
        if not 0 <= self.pretraining_fraction < 1:
            raise UserInputError(f"{self.__class__.__name__}: pretraining_fraction must be in [0, 1) (a fraction of "
                                 f"the epochs), got {self.pretraining_fraction}; set it in your trainer class")
        self.masked_loss: nn.Module | None = None
        self.ds_downsampling: DownsampleSegForDSTransform | None = None
        #: whether the teacher was made from the pre-trained student (saved in checkpoints)
        self.self_training_started = False

    def initialize(self):
        super().initialize()
        unlabeled = self.unlabeled_batch_size or self.batch_size
        if unlabeled != self.batch_size or self.batch_size < 2:
            raise UserInputError(
                f"{self.__class__.__name__}: BCP pairs each labeled patch with one unlabeled patch and needs at least "
                f"one pair per direction, so it needs batch size >= 2 and unlabeled_batch_size equal to it (got "
                f"{self.batch_size} and {unlabeled}); set unlabeled_batch_size = None in your trainer class or use "
                f"plans with a batch size >= 2 per GPU")
        if self.label_manager.has_regions and self.label_manager.has_ignore_label:
            raise UserInputError(
                f"{self.__class__.__name__}: region-based labels with an ignore label are not supported (the mixed "
                f"patches' ignore channel); use labels without regions in dataset.json, or another trainer")
        # one past the last label: nnU-Net's own ignore label where the dataset has one, so the voxels it marks
        # stay ignored in both parts of a mixed patch
        self.ignore_value = self.label_manager.num_segmentation_heads
        self.masked_loss = self._build_masked_loss()
        scales = self._get_deep_supervision_scales()
        self.ds_downsampling = DownsampleSegForDSTransform(scales) if scales is not None else None

    def _build_masked_loss(self) -> nn.Module:
        """nnU-Net's own loss (same terms, deep-supervision weights, compile and DDP settings) with an ignore label.

        Built by nnU-Net's ``_build_loss`` under a label manager that declares ``ignore_value`` as the ignore label
        (regions: an ignore channel), so the masked parts of a mixed patch take nnU-Net's own ignore code path.
        """
        original = self.label_manager
        masked = copy.copy(original)
        masked._ignore_label = self.ignore_value
        self.label_manager = masked
        try:
            return self._build_loss()
        finally:
            self.label_manager = original

    # ---- the two stages -------------------------------------------------------------------------------------
    @property
    def switch_iteration(self) -> int:
        """The first self-training iteration: the pre-training stage's epochs times the iterations per epoch."""
        return pretraining_epochs(self.pretraining_fraction, self.num_epochs) * self.num_iterations_per_epoch

    def start_self_training(self) -> None:
        """The switch: the teacher becomes a full copy of the pre-trained student (output layers included)."""
        self.teacher.load_state_dict(unwrap_module(self.network).state_dict())
        self.self_training_started = True
        self.print_to_log_file(f"BCP: {self.current_iteration} pre-training iterations done; the teacher is now a "
                               f"copy of the student (output layers included) and self-training starts")

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "self_training_started": self.self_training_started}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        # checkpoints of the one-stage BCP, which self-trained from the first step, hold no flag
        self.self_training_started = bool(state.get("self_training_started", True))

    def unlabeled_weight(self, iteration: int) -> float:
        """BCP weighs the pseudo-labeled voxels with a constant (its code computes a ramp but does not use it)."""
        return self.pseudo_label_weight

    def unlabeled_loss(self, seg_output, sdm_output, data, num_labeled):
        raise NotImplementedError("BCP's loss is on mixed patches: see nnUNetTrainerBCP.train_step")

    # ---- the mixed batch ----------------------------------------------------------------------------------
    def deep_supervision_targets(self, target: torch.Tensor):
        """Full-resolution targets (N, C, ...) -> nnU-Net's target list, downsampled by nnU-Net's own transform."""
        if self.ds_downsampling is None:
            return target
        per_patch = [self.ds_downsampling(segmentation=t)["segmentation"] for t in target]
        return [torch.stack([p[s] for p in per_patch]) for s in range(len(per_patch[0]))]

    def mixed_batch(self, data_labeled: torch.Tensor, target_labeled: torch.Tensor, data_unlabeled: torch.Tensor,
                    pseudo: torch.Tensor, inside: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mixed images, their full-resolution label map and the two parts' targets (full resolution)."""
        from_labeled = bidirectional_sources(inside, data_labeled.shape[0])
        has_regions = self.label_manager.has_regions
        target = mix(target_labeled.to(pseudo.dtype), pseudo, from_labeled)
        return {"data": mix(data_labeled, data_unlabeled, from_labeled), "target": target,
                "from_labeled": from_labeled,
                "labeled_part": part_target(target, from_labeled, has_regions, self.ignore_value),
                "pseudo_part": part_target(target, ~from_labeled, has_regions, self.ignore_value)}

    def mixed_sdm_loss(self, sdm_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The SDM head's MSE against the SDM of the mixed label map (zero with ``sdm_loss_weight = 0``)."""
        if self.sdm_loss_weight > 0:
            return self.sdm_loss(sdm_output[:, self.sdm_channels].float(), target)
        # the head stays in the graph with a zero gradient: DDP requires every parameter to take part
        return sdm_output.float().sum() * 0.0

    def mixed_losses(self, seg_output, sdm_output: torch.Tensor, mixed: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """nnU-Net's loss on the labeled and on the pseudo-labeled voxels of the mixed patches, and the SDM loss."""
        labeled = self.masked_loss(seg_output, self.deep_supervision_targets(mixed["labeled_part"]))
        pseudo = self.masked_loss(seg_output, self.deep_supervision_targets(mixed["pseudo_part"]))
        return {"seg_loss": labeled, "unlabeled_loss": pseudo,
                "sdm_loss": self.mixed_sdm_loss(sdm_output, mixed["target"])}

    def pretraining_batch(self, data: torch.Tensor, target: torch.Tensor, inside: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
        """Labeled patch ``i`` with the cuboid ``inside`` of labeled patch ``i - 1``: images and labels."""
        own = labeled_pair_sources(inside, data.shape[0])
        return {"data": mix(data, torch.roll(data, 1, 0), own),
                "target": mix(target, torch.roll(target, 1, 0), own)}

    def pretraining_step(self, batch: dict) -> dict:
        """One step of BCP's pre-training: nnU-Net's loss on labeled-labeled copy-paste patches."""
        data = self._to_device(batch["data"])
        target = full_resolution(self._to_device(batch["target"]))
        inside = cuboid_mask(tuple(data.shape[2:]), self.copy_paste_size, device=self.device)
        mixed = self.pretraining_batch(data, target, inside)

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            seg, sdm = self.network(mixed["data"], return_sdm=True)
            seg_loss = self.loss(seg, self.deep_supervision_targets(mixed["target"]))
            sdm_loss = self.mixed_sdm_loss(sdm, mixed["target"])
            loss = seg_loss + self.sdm_loss_weight * sdm_loss
        skipped = self.step_network(loss)

        self.current_iteration += 1
        # no unlabeled term in this stage: its values are logged as missing, its weight as 0
        logged = self.to_host({"loss": loss, "seg_loss": seg_loss, "sdm_loss": sdm_loss,
                               "unlabeled_loss": float("nan"), "unlabeled_grad_ratio": float("nan"),
                               "skipped_network": skipped, **self.skip_counters(), "unlabeled_weight": 0.0})
        self.check_skips(logged)
        return logged

    def train_step(self, batch: dict) -> dict:
        if not self.self_training_started:
            if self.current_iteration < self.switch_iteration:
                return self.pretraining_step(batch)
            self.start_self_training()
        unlabeled = next(self.dataloader_unlabeled)
        data_labeled = self._to_device(batch["data"])
        target_labeled = full_resolution(self._to_device(batch["target"]))
        data_unlabeled = self._to_device(unlabeled["data"])
        weight = self.unlabeled_weight(self.current_iteration)

        pseudo = pseudo_labels(self.teacher_logits(data_unlabeled), self.label_manager.has_regions,
                               self.pseudo_label_largest_component)
        inside = cuboid_mask(tuple(data_labeled.shape[2:]), self.copy_paste_size, device=self.device)
        mixed = self.mixed_batch(data_labeled, target_labeled, data_unlabeled, pseudo, inside)

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            seg, sdm = self.network(mixed["data"], return_sdm=True)
            losses = self.mixed_losses(seg, sdm, mixed)
            supervised = losses["seg_loss"] + self.sdm_loss_weight * losses["sdm_loss"]
            loss = supervised + weight * losses["unlabeled_loss"]
        ratio = self.gradient_ratio(supervised, weight * losses["unlabeled_loss"]) if self._probe_this_step() \
            else float("nan")
        skipped = self.step_network(loss)

        self.update_teacher()
        self.current_iteration += 1
        logged = self.to_host({"loss": loss, **losses, "unlabeled_grad_ratio": ratio, "skipped_network": skipped,
                               **self.skip_counters(), "unlabeled_weight": weight})
        self.check_skips(logged)
        return logged
