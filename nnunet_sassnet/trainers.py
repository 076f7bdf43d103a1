"""nnU-Net trainers: SASSNet (semi-supervised, shape-aware) and its labeled-only ablation with the SDM head.

* :class:`nnUNetTrainerSDM`: nnU-Net's training plus the SDM head and ``alpha * MSE(SDM)`` on labeled patches.
* :class:`nnUNetTrainerSASSNet`: that, plus unlabeled patches in every step, a discriminator telling labeled
  from unlabeled SDMs, and the generator term ``-beta(t) * log D(X_u, S_u)``.

Both reuse nnU-Net's loop, data loader, augmentation, loss, checkpoints and inference; they override hooks.
Settings are class attributes, so a variant is a short subclass (see the README), or see
:func:`trainer_variant` for nnU-Net's schedule settings (epochs, iterations), which nnU-Net sets in
``__init__``.
"""
from __future__ import annotations

import math
import os
import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_sassnet.errors import UserInputError, install_excepthook
from nnunet_sassnet.networks import SASSNetwork, SDMDiscriminator, discriminator_strides, unwrap_module
from nnunet_sassnet.progress import BETA_KEY, SASSNetLocalLogger
from nnunet_sassnet.sdm import signed_distance_maps
from nnunet_sassnet.unlabeled import (UNLABELED_IMAGES_FOLDER, compute_stamp, list_unlabeled_cases,
                                      preprocess_unlabeled, unlabeled_data_is_current,
                                      unlabeled_preprocessed_folder)

__all__ = ["nnUNetTrainerSDM", "nnUNetTrainerSASSNet", "trainer_variant", "gaussian_rampup",
           "NonFiniteLossError"]

install_excepthook()


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had non-finite losses; the run stops instead of going on."""


def gaussian_rampup(iteration: int, total_iterations: int) -> float:
    """SASSNet's warm-up ``exp(-5 (1 - t/T)^2)``: 0.0067 at the start, 1 at the end."""
    if total_iterations <= 0:
        return 1.0
    t = min(max(iteration / total_iterations, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


class nnUNetTrainerSDM(nnUNetTrainer):
    """nnU-Net + SASSNet's SDM head, trained on labeled patches only (the ablation without unlabeled data)."""

    #: weight alpha of the SDM regression loss (paper: 0.3)
    sdm_loss_weight: float = 0.3
    #: SDM distances in mm ("physical") or voxels ("voxel", the published code); identical on isotropic data
    sdm_units: str = "physical"

    #: a step whose loss is not finite is skipped (and counted); after this many in a row the run stops
    max_consecutive_skipped_steps: int = 50

    #: per-epoch values logged and plotted in addition to nnU-Net's
    extra_log_keys: tuple[str, ...] = ("seg_losses", "sdm_losses", "skipped_steps_network")
    #: the networks whose updates are skipped on non-finite losses
    updated_networks: tuple[str, ...] = ("network",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net's DDP branch assumes CUDA; with gloo on the CPU the requested device stays
            self.device = device
            self.grad_scaler = None
        if self.sdm_units not in ("physical", "voxel"):
            raise ValueError(f"sdm_units must be 'physical' or 'voxel', got {self.sdm_units!r}")
        self.logger.local_logger = SASSNetLocalLogger(self.extra_log_keys)

    # ---- network ------------------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        unet = get_network_from_plans(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels, num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)
        return SASSNetwork(unet, num_output_channels)

    def initialize(self):
        if self.is_cascaded:
            raise NotImplementedError(
                f"{self.__class__.__name__} does not support cascade configurations yet "
                f"({self.configuration_name}); train 3d_fullres, 3d_lowres or 2d")
        if self.label_manager.has_ignore_label:
            raise NotImplementedError(
                f"{self.__class__.__name__} does not support datasets with an ignore label yet (sparse "
                f"annotations); SDM targets need complete labels")
        cpu_ddp = self.is_ddp and self.device.type == "cpu"
        if cpu_ddp:
            self.is_ddp = False  # nnU-Net's initialize would wrap the network with CUDA device ids
        try:
            super().initialize()
        finally:
            self.is_ddp = self.is_ddp or cpu_ddp
        if cpu_ddp:
            self._set_batch_size_and_oversample()  # this rank's share of the batch, as nnU-Net splits it
            self.network = nn.parallel.DistributedDataParallel(self.network)
            self.loss = self._build_loss()
        # SDM channel c belongs to segmentation output c; with labels, channel 0 (background) is not used.
        # A slice, not a list: indexing with a list copies an index tensor to the GPU, a synchronisation
        first = 0 if self.label_manager.has_regions else 1
        self.sdm_channels = slice(first, self.label_manager.num_segmentation_heads)
        self.num_sdm_channels = self.label_manager.num_segmentation_heads - first
        spacing = self.configuration_manager.spacing
        self.sdm_spacing = tuple(float(s) for s in spacing) if self.sdm_units == "physical" else None
        if self.grad_scaler is None:
            # nnU-Net has no scaler on the CPU; its found-inf check is what skips an update whose loss is not
            # finite, so the CPU gets one too (the scale cancels out before clipping and the step)
            self.grad_scaler = torch.GradScaler("cpu")
        # consecutive skipped steps per network, kept on the device: reading them costs no extra sync
        self._consecutive_skips = {name: torch.zeros((), device=self.device) for name in self.updated_networks}

    # ---- one training step --------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _to_device(self, x):
        if isinstance(x, list):
            return [i.to(self.device, non_blocking=True) for i in x]
        return x.to(self.device, non_blocking=True)

    def sdm_targets(self, target: torch.Tensor) -> torch.Tensor:
        """SDM targets (N, K, *spatial) of an augmented full-resolution target patch batch.

        ``target`` is nnU-Net's target: (N, 1, ...) label maps, or (N, R, ...) binary regions.
        """
        with torch.no_grad():
            if self.label_manager.has_regions:
                masks = target[:, self.sdm_channels].bool()
            else:
                masks = torch.cat([target[:, :1] == c for c in range(self.sdm_channels.start,
                                                                      self.sdm_channels.stop)], dim=1)
            n, k = masks.shape[:2]
            sdm = signed_distance_maps(masks.reshape(n * k, *masks.shape[2:]), self.sdm_spacing)
            return sdm.to(target.device).reshape(masks.shape)

    def supervised_losses(self, seg_output, sdm_output: torch.Tensor, target, num_labeled: int
                          ) -> dict[str, torch.Tensor]:
        """nnU-Net's segmentation loss and the SDM MSE on the first ``num_labeled`` patches of the outputs."""
        if isinstance(seg_output, (list, tuple)):
            seg_labeled = [s[:num_labeled] for s in seg_output]
            full_res_target = target[0]
        else:
            seg_labeled = seg_output[:num_labeled]
            full_res_target = target
        seg_loss = self.loss(seg_labeled, target)
        sdm_pred = sdm_output[:num_labeled, self.sdm_channels].float()
        sdm_loss = F.mse_loss(sdm_pred, self.sdm_targets(full_res_target))
        return {"seg_loss": seg_loss, "sdm_loss": sdm_loss}

    def step_network(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward and optimizer step for the segmentation network, as nnU-Net does it.

        A non-finite loss gives non-finite gradients, which the grad scaler's found-inf check skips. Returns
        the step's skip flag (a device tensor, 1.0 if the loss was not finite).
        """
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return self.count_skip("network", loss)

    def count_skip(self, network: str, loss: torch.Tensor) -> torch.Tensor:
        """Update the consecutive-skip counter of ``network``; return this step's skip flag (on the device)."""
        skipped = (~torch.isfinite(loss.detach())).float()
        self._consecutive_skips[network] = (self._consecutive_skips[network] + 1.0) * skipped
        return skipped

    def skip_counters(self) -> dict[str, torch.Tensor]:
        return {f"consecutive_skips_{name}": count for name, count in self._consecutive_skips.items()}

    def check_skips(self, logged: dict) -> None:
        """Stop with a checkpoint after too many consecutive non-finite steps (values already on the host)."""
        for name in self.updated_networks:
            count = int(logged[f"consecutive_skips_{name}"])
            if count >= self.max_consecutive_skipped_steps:
                checkpoint = os.path.join(self.output_folder, "checkpoint_latest.pth")
                self.save_checkpoint(checkpoint)
                message = (f"{count} consecutive training steps had a non-finite loss for the {name}; their "
                           f"updates were skipped, so the weights are still finite and were saved to "
                           f"{checkpoint}. Check the data for NaN/inf values, or lower the learning rates, then "
                           f"continue with --c")
                self.print_to_log_file(message)
                raise NonFiniteLossError(message)

    @staticmethod
    def to_host(values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Move every logged value to the host in one transfer (one synchronisation per step)."""
        keys = list(values)
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).cpu().numpy()
        return {k: stacked[i] for i, k in enumerate(keys)}

    def train_step(self, batch: dict) -> dict:
        data = self._to_device(batch["data"])
        target = self._to_device(batch["target"])
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            seg, sdm = self.network(data, return_sdm=True)
            losses = self.supervised_losses(seg, sdm, target, data.shape[0])
            loss = losses["seg_loss"] + self.sdm_loss_weight * losses["sdm_loss"]
        skipped = self.step_network(loss)
        logged = self.to_host({"loss": loss, **losses, "skipped_network": skipped, **self.skip_counters()})
        self.check_skips(logged)
        return logged

    # ---- logging ------------------------------------------------------------------------------------------
    def _epoch_mean(self, outputs: dict, key: str) -> float:
        values = np.asarray(outputs[key], dtype=np.float64)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            values = np.concatenate([np.atleast_1d(g) for g in gathered])
        return float(np.nanmean(values)) if values.size else float("nan")

    # map: key returned by train_step -> logger key (epoch means; skip counts are epoch sums)
    step_to_log_keys: dict[str, str] = {"seg_loss": "seg_losses", "sdm_loss": "sdm_losses",
                                        "skipped_network": "skipped_steps_network"}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for step_key, log_key in self.step_to_log_keys.items():
            value = self._epoch_mean(outputs, step_key)
            if log_key.startswith("skipped_steps"):
                value = int(round(value * len(train_outputs)))  # a count: the mean times the steps
            self.logger.log(log_key, value, self.current_epoch)

    def on_epoch_end(self):
        parts = []
        for log_key in self.step_to_log_keys.values():
            value = self.logger.get_value(log_key, step=-1)
            parts.append(f"{log_key} {value:.4g}")
        self.print_to_log_file("SASSNet: " + ", ".join(parts))
        super().on_epoch_end()


class nnUNetTrainerSASSNet(nnUNetTrainerSDM):
    """SASSNet inside nnU-Net: labeled and unlabeled patches, SDM head, adversarial shape constraint.

    Unlabeled scans: ``nnUNet_raw/DatasetXXX/imagesUnlabeled`` (see :mod:`nnunet_sassnet.unlabeled`).
    """

    #: unlabeled patches per step (per GPU); None: as many as labeled ones
    unlabeled_batch_size: int | None = None
    #: beta_max of the generator term beta(t) = beta_max * exp(-5 (1 - t/T)^2) (paper: 0.001)
    adversarial_weight_max: float = 0.001
    #: discriminator optimizer (paper: Adam, lr 1e-4, betas (0.9, 0.99))
    discriminator_lr: float = 1e-4
    discriminator_betas: tuple[float, float] = (0.9, 0.99)
    #: discriminator width (features of its first convolution) and channel dropout (published code: 64, 0.5)
    discriminator_features: int = 64
    discriminator_dropout: float = 0.5

    extra_log_keys = ("seg_losses", "sdm_losses", "gen_losses", "disc_losses", "disc_acc_labeled",
                      "disc_acc_unlabeled", BETA_KEY, "skipped_steps_network", "skipped_steps_discriminator")
    step_to_log_keys = {"seg_loss": "seg_losses", "sdm_loss": "sdm_losses", "gen_loss": "gen_losses",
                        "disc_loss": "disc_losses", "disc_acc_labeled": "disc_acc_labeled",
                        "disc_acc_unlabeled": "disc_acc_unlabeled", "adversarial_weight": BETA_KEY,
                        "skipped_network": "skipped_steps_network",
                        "skipped_discriminator": "skipped_steps_discriminator"}
    updated_networks = ("network", "discriminator")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.discriminator = None
        self.discriminator_optimizer = None
        self.discriminator_grad_scaler = None
        #: training iterations done so far: the t of beta(t); continues on resume
        self.current_iteration = 0
        self.dataloader_unlabeled = None
        self.unlabeled_preprocessed_folder = unlabeled_preprocessed_folder(
            self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier) \
            if self.preprocessed_dataset_folder_base is not None else None

    # ---- schedule -----------------------------------------------------------------------------------------
    @property
    def total_iterations(self) -> int:
        """T of beta(t): all training iterations of the run as configured now."""
        return self.num_epochs * self.num_iterations_per_epoch

    def adversarial_weight(self, iteration: int) -> float:
        """beta(t), the weight of the generator term at training iteration ``iteration``."""
        return self.adversarial_weight_max * gaussian_rampup(iteration, self.total_iterations)

    # ---- set-up -------------------------------------------------------------------------------------------
    def initialize(self):
        super().initialize()
        d = SDMDiscriminator(
            sdm_channels=self.num_sdm_channels, image_channels=self.num_input_channels,
            strides=discriminator_strides(self.configuration_manager.pool_op_kernel_sizes),
            base_features=self.discriminator_features, dropout=self.discriminator_dropout).to(self.device)
        # D's own scaler: its loss scale follows D's gradients, not the U-Net's. Fused Adam takes the
        # scaler's found-inf flag on the device, so a non-finite D loss skips D's update without a
        # host-device synchronisation
        self.discriminator_optimizer = torch.optim.Adam(d.parameters(), lr=self.discriminator_lr,
                                                        betas=self.discriminator_betas, fused=True)
        self.discriminator_grad_scaler = torch.GradScaler(self.device.type)
        if self.is_ddp:
            # keep the CPU (gloo) branch free of device_ids; CUDA ranks pin their own device
            d = nn.parallel.DistributedDataParallel(
                d, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.discriminator = d

    def _ensure_unlabeled_data(self) -> None:
        """Refuse a dataset without unlabeled scans; preprocess them when missing or stale (rank 0)."""
        from nnunetv2.paths import nnUNet_raw

        raw_folder = os.path.join(str(nnUNet_raw), self.plans_manager.dataset_name) if nnUNet_raw.is_set() \
            else None
        if raw_folder is None:
            raise UserInputError("nnUNet_raw is not set: nnUNetTrainerSASSNet reads the unlabeled scans from "
                                 f"nnUNet_raw/{self.plans_manager.dataset_name}/{UNLABELED_IMAGES_FOLDER}")
        cases = list_unlabeled_cases(raw_folder, self.dataset_json)
        stamp = compute_stamp(self.plans_manager.plans, self.configuration_name, self.dataset_json, cases)
        if self.local_rank == 0 and not unlabeled_data_is_current(self.unlabeled_preprocessed_folder, stamp):
            self.print_to_log_file(
                f"Unlabeled data in {self.unlabeled_preprocessed_folder} is missing or was made from other plans, "
                f"dataset.json or images: preprocessing {len(cases)} unlabeled cases now")
            preprocess_unlabeled(self.plans_manager.dataset_name, self.configuration_name,
                                 self.plans_manager.plans_name, num_processes=max(1, get_allowed_n_proc_DA()),
                                 log=self.print_to_log_file)
        if self.is_ddp:
            dist.barrier()

    def get_dataloaders(self):
        self._ensure_unlabeled_data()
        dataloader_train, dataloader_val = super().get_dataloaders()
        self.dataloader_unlabeled = self._unlabeled_dataloader()
        return dataloader_train, dataloader_val

    def _unlabeled_dataloader(self):
        """nnU-Net's own loader and training augmentation over the unlabeled cases; random patches."""
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        dataset = nnUNetDatasetBlosc2(self.unlabeled_preprocessed_folder)
        batch_size = self.unlabeled_batch_size or self.batch_size
        loader = nnUNetDataLoader(dataset, batch_size, initial_patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=0.0, transforms=transforms)
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            augmenter = SingleThreadedAugmenter(loader, None)
        else:
            augmenter = NonDetMultiThreadedAugmenter(
                data_loader=loader, transform=None, num_processes=max(1, processes // 2),
                num_cached=max(3, processes // 4), seeds=None, pin_memory=self.device.type == "cuda",
                wait_time=0.002)
        next(augmenter)  # start the workers now, as nnU-Net does for its loaders
        return augmenter

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()

    # ---- one training step --------------------------------------------------------------------------------
    def _plain_discriminator(self) -> nn.Module:
        # the generator pass must not go through D's DDP wrapper: that would trigger D's gradient reducer
        return unwrap_module(self.discriminator)

    def train_step(self, batch: dict) -> dict:
        unlabeled = next(self.dataloader_unlabeled)
        data_labeled = self._to_device(batch["data"])
        target = self._to_device(batch["target"])
        data_unlabeled = self._to_device(unlabeled["data"])
        num_labeled = data_labeled.shape[0]
        data = torch.cat((data_labeled, data_unlabeled))
        beta = self.adversarial_weight(self.current_iteration)
        d_plain = self._plain_discriminator()

        self.optimizer.zero_grad(set_to_none=True)
        d_plain.requires_grad_(False)  # the generator term updates the segmentation network only
        try:
            with self._autocast():
                seg, sdm = self.network(data, return_sdm=True)
                losses = self.supervised_losses(seg, sdm, target, num_labeled)
                sdm = sdm[:, self.sdm_channels]
                logits_unlabeled = self._discriminate(d_plain, sdm[num_labeled:], data_unlabeled)
                # -log D(X_u, S_u): unlabeled SDMs should look like labeled ones
                gen_loss = F.binary_cross_entropy_with_logits(logits_unlabeled.float(),
                                                              torch.ones_like(logits_unlabeled, dtype=torch.float))
                loss = losses["seg_loss"] + self.sdm_loss_weight * losses["sdm_loss"] + beta * gen_loss
            skipped = self.step_network(loss)
        finally:
            d_plain.requires_grad_(True)

        disc = self.update_discriminator(sdm.detach(), data, num_labeled)
        self.current_iteration += 1
        logged = self.to_host({"loss": loss, **losses, "gen_loss": gen_loss, **disc, "skipped_network": skipped,
                               **self.skip_counters()})
        logged["adversarial_weight"] = beta
        self.check_skips(logged)
        return logged

    def _discriminate(self, discriminator: nn.Module, sdm: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """D's logits (float32), under nnU-Net's autocast on CUDA like the U-Net.

        Mixed precision halves D's cost (measured on an H200: 5.0 ms -> 3.4 ms per update at nnU-Net's LA
        patch); D's own grad scaler (see :meth:`initialize`) keeps its small gradients from underflowing.
        """
        with self._autocast():
            return discriminator(sdm, images).float()

    def update_discriminator(self, sdm: torch.Tensor, images: torch.Tensor, num_labeled: int
                             ) -> dict[str, torch.Tensor]:
        """One discriminator step on the step's own (detached) predictions: labeled = 1, unlabeled = 0."""
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        logits = self._discriminate(self.discriminator, sdm, images)
        labels = torch.zeros_like(logits)
        labels[:num_labeled] = 1.0
        disc_loss = F.binary_cross_entropy_with_logits(logits, labels)
        self.discriminator_grad_scaler.scale(disc_loss).backward()
        self.discriminator_grad_scaler.step(self.discriminator_optimizer)
        self.discriminator_grad_scaler.update()
        correct = ((logits.detach() > 0).float() == labels).float()
        return {"disc_loss": disc_loss, "disc_acc_labeled": correct[:num_labeled].mean(),
                "disc_acc_unlabeled": correct[num_labeled:].mean(),
                "skipped_discriminator": self.count_skip("discriminator", disc_loss)}

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the discriminator, its optimizer, and beta(t)'s iteration."""
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
            "sassnet": {
                "discriminator_weights": unwrap_module(self.discriminator).state_dict(),
                "discriminator_optimizer_state": self.discriminator_optimizer.state_dict(),
                "discriminator_grad_scaler_state": self.discriminator_grad_scaler.state_dict(),
                "current_iteration": self.current_iteration,
            },
        }
        torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get("sassnet")
        if state is None:
            self.print_to_log_file("The checkpoint holds no discriminator (another trainer wrote it): the "
                                   "discriminator starts fresh and beta(t) continues from the epoch")
            self.current_iteration = self.current_epoch * self.num_iterations_per_epoch
            return
        unwrap_module(self.discriminator).load_state_dict(state["discriminator_weights"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer_state"])
        self.discriminator_grad_scaler.load_state_dict(state["discriminator_grad_scaler_state"])
        self.current_iteration = int(state["current_iteration"])


def trainer_variant(base: type, name: str, module: str | None = None, **settings) -> type:
    """A subclass of ``base`` named ``name`` whose instances get ``settings`` after nnU-Net's ``__init__``.

    nnU-Net assigns its schedule (``num_epochs``, ``num_iterations_per_epoch``, ``initial_lr``, ...) in
    ``__init__``, so class attributes cannot change it; this sets them afterwards. Assign the result to a
    module attribute of the same name so that nnU-Net's trainer lookup finds it.
    """
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in settings.items():
            setattr(self, key, value)

    settings_text = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    return type(name, (base,), {"__init__": __init__, "__module__": module or base.__module__,
                                "__doc__": f"{base.__name__} with {settings_text}."})
