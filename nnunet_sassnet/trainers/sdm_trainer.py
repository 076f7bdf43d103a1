"""nnU-Net with SASSNet's SDM head: the supervised part shared by every trainer of this package.

:class:`nnUNetTrainerSDM` is nnU-Net's training plus an SDM head on the last decoder stage and
``alpha * MSE(SDM)`` on labeled patches (the paper's ablation without unlabeled data). It also holds what the
semi-supervised trainers share: skipping and counting updates with non-finite losses, one host transfer per
step for the logged values, and per-epoch logging of extra values.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_sassnet.atomic_files import partial_path
from nnunet_sassnet.errors import install_excepthook
from nnunet_sassnet.networks import SASSNetwork, unwrap_module
from nnunet_sassnet.nnunet_tools import cap_torch_threads
from nnunet_sassnet.progress import SASSNetLocalLogger
from nnunet_sassnet.sdm import signed_distance_maps
from nnunet_sassnet.trainers.cascade import previous_stage_segmentations
from nnunet_sassnet.trainers.device_augmentation import DeviceAugmentationMixin
from nnunet_sassnet.trainers.ignore_label import masked_mse, sdm_targets_where_known

__all__ = ["nnUNetTrainerSDM", "NonFiniteLossError", "sdm_channel_slice"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had non-finite losses; the run stops instead of going on."""


def sdm_channel_slice(has_regions: bool, num_segmentation_heads: int) -> slice:
    """The SDM head's channels that carry a shape: SDM channel ``c`` belongs to segmentation output ``c``.

    nnU-Net builds the network from the number of outputs alone, which counts the background for label-based
    datasets (channel 0 is then never trained nor used) and only the regions for region-based ones. A slice,
    not a list: indexing with a list copies an index tensor to the GPU, a synchronisation.
    """
    return slice(0 if has_regions else 1, num_segmentation_heads)


class nnUNetTrainerSDM(DeviceAugmentationMixin, nnUNetTrainer):
    """nnU-Net + SASSNet's SDM head, trained on labeled patches only (the ablation without unlabeled data)."""

    #: weight alpha of the SDM regression loss (paper: 0.3)
    sdm_loss_weight: float = 0.3
    #: SDM distances in mm ("physical") or voxels ("voxel", the published code); identical on isotropic data
    sdm_units: str = "physical"

    #: cascade (3d_cascade_fullres): the trainer whose 3d_lowres model gives the previous stage's segmentations;
    #: None: this trainer's own, as nnU-Net does (e.g. "nnUNetTrainer" for a plain nnU-Net lowres model)
    previous_stage_trainer: str | None = None

    #: a step whose loss is not finite is skipped (and counted); after this many in a row the run stops
    max_consecutive_skipped_steps: int = 50

    #: per-epoch values logged and plotted in addition to nnU-Net's
    extra_log_keys: tuple[str, ...] = ("seg_losses", "sdm_losses", "skipped_steps_network")
    #: the networks whose updates are skipped on non-finite losses
    updated_networks: tuple[str, ...] = ("network",)
    #: map: key returned by train_step -> logger key (epoch means; keys starting with skipped_steps are sums)
    step_to_log_keys: dict[str, str] = {"seg_loss": "seg_losses", "sdm_loss": "sdm_losses",
                                        "skipped_network": "skipped_steps_network"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # bad-input messages of our trainers read as one line under nnU-Net's own commands; installed here,
        # not at import, so that merely importing the package changes nothing
        install_excepthook()
        # nnUNetv2_train -device cpu has just set one thread per core: OMP_NUM_THREADS, where given, wins
        cap_torch_threads()
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net's DDP branch assumes CUDA; with gloo on the CPU the requested device stays
            self.device = device
            self.grad_scaler = None
        if self.is_cascaded and self.previous_stage_trainer is not None:
            self.folder_with_segs_from_previous_stage = previous_stage_segmentations(self, self.previous_stage_trainer)
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
        # the one hook of the trainer that nnUNetv2_predict calls (after its one-thread-per-core on the CPU)
        cap_torch_threads()
        unet = get_network_from_plans(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels, num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)
        return SASSNetwork(unet, num_output_channels)

    def initialize(self):
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
        self.sdm_channels = sdm_channel_slice(self.label_manager.has_regions,
                                              self.label_manager.num_segmentation_heads)
        self.num_sdm_channels = self.sdm_channels.stop - self.sdm_channels.start
        spacing = self.configuration_manager.spacing
        self.sdm_spacing = tuple(float(s) for s in spacing) if self.sdm_units == "physical" else None
        if self.grad_scaler is None:
            # nnU-Net has no scaler on the CPU; its found-inf check is what skips an update whose loss is not
            # finite, so the CPU gets one too (the scale cancels out before clipping and the step)
            self.grad_scaler = torch.GradScaler("cpu")
        # consecutive skipped steps per network, kept on the device: reading them costs no extra sync
        self._consecutive_skips = {name: torch.zeros((), device=self.device) for name in self.updated_networks}

    def on_train_start(self):
        super().on_train_start()
        if unwrap_module(self.network).sdm_head.loaded_from_weights is False:
            # -pretrained_weights from another trainer's checkpoint (nnU-Net loads them before training starts)
            fresh = "the SDM head and the discriminator start" if getattr(self, "discriminator", None) is not None \
                else "the SDM head starts"
            self.print_to_log_file(
                f"The loaded weights held no SDM head (e.g. an nnUNetTrainer checkpoint given as -pretrained_weights): "
                f"the U-Net was loaded; {fresh} from initialisation", also_print_to_console=False)

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
        sdm_loss = self.sdm_loss(sdm_output[:num_labeled, self.sdm_channels].float(), full_res_target)
        return {"seg_loss": seg_loss, "sdm_loss": sdm_loss}

    def sdm_loss(self, sdm_prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE of the SDM head's channels (N, K, ...) against the SDMs of nnU-Net's full-resolution ``target``.

        With an ignore label, only where the SDM is the same whatever the ignored voxels' labels are (see
        :mod:`~nnunet_sassnet.trainers.ignore_label`).
        """
        if not self.label_manager.has_ignore_label:
            return F.mse_loss(sdm_prediction, self.sdm_targets(target))
        sdm, determined = sdm_targets_where_known(target, self.label_manager, self.sdm_channels, self.sdm_spacing)
        return masked_mse(sdm_prediction, sdm, determined)

    def supervised_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Segmentation loss + alpha * SDM loss."""
        return losses["seg_loss"] + self.sdm_loss_weight * losses["sdm_loss"]

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
    def to_host(values: dict[str, torch.Tensor | float]) -> dict[str, np.ndarray]:
        """Move every logged value to the host in one transfer (one synchronisation per step)."""
        keys = list(values)
        device_values = [values[k].detach().float().reshape(()) for k in keys if torch.is_tensor(values[k])]
        stacked = torch.stack(device_values).cpu().numpy() if device_values else np.zeros(0, np.float32)
        host, i = {}, 0
        for k in keys:
            if torch.is_tensor(values[k]):
                host[k], i = stacked[i], i + 1
            else:
                host[k] = np.float32(values[k])
        return host

    def train_step(self, batch: dict) -> dict:
        data = self._to_device(batch["data"])
        target = self._to_device(batch["target"])
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            seg, sdm = self.network(data, return_sdm=True)
            losses = self.supervised_losses(seg, sdm, target, data.shape[0])
            loss = self.supervised_loss(losses)
        skipped = self.step_network(loss)
        logged = self.to_host({"loss": loss, **losses, "skipped_network": skipped, **self.skip_counters()})
        self.check_skips(logged)
        return logged

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written beside its place and renamed there: a kill mid-write leaves the old one."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)
            return
        super().save_checkpoint(partial_path(filename))
        os.replace(partial_path(filename), filename)

    # ---- logging ------------------------------------------------------------------------------------------
    def _epoch_mean(self, outputs: dict, key: str) -> float:
        values = np.asarray(outputs[key], dtype=np.float64)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, values)
            values = np.concatenate([np.atleast_1d(g) for g in gathered])
        if not values.size or np.isnan(values).all():
            return float("nan")  # e.g. a value measured on a few steps per epoch only, none this epoch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(np.nanmean(values))

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
        self.print_to_log_file(f"{self.__class__.__name__}: " + ", ".join(parts))
        super().on_epoch_end()
