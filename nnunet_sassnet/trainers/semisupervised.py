"""The semi-supervised step shared by this package's trainers: labeled and unlabeled patches in one batch.

:class:`nnUNetTrainerSemiSupervised` adds to :class:`~nnunet_sassnet.trainers.sdm_trainer.nnUNetTrainerSDM`

* an unlabeled patch stream through nnU-Net's own loader and augmentation (see :mod:`nnunet_sassnet.unlabeled`);
* the iteration count ``t`` (saved in checkpoints) and the Gaussian ramp ``exp(-5 (1 - t/T)^2)`` of the
  unlabeled term's weight;
* a training step as a template: one forward of labeled + unlabeled patches, the supervised losses on the
  labeled ones, ``weight(t) * unlabeled_loss(...)`` from the subclass, one update, then
  :meth:`after_network_step` (a discriminator or teacher update);
* on a few steps per epoch, the ratio of the unlabeled term's gradient norm to the supervised one on the
  shared layers, logged per epoch: it tells whether the unlabeled term moves the network at all.

Subclasses implement :meth:`unlabeled_loss` (and optionally :meth:`unlabeled_term_context`,
:meth:`after_network_step`, :meth:`extra_checkpoint_state`, :meth:`load_extra_checkpoint_state`).
"""
from __future__ import annotations

import contextlib
import math

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from torch import distributed as dist

from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_sassnet.atomic_files import save_torch_atomic
from nnunet_sassnet.networks import unwrap_module
from nnunet_sassnet.trainers.cascade import previous_stage_of_unlabeled
from nnunet_sassnet.trainers.ignore_label import without_ignore_label
from nnunet_sassnet.trainers.sdm_trainer import nnUNetTrainerSDM
from nnunet_sassnet.unlabeled import ensure_preprocessed, make_unlabeled_loader, unlabeled_preprocessed_folder

__all__ = ["nnUNetTrainerSemiSupervised", "gaussian_rampup", "CHECKPOINT_KEY"]

#: key of this package's own training state in a checkpoint (nnU-Net's keys stay as nnU-Net writes them)
CHECKPOINT_KEY = "sassnet"


def keep_compiled_graphs_retainable() -> None:
    """Let torch.compile'd graphs be backpropagated through more than once (the gradient probe's retained graph).

    torch.compile's autograd reuses ("donates") the memory of tensors saved for the backward pass, and then refuses
    ``retain_graph=True`` ("compiled with non-empty donated buffers"). It is a process-wide setting that must be
    made before the first compiled forward; the probe runs on 2 steps per epoch, the cost is a little memory.
    """
    import torch._functorch.config as functorch_config

    if getattr(functorch_config, "donated_buffer", False):
        functorch_config.donated_buffer = False


def gaussian_rampup(iteration: int, total_iterations: int) -> float:
    """SASSNet's warm-up ``exp(-5 (1 - t/T)^2)``: 0.0067 at the start, 1 at the end.

    The published code's ``sigmoid_rampup(iter // 150, 40)`` is this function over its 6,000 iterations.
    """
    if total_iterations <= 0:
        return 1.0
    t = min(max(iteration / total_iterations, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


class nnUNetTrainerSemiSupervised(nnUNetTrainerSDM):
    """Base of the semi-supervised trainers (not a method of its own: :meth:`unlabeled_loss` is abstract).

    Unlabeled scans: ``nnUNet_raw/DatasetXXX/imagesUnlabeled`` (see :mod:`nnunet_sassnet.unlabeled`).
    """

    #: unlabeled patches per step (per GPU); None: as many as labeled ones
    unlabeled_batch_size: int | None = None
    #: maximum weight of the unlabeled term, reached at the end of the run by the Gaussian ramp
    unlabeled_weight_max: float = 0.1
    #: steps per epoch (the first ones) on which the gradient norms of the two terms are measured; 0: never.
    #: Each costs two extra backward passes
    gradient_probe_steps_per_epoch: int = 2

    extra_log_keys = ("seg_losses", "sdm_losses", "unlabeled_losses", "unlabeled_weights",
                      "unlabeled_grad_ratios", "skipped_steps_network")
    step_to_log_keys = {"seg_loss": "seg_losses", "sdm_loss": "sdm_losses", "unlabeled_loss": "unlabeled_losses",
                        "unlabeled_weight": "unlabeled_weights", "unlabeled_grad_ratio": "unlabeled_grad_ratios",
                        "skipped_network": "skipped_steps_network"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        #: training iterations done so far: the t of the ramp; continues on resume
        self.current_iteration = 0
        self.dataloader_unlabeled = None
        #: the lease on the unlabeled data's version this run reads (rank 0; see :func:`ensure_preprocessed`)
        self._unlabeled_data = None
        #: cascade: the previous stage's segmentations of the unlabeled scans (see unlabeled.previous_stage)
        self.unlabeled_previous_stage_folder = None
        self.unlabeled_preprocessed_folder = unlabeled_preprocessed_folder(
            self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier) \
            if self.preprocessed_dataset_folder_base is not None else None

    def initialize(self):
        if self.gradient_probe_steps_per_epoch > 0 and self._compiles_anything():
            keep_compiled_graphs_retainable()  # before anything is compiled: the probe goes through it twice
        super().initialize()

    def _compiles_anything(self) -> bool:
        """Whether this trainer torch.compiles a network the gradient probe backpropagates through (the U-Net by
        nnU-Net's rule; subclasses add their own networks)."""
        return self._do_i_compile()

    # ---- schedule -----------------------------------------------------------------------------------------
    @property
    def total_iterations(self) -> int:
        """T of the ramp: all training iterations of the run as configured now."""
        return self.num_epochs * self.num_iterations_per_epoch

    def unlabeled_weight(self, iteration: int) -> float:
        """The unlabeled term's weight at training iteration ``iteration``: max * Gaussian ramp."""
        return self.unlabeled_weight_max * gaussian_rampup(iteration, self.total_iterations)

    # ---- unlabeled data -----------------------------------------------------------------------------------
    def _ensure_unlabeled_data(self) -> None:
        """Refuse a dataset without unlabeled scans; preprocess them when missing, stale or damaged; lease them.

        Rank 0 does it (other runs of the dataset wait for one another, see :func:`ensure_preprocessed`) and holds
        the lease for the run; the other ranks read the version it names.
        """
        if self.local_rank == 0:
            self._unlabeled_data = ensure_preprocessed(
                self.plans_manager.dataset_name, self.configuration_name, self.plans_manager.plans_name,
                num_processes=max(1, get_allowed_n_proc_DA()), log=self.print_to_log_file)
            folder = [self._unlabeled_data.folder, previous_stage_of_unlabeled(self, self._unlabeled_data.folder)]
        else:
            folder = [None, None]
        if self.is_ddp:
            dist.broadcast_object_list(folder, src=0)
        self.unlabeled_preprocessed_folder, self.unlabeled_previous_stage_folder = folder

    def get_dataloaders(self):
        self._ensure_unlabeled_data()
        dataloader_train, dataloader_val = super().get_dataloaders()
        self.dataloader_unlabeled = self._unlabeled_dataloader()
        return dataloader_train, dataloader_val

    def unlabeled_transforms(self, configured: tuple | None = None):
        """nnU-Net's training augmentation for the unlabeled patches (no deep-supervision targets, no regions).

        ``configured``: what ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` returned, if at hand.
        """
        rotation, dummy_2d, _, mirror_axes = configured or \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)

    def _unlabeled_dataloader(self):
        """nnU-Net's own loader and training augmentation over ``unlabeled_preprocessed_folder``; random patches."""
        configured = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # with augment_on_device the workers only load and crop, and both streams are augmented on the device
        transforms = None if self.augments_on_device else self.unlabeled_transforms(configured)
        loader = make_unlabeled_loader(self.unlabeled_preprocessed_folder, self.unlabeled_batch_size or self.batch_size,
                                       configured[2], self.configuration_manager.patch_size,
                                       without_ignore_label(self.label_manager), transforms, get_allowed_n_proc_DA(),
                                       pin_memory=self.device.type == "cuda",
                                       log_file=self.log_file if self.local_rank == 0 else None,
                                       previous_stage_folder=self.unlabeled_previous_stage_folder)
        return self.augmented_on_device(loader, labeled=False)

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()
        # the version read is no longer needed: a newer one may now replace it on disk
        if self._unlabeled_data is not None:
            self._unlabeled_data.release()

    # ---- one training step --------------------------------------------------------------------------------
    def unlabeled_loss(self, seg_output, sdm_output: torch.Tensor, data: torch.Tensor, num_labeled: int
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The unlabeled term (before its weight) and extra values to log, from the step's one forward.

        ``seg_output``/``sdm_output`` cover the whole batch, labeled patches first (``num_labeled`` of them),
        then the unlabeled ones; ``data`` is the batch's input.
        """
        raise NotImplementedError(f"{self.__class__.__name__} must implement unlabeled_loss")

    def unlabeled_term_context(self) -> contextlib.AbstractContextManager:
        """Context around the forward and backward of the network's step (e.g. a frozen discriminator)."""
        return contextlib.nullcontext()

    def after_network_step(self, seg_output, sdm_output: torch.Tensor, data: torch.Tensor, num_labeled: int
                           ) -> dict[str, torch.Tensor]:
        """Called after the network's update with the step's detached outputs; returns values to log."""
        return {}

    def _probe_this_step(self) -> bool:
        # DDP: autograd.grad outside the reducer's backward is not supported by DDP; the ratio is not measured
        return (not self.is_ddp and self.gradient_probe_steps_per_epoch > 0
                and self.current_iteration % self.num_iterations_per_epoch < self.gradient_probe_steps_per_epoch)

    def gradient_ratio(self, supervised: torch.Tensor, weighted_unlabeled: torch.Tensor) -> torch.Tensor:
        """||grad of the weighted unlabeled term|| / ||grad of the supervised loss|| on the shared layers.

        Shared layers: the U-Net's encoder and decoder stages (not the output layers, which only one of the two
        terms reaches). Both losses are scaled by the grad scaler first: under fp16 autocast a weight of 1e-3
        would otherwise let the unlabeled gradient underflow to 0; the scale cancels out in the ratio.
        """
        params = [p for name, p in unwrap_module(self.network).named_parameters()
                  if p.requires_grad and "seg_layers" not in name and not name.startswith("sdm_head")]

        def norm(loss: torch.Tensor) -> torch.Tensor:
            grads = torch.autograd.grad(self.grad_scaler.scale(loss), params, retain_graph=True,
                                        allow_unused=True)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=self.device)

        return norm(weighted_unlabeled) / norm(supervised)

    def train_step(self, batch: dict) -> dict:
        unlabeled = next(self.dataloader_unlabeled)
        data_labeled = self._to_device(batch["data"])
        target = self._to_device(batch["target"])
        data_unlabeled = self._to_device(unlabeled["data"])
        num_labeled = data_labeled.shape[0]
        data = torch.cat((data_labeled, data_unlabeled))
        weight = self.unlabeled_weight(self.current_iteration)

        self.optimizer.zero_grad(set_to_none=True)
        with self.unlabeled_term_context():
            with self._autocast():
                seg, sdm = self.network(data, return_sdm=True)
                losses = self.supervised_losses(seg, sdm, target, num_labeled)
                supervised = self.supervised_loss(losses)
                unlabeled_loss, extra = self.unlabeled_loss(seg, sdm, data, num_labeled)
                loss = supervised + weight * unlabeled_loss
            ratio = self.gradient_ratio(supervised, weight * unlabeled_loss) if self._probe_this_step() \
                else float("nan")
            skipped = self.step_network(loss)

        detached_seg = [s.detach() for s in seg] if isinstance(seg, (list, tuple)) else seg.detach()
        after = self.after_network_step(detached_seg, sdm.detach(), data, num_labeled)
        self.current_iteration += 1
        logged = self.to_host({"loss": loss, **losses, "unlabeled_loss": unlabeled_loss, **extra, **after,
                               "unlabeled_grad_ratio": ratio, "skipped_network": skipped, **self.skip_counters(),
                               "unlabeled_weight": weight})
        self.check_skips(logged)
        return logged

    # ---- checkpoints --------------------------------------------------------------------------------------
    def extra_checkpoint_state(self) -> dict:
        """This package's training state saved beside nnU-Net's (subclasses add their networks)."""
        return {"current_iteration": self.current_iteration}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.current_iteration = int(state["current_iteration"])

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus :meth:`extra_checkpoint_state` under ``"sassnet"``."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            super().save_checkpoint(filename)  # logs that checkpointing is disabled
            return
        # nnU-Net writes its dictionary straight to disk, so its entries are assembled here the same way
        checkpoint = {
            "network_weights": unwrap_module(self.network).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: self.extra_checkpoint_state(),
        }
        save_torch_atomic(checkpoint, filename)  # a kill mid-write leaves the old checkpoint

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        # nnU-Net 2.8's load_checkpoint accepts only a file name (its dict branch is broken), so the file is
        # read twice: by nnU-Net for its part, here for ours
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            self.print_to_log_file(f"The checkpoint holds no {self.__class__.__name__} state (another trainer wrote "
                                   f"it): extra networks start fresh and the ramp continues from the epoch")
            self.current_iteration = self.current_epoch * self.num_iterations_per_epoch
            return
        self.load_extra_checkpoint_state(state)
