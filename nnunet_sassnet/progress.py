"""Per-epoch logging of SASSNet's losses, extending nnU-Net's local logger and its progress.png."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger

# key in the logger -> label in the plot
LOSS_CURVES = {
    "seg_losses": "segmentation (Dice+CE)",
    "sdm_losses": "SDM (MSE)",
    "gen_losses": "generator (-log D)",
    "disc_losses": "discriminator (BCE)",
    "unlabeled_losses": "unlabeled term",
    "dtc_losses": "DTC consistency (MSE)",
}
ACCURACY_CURVES = {
    "disc_acc_labeled": "D accuracy, labeled",
    "disc_acc_unlabeled": "D accuracy, unlabeled",
}
BETA_KEY = "adversarial_weights"
#: weight curves of the unlabeled term: SASSNet's beta(t), or the generic one of other trainers
WEIGHT_CURVES = {BETA_KEY: "adversarial weight beta(t)", "unlabeled_weights": "unlabeled weight"}
#: ||grad of the weighted unlabeled term|| / ||grad of the supervised loss|| (measured on a few steps per epoch)
GRADIENT_RATIO_CURVES = {"adv_grad_ratios": "adversarial / supervised gradient norm",
                         "unlabeled_grad_ratios": "unlabeled / supervised gradient norm"}
SKIPPED_CURVES = {
    "skipped_steps_network": "skipped steps (non-finite loss), network",
    "skipped_steps_discriminator": "skipped steps, discriminator",
}


class SASSNetLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger with extra per-epoch keys and a SASSNet panel under nnU-Net's progress.png.

    nnU-Net's logger refuses unknown keys and its plot expects one value per epoch for every key, so the
    extra keys are registered here and must be logged every epoch, like nnU-Net's own.
    """

    def __init__(self, extra_keys: Sequence[str], verbose: bool = False):
        super().__init__(verbose)
        self.extra_keys = list(extra_keys)
        for key in self.extra_keys:
            self.my_fantastic_logging[key] = []

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        for key in self.extra_keys:  # a checkpoint of another trainer lacks them
            self.my_fantastic_logging.setdefault(key, [])

    def plot_progress_png(self, output_folder: str):
        super().plot_progress_png(output_folder)
        if not self.extra_keys:
            return
        from PIL import Image  # matplotlib's own image library

        path = os.path.join(output_folder, "progress.png")
        with Image.open(path) as base_image:
            base = base_image.convert("RGB")
        panel = Image.fromarray(self._render_panel(width_px=base.width))
        combined = Image.new("RGB", (base.width, base.height + panel.height), "white")
        combined.paste(base, (0, 0))
        combined.paste(panel, (0, base.height))
        # low compression: this runs after every epoch and the file is large
        combined.save(path, compress_level=1)

    def _render_panel(self, width_px: int) -> np.ndarray:
        import matplotlib.pyplot as plt

        logs = self.my_fantastic_logging
        epochs = min(len(v) for v in logs.values())
        x = list(range(epochs))
        dpi = 100  # nnU-Net draws 30 x 18 inch panels at 100 dpi; these match them
        fig, (ax_loss, ax_acc, ax_ratio) = plt.subplots(3, 1, figsize=(width_px / dpi, 54), dpi=dpi)
        for key, label in LOSS_CURVES.items():
            if key in logs:
                ax_loss.plot(x, logs[key][:epochs], label=label, linewidth=4)
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(loc=(0, 1), ncol=4)
        skipped = [k for k in SKIPPED_CURVES if k in logs]
        if skipped:
            ax_skip = ax_loss.twinx()
            for key in skipped:
                ax_skip.plot(x, logs[key][:epochs], ls=":", label=SKIPPED_CURVES[key], linewidth=3)
            ax_skip.set_ylabel("skipped steps")
            ax_skip.legend(loc=(0.6, 1))
        for key, label in ACCURACY_CURVES.items():
            if key in logs:
                ax_acc.plot(x, logs[key][:epochs], label=label, linewidth=4)
        if any(k in logs for k in ACCURACY_CURVES):
            ax_acc.axhline(0.5, color="gray", ls="dotted", linewidth=2)
            ax_acc.set_ylim(-0.02, 1.02)
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("discriminator accuracy")
        weights = [k for k in WEIGHT_CURVES if k in logs]
        if weights:
            ax_weight = ax_acc.twinx()
            for key in weights:
                ax_weight.plot(x, logs[key][:epochs], color="k", ls="--", label=WEIGHT_CURVES[key], linewidth=3)
            ax_weight.set_ylabel("weight of the unlabeled term")
            ax_weight.legend(loc=(0.6, 1))
        ax_acc.legend(loc=(0, 1), ncol=2)
        for key, label in GRADIENT_RATIO_CURVES.items():
            values = np.asarray(logs.get(key, [])[:epochs], dtype=float)
            if values.size and np.isfinite(values).any() and (values[np.isfinite(values)] > 0).any():
                ax_ratio.semilogy(x[:values.size], values, label=label, linewidth=4)
                ax_ratio.legend(loc=(0, 1))
        ax_ratio.set_xlabel("epoch")
        ax_ratio.set_ylabel("gradient norm ratio (log)")
        fig.tight_layout()
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return image
