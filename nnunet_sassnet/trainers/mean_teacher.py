"""Mean teacher inside nnU-Net: an exponential moving average (EMA) of the network teaches it on unlabeled patches.

:class:`nnUNetTrainerEMATeacher` holds the teacher that several methods share (mean teacher, bidirectional
copy-paste): a copy of the segmentation network without gradients, updated after every optimizer step as
``teacher = a * teacher + (1 - a) * student``, saved in the checkpoints and restored on ``--c``.
:class:`nnUNetTrainerMeanTeacher` adds the mean-teacher consistency (Tarvainen & Valpola 2017, as in UA-MT's and
SSL4MIS's 3D code): the teacher predicts the unlabeled patches with a little Gaussian noise on its input, and the
student's probabilities must match its own (MSE), weighted by the Gaussian ramp.

Inference uses the student (the network nnU-Net saves and ``nnUNetv2_predict`` loads), as the published codes
evaluate it: ``nnUNetv2_predict`` loads one set of weights per fold, and the teacher, an average of past students,
would be a second model to serve. Its weights are in the checkpoint (``"sassnet"`` -> ``"teacher_weights"``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.networks import unwrap_module
from nnunet_sassnet.trainers.consistency_views import (CONSISTENCY_VIEWS, add_channel_dropout, apply_per_patch,
                                                       intensity_transforms, random_mirror_dims)
from nnunet_sassnet.trainers.output_layers import PretrainedOutputLayers
from nnunet_sassnet.trainers.semisupervised import nnUNetTrainerSemiSupervised

__all__ = ["nnUNetTrainerEMATeacher", "nnUNetTrainerMeanTeacher", "nnUNetTrainerMeanTeacherTwoView", "make_teacher",
           "ema_update", "full_resolution", "probabilities"]


def full_resolution(seg_output) -> torch.Tensor:
    """The full-resolution segmentation logits (nnU-Net's deep supervision returns a list, largest first)."""
    return seg_output[0] if isinstance(seg_output, (list, tuple)) else seg_output


def probabilities(logits: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """Per-voxel probabilities as nnU-Net's inference computes them: softmax over labels, sigmoid per region."""
    return torch.sigmoid(logits) if has_regions else torch.softmax(logits, dim=1)


def make_teacher(student: nn.Module) -> nn.Module:
    """A copy of ``student`` (unwrapped from DDP/compile) without gradients, in evaluation mode.

    nnU-Net's U-Net has no dropout and instance norm without running statistics, so evaluation mode changes
    nothing there; it keeps the teacher a fixed function of its weights for other architectures. Its decoder
    returns only the full-resolution output: the teacher's lower deep-supervision outputs are never used.
    """
    teacher = copy.deepcopy(unwrap_module(student))
    teacher.requires_grad_(False)
    teacher.eval()
    if hasattr(teacher, "decoder") and hasattr(teacher.decoder, "deep_supervision"):
        teacher.decoder.deep_supervision = False
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for every parameter; buffers are copied.

    Parameters are matched by name, so the SDM head and any other part take part like the rest.
    """
    student = unwrap_module(student)
    student_params = dict(student.named_parameters())
    names = [name for name, _ in teacher.named_parameters()]
    teacher_params = [p for _, p in teacher.named_parameters()]
    # one fused kernel per tensor group instead of a Python loop of small kernels
    torch._foreach_lerp_(teacher_params, [student_params[n].detach() for n in names], 1.0 - decay)
    student_buffers = dict(student.named_buffers())
    for name, buffer in teacher.named_buffers():
        buffer.copy_(student_buffers[name])


class nnUNetTrainerEMATeacher(nnUNetTrainerSemiSupervised):
    """Base of the trainers with an EMA teacher (not a method of its own).

    The teacher starts as a copy of the student when training starts (after ``-pretrained_weights`` were
    loaded), or as saved in the checkpoint when a run continues (``--c``).
    """

    #: EMA decay a of the teacher (UA-MT, SSL4MIS and BCP: 0.99)
    teacher_ema_decay: float = 0.99
    #: UA-MT's warm-up: a_t = min(1 - 1 / (t + 1), a), the true average of the students while t < 1 / (1 - a)
    teacher_ema_warmup: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not 0.0 <= self.teacher_ema_decay < 1.0:
            raise ValueError(f"teacher_ema_decay must be in [0, 1), got {self.teacher_ema_decay}")
        self.teacher: nn.Module | None = None
        self._teacher_restored = False

    def initialize(self):
        super().initialize()
        self.teacher = make_teacher(self.network)

    def on_train_start(self):
        super().on_train_start()
        if not self._teacher_restored:
            # the student may have changed since initialize(): nnU-Net loads -pretrained_weights after it
            self.teacher.load_state_dict(unwrap_module(self.network).state_dict())

    def teacher_decay(self, iteration: int) -> float:
        """The EMA decay used after training iteration ``iteration`` (counted from 0)."""
        if self.teacher_ema_warmup:
            return min(1.0 - 1.0 / (iteration + 1), self.teacher_ema_decay)
        return self.teacher_ema_decay

    @torch.no_grad()
    def teacher_logits(self, data: torch.Tensor) -> torch.Tensor:
        """The teacher's full-resolution segmentation logits (float32) for ``data``, under nnU-Net's autocast."""
        with self._autocast():
            return full_resolution(self.teacher(data)).float()

    def update_teacher(self) -> None:
        """One EMA step towards the student (after the optimizer step of ``current_iteration``)."""
        ema_update(self.teacher, self.network, self.teacher_decay(self.current_iteration))

    def after_network_step(self, seg_output, sdm_output, data, num_labeled):
        self.update_teacher()
        return {}

    def extra_checkpoint_state(self) -> dict:
        return {**super().extra_checkpoint_state(), "teacher_weights": self.teacher.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        self.teacher.load_state_dict(state["teacher_weights"])
        self._teacher_restored = True


class nnUNetTrainerMeanTeacher(nnUNetTrainerEMATeacher):
    """Mean teacher: the student's probabilities on unlabeled patches match the EMA teacher's (MSE, ramped).

    The supervised part is this package's (nnU-Net's Dice+CE with deep supervision + ``sdm_loss_weight`` x SDM
    MSE), so that the trainers differ in their unlabeled term only; ``sdm_loss_weight = 0`` gives the published
    supervised loss.
    """

    #: maximum weight of the consistency term, reached at the end by the Gaussian ramp (UA-MT, SSL4MIS: 0.1)
    unlabeled_weight_max: float = 0.1
    #: the teacher's input noise, as UA-MT: clip(N(0, std^2), -clip, clip) on nnU-Net's normalised intensities
    teacher_noise_std: float = 0.1
    teacher_noise_clip: float = 0.2

    def teacher_input(self, data: torch.Tensor) -> torch.Tensor:
        """The unlabeled patches as the teacher sees them: the same augmented patches plus clipped noise."""
        if self.teacher_noise_std <= 0:
            return data
        noise = torch.randn_like(data) * self.teacher_noise_std
        return data + noise.clamp(-self.teacher_noise_clip, self.teacher_noise_clip)

    def teacher_probabilities(self, data: torch.Tensor) -> torch.Tensor:
        """The consistency target: the teacher's probabilities for the unlabeled patches ``data``."""
        return probabilities(self.teacher_logits(self.teacher_input(data)), self.label_manager.has_regions)

    def unlabeled_loss(self, seg_output, sdm_output, data, num_labeled):
        """MSE between the student's and the teacher's probabilities on the unlabeled patches."""
        target = self.teacher_probabilities(data[num_labeled:])
        student = probabilities(full_resolution(seg_output)[num_labeled:].float(), self.label_manager.has_regions)
        return torch.mean((student - target) ** 2), {}


class nnUNetTrainerMeanTeacherTwoView(PretrainedOutputLayers, nnUNetTrainerMeanTeacher):
    """Mean teacher whose teacher sees another view of each unlabeled patch (see
    :mod:`~nnunet_sassnet.trainers.consistency_views`); otherwise :class:`nnUNetTrainerMeanTeacher`.

    ``-pretrained_weights`` of an nnU-Net model with the same labels loads the output layers too, so the teacher
    (a copy of the loaded student) predicts from the first step.
    """

    #: what makes the teacher's view differ from the student's: "mirror", "intensity", "dropout", or several
    #: joined by "+" (e.g. "mirror+intensity")
    consistency_view: str = "mirror"
    #: channel dropout of the "dropout" view (UA-MT's V-Net: 0.5)
    consistency_dropout: float = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        views = self.consistency_view.split("+")
        if any(v not in CONSISTENCY_VIEWS for v in views) or len(set(views)) != len(views):
            raise UserInputError(f"{self.__class__.__name__}: consistency_view must be one of {CONSISTENCY_VIEWS} or "
                                 f"several of them joined by '+', got {self.consistency_view!r}; set it in your "
                                 f"trainer class")
        self.view_transforms: list = []

    @property
    def views(self) -> frozenset[str]:
        """The views of ``consistency_view``."""
        return frozenset(self.consistency_view.split("+"))

    def initialize(self):
        super().initialize()
        if "dropout" in self.views:
            add_channel_dropout(self.network, self.consistency_dropout, always=False)
            add_channel_dropout(self.teacher, self.consistency_dropout, always=True)

    def on_train_start(self):
        super().on_train_start()
        # nnU-Net settles its augmentation (and the mirror axes it trains and predicts with) with the data loaders
        if "intensity" in self.views:
            self.view_transforms = intensity_transforms(self.unlabeled_transforms())
        if "mirror" in self.views and not self.inference_allowed_mirroring_axes:
            raise UserInputError(f"{self.__class__.__name__}: the mirror view needs nnU-Net's mirror axes and this "
                                 f"trainer has none; set consistency_view = 'intensity' in your trainer class")

    def teacher_probabilities(self, data: torch.Tensor) -> torch.Tensor:
        if "intensity" in self.views:
            data = apply_per_patch(self.view_transforms, data)
        if "mirror" not in self.views:
            return super().teacher_probabilities(data)
        dims = random_mirror_dims(self.inference_allowed_mirroring_axes)
        logits = self.teacher_logits(self.teacher_input(torch.flip(data, dims)))
        return probabilities(torch.flip(logits, dims), self.label_manager.has_regions)
