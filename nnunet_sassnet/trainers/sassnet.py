"""SASSNet inside nnU-Net: the adversarial shape constraint on unlabeled patches.

A discriminator D (:class:`~nnunet_sassnet.networks.SDMDiscriminator`) tells SDMs predicted on labeled patches
from those predicted on unlabeled patches; the network gets the generator term ``-beta(t) * log D(X_u, S_u)``
on the unlabeled ones. As in the published code, D runs in evaluation mode (no dropout) for the generator
term and in training mode for its own update.

D compares like with like: nnU-Net centres part of every labeled batch on foreground (its foreground
oversampling, 33 %: with batch 2 the second patch), while unlabeled patches are random crops. D's labeled
examples are therefore only the labeled patches that nnU-Net's loader drew at random (the published code
random-crops both streams); the segmentation loss still sees every labeled patch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sassnet.networks import SDMDiscriminator, discriminator_strides, unwrap_module
from nnunet_sassnet.progress import BETA_KEY
from nnunet_sassnet.trainers.semisupervised import nnUNetTrainerSemiSupervised

__all__ = ["nnUNetTrainerSASSNet", "random_patch_indices"]


def random_patch_indices(batch_size: int, oversample_foreground_percent: float) -> list[int]:
    """Indices of the patches of an nnU-Net batch that its loader crops at random (not centred on foreground).

    nnU-Net's loader (``_oversample_last_XX_percent``) forces foreground in the last patches of a batch: patch
    ``i`` is random iff ``i < round(batch_size * (1 - oversample_foreground_percent))``.
    """
    return list(range(int(round(batch_size * (1 - oversample_foreground_percent)))))


class nnUNetTrainerSASSNet(nnUNetTrainerSemiSupervised):
    """SASSNet: labeled and unlabeled patches, SDM head, adversarial shape constraint.

    Defaults: the published code's beta_max (0.015, its best setting for 8 labeled LA scans) with its Gaussian
    ramp over the whole run. ``nnUNetTrainerSASSNetPaper`` has the paper's 0.001.
    """

    #: beta_max of the generator term beta(t) = beta_max * exp(-5 (1 - t/T)^2) (published code: 0.015 for 8
    #: labeled scans, 0.01 for 16; the paper's text: 0.001)
    adversarial_weight_max: float = 0.015
    #: discriminator optimizer (paper: Adam, lr 1e-4, betas (0.9, 0.99))
    discriminator_lr: float = 1e-4
    discriminator_betas: tuple[float, float] = (0.9, 0.99)
    #: discriminator width (features of its first convolution) and channel dropout (published code: 64, 0.5)
    discriminator_features: int = 64
    discriminator_dropout: float = 0.5
    #: which labeled patches D sees as "labeled": "random" (only those nnU-Net cropped at random, like the
    #: unlabeled ones) or "all" (also the foreground-centred ones; D can then tell the streams apart by
    #: position instead of shape)
    discriminator_labeled_patches: str = "random"
    #: D at half resolution: SDM and image average-pooled like the U-Net's first downsampling (an SDM is
    #: smooth), D's stages then follow the plan's later poolings; about an eighth of D's work in 3D. Not in
    #: the published code (False: full resolution, as published)
    discriminator_downsampled: bool = False
    #: torch.compile the discriminator: None follows nnU-Net's rule for the U-Net (``nnUNet_compile``, CUDA
    #: only); True/False force it. The backend is torch.compile's (``"aot_eager"`` needs no C++ compiler)
    compile_discriminator: bool | None = None
    discriminator_compile_backend: str = "inductor"

    extra_log_keys = ("seg_losses", "sdm_losses", "gen_losses", "disc_losses", "disc_acc_labeled",
                      "disc_acc_unlabeled", BETA_KEY, "adv_grad_ratios", "skipped_steps_network",
                      "skipped_steps_discriminator")
    step_to_log_keys = {"seg_loss": "seg_losses", "sdm_loss": "sdm_losses", "unlabeled_loss": "gen_losses",
                        "disc_loss": "disc_losses", "disc_acc_labeled": "disc_acc_labeled",
                        "disc_acc_unlabeled": "disc_acc_unlabeled", "unlabeled_weight": BETA_KEY,
                        "unlabeled_grad_ratio": "adv_grad_ratios",
                        "skipped_network": "skipped_steps_network",
                        "skipped_discriminator": "skipped_steps_discriminator"}
    updated_networks = ("network", "discriminator")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.discriminator = None
        self._generator_discriminator = None
        self.discriminator_optimizer = None
        self.discriminator_grad_scaler = None
        if self.discriminator_labeled_patches not in ("random", "all"):
            raise ValueError(f"discriminator_labeled_patches must be 'random' or 'all', got "
                             f"{self.discriminator_labeled_patches!r}")

    @property
    def unlabeled_weight_max(self) -> float:  # the generic name of the base class
        return self.adversarial_weight_max

    def adversarial_weight(self, iteration: int) -> float:
        """beta(t), the weight of the generator term at training iteration ``iteration``."""
        return self.unlabeled_weight(iteration)

    # ---- set-up -------------------------------------------------------------------------------------------
    def initialize(self):
        super().initialize()
        self.discriminator_labeled_indices = self._discriminator_labeled_indices()
        pools = [tuple(int(k) for k in p) for p in self.configuration_manager.pool_op_kernel_sizes]
        input_pool = None
        if self.discriminator_downsampled and len(pools) > 1:
            # the U-Net's first downsampling moves in front of D; D's stages take the plan's later ones
            input_pool = tuple(min(2, k) for k in pools[1])
            pools = [pools[0], *pools[2:]]
        d = SDMDiscriminator(
            sdm_channels=self.num_sdm_channels, image_channels=self.num_input_channels,
            strides=discriminator_strides(pools), base_features=self.discriminator_features,
            dropout=self.discriminator_dropout, input_pool=input_pool).to(self.device)
        # D's own scaler: its loss scale follows D's gradients, not the U-Net's. Fused Adam takes the
        # scaler's found-inf flag on the device, so a non-finite D loss skips D's update without a
        # host-device synchronisation
        self.discriminator_optimizer = torch.optim.Adam(d.parameters(), lr=self.discriminator_lr,
                                                        betas=self.discriminator_betas, fused=True)
        self.discriminator_grad_scaler = torch.GradScaler(self.device.type)
        if self._compile_discriminator():
            # like nnU-Net's U-Net: D's small convolutions and the losses around them are launch-bound when
            # eager. Two graphs are traced (generator pass in eval mode, D's update in train mode)
            self.print_to_log_file(f"Compiling the discriminator (backend {self.discriminator_compile_backend})")
            d = torch.compile(d, backend=self.discriminator_compile_backend)
        # the generator pass uses D without its DDP wrapper (that would trigger D's gradient reducer)
        self._generator_discriminator = d
        if self.is_ddp:
            # keep the CPU (gloo) branch free of device_ids; CUDA ranks pin their own device
            d = nn.parallel.DistributedDataParallel(
                d, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.discriminator = d

    def _compile_discriminator(self) -> bool:
        """Whether D is compiled: :attr:`compile_discriminator`, else nnU-Net's own rule for the U-Net."""
        if self.compile_discriminator is not None:
            return self.compile_discriminator
        return self._do_i_compile()

    def _compiles_anything(self) -> bool:
        return super()._compiles_anything() or self._compile_discriminator()

    def _discriminator_labeled_indices(self) -> slice:
        """The labeled patches of a batch that D sees as "labeled" (a slice: no index copy to the GPU)."""
        if self.discriminator_labeled_patches == "all":
            return slice(0, self.batch_size)
        if self.probabilistic_oversampling:
            raise ValueError(
                f"{self.__class__.__name__}: with probabilistic_oversampling the randomly cropped labeled patches "
                f"are not known; set discriminator_labeled_patches = 'all' or turn probabilistic_oversampling off")
        # under DDP, batch size and oversampling are this rank's share (nnU-Net splits both): a rank may hold
        # only foreground-centred labeled patches, and its D step then sees unlabeled patches only
        indices = random_patch_indices(self.batch_size, self.oversample_foreground_percent)
        if not indices and self.is_ddp:
            return slice(0, 0)
        if not indices:
            raise ValueError(
                f"{self.__class__.__name__}: every labeled patch is centred on foreground (batch size "
                f"{self.batch_size}, oversample_foreground_percent {self.oversample_foreground_percent}), so D "
                f"has no labeled patch drawn like the unlabeled ones; lower oversample_foreground_percent or set "
                f"discriminator_labeled_patches = 'all'")
        return slice(indices[0], indices[-1] + 1)

    # ---- one training step --------------------------------------------------------------------------------
    def _plain_discriminator(self) -> nn.Module:
        """D without its DDP and torch.compile wrappers (its parameters and state dict)."""
        return unwrap_module(self.discriminator)

    @contextlib.contextmanager
    def unlabeled_term_context(self):
        """D frozen and in evaluation mode (no dropout) for the generator term, as in the published code."""
        d = self._plain_discriminator()
        d.eval()
        d.requires_grad_(False)  # the generator term updates the segmentation network only
        try:
            yield
        finally:
            d.requires_grad_(True)
            d.train()

    def unlabeled_loss(self, seg_output, sdm_output, data, num_labeled):
        """-log D(X_u, S_u): unlabeled SDMs should look like labeled ones."""
        logits = self._discriminate(self._generator_discriminator, sdm_output[num_labeled:, self.sdm_channels],
                                    data[num_labeled:])
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)), {}

    def after_network_step(self, seg_output, sdm_output, data, num_labeled):
        return self.update_discriminator(sdm_output[:, self.sdm_channels], data, num_labeled)

    def _discriminate(self, discriminator: nn.Module, sdm: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """D's logits (float32), under nnU-Net's autocast on CUDA like the U-Net.

        Mixed precision halves D's cost (measured on an H200: 5.0 ms -> 3.4 ms per update at nnU-Net's LA
        patch); D's own grad scaler (see :meth:`initialize`) keeps its small gradients from underflowing.
        """
        with self._autocast():
            return discriminator(sdm, images).float()

    def update_discriminator(self, sdm: torch.Tensor, images: torch.Tensor, num_labeled: int
                             ) -> dict[str, torch.Tensor]:
        """One discriminator step on the step's own (detached) predictions: labeled = 1, unlabeled = 0.

        Labeled examples: the patches in :attr:`discriminator_labeled_indices` (drawn like the unlabeled
        ones); the two classes weigh equally in the loss whatever their counts.
        """
        labeled = self.discriminator_labeled_indices
        if labeled.stop > num_labeled:
            labeled = slice(labeled.start, num_labeled)
        sdm = torch.cat((sdm[labeled], sdm[num_labeled:]))
        images = torch.cat((images[labeled], images[num_labeled:]))
        num_positive = labeled.stop - labeled.start
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        logits = self._discriminate(self.discriminator, sdm, images)
        loss_unlabeled = F.binary_cross_entropy_with_logits(logits[num_positive:],
                                                            torch.zeros_like(logits[num_positive:]))
        loss_labeled = F.binary_cross_entropy_with_logits(logits[:num_positive], torch.ones_like(
            logits[:num_positive])) if num_positive else torch.zeros_like(loss_unlabeled)
        disc_loss = 0.5 * (loss_labeled + loss_unlabeled)
        self.discriminator_grad_scaler.scale(disc_loss).backward()
        self.discriminator_grad_scaler.step(self.discriminator_optimizer)
        self.discriminator_grad_scaler.update()
        predicted_labeled = logits.detach() > 0
        return {"disc_loss": disc_loss, "disc_acc_labeled": predicted_labeled[:num_positive].float().mean(),
                "disc_acc_unlabeled": (~predicted_labeled[num_positive:]).float().mean(),
                "skipped_discriminator": self.count_skip("discriminator", disc_loss)}

    # ---- checkpoints --------------------------------------------------------------------------------------
    def extra_checkpoint_state(self) -> dict:
        """The discriminator, its optimizer (Adam's step counts included) and scaler, and beta(t)'s t."""
        return {**super().extra_checkpoint_state(),
                "discriminator_weights": unwrap_module(self.discriminator).state_dict(),
                "discriminator_optimizer_state": self.discriminator_optimizer.state_dict(),
                "discriminator_grad_scaler_state": self.discriminator_grad_scaler.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        unwrap_module(self.discriminator).load_state_dict(state["discriminator_weights"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer_state"])
        self.discriminator_grad_scaler.load_state_dict(state["discriminator_grad_scaler_state"])
