"""The output layers of ``nnUNetv2_train -pretrained_weights``: loaded too, where a teacher needs them.

nnU-Net's ``load_pretrained_weights`` transfers every layer except the output layers (the 1x1 ``seg_layers``),
so that a model of another label set can be fine-tuned. A teacher that predicts pseudo-labels from the first
step (BCP's self-training) needs them: with fresh output layers its first predictions are noise. The trainers
that mix in :class:`PretrainedOutputLayers` load them as well, from the same file, where the file's model has
the same labels (its checkpoint records its ``dataset.json``) and each layer's shape matches; the log names the
layers loaded and those that start fresh, with the reason.

nnU-Net passes the file name to its loader only, so the trainer reads it from the command line
(``nnUNetv2_train ... -pretrained_weights FILE``, as nnU-Net's parser reads it). Through the Python API
(``run_training(..., pretrained_weights=...)`` or ``maybe_load_checkpoint``) call
:meth:`PretrainedOutputLayers.load_pretrained_output_layers` yourself before ``run_training()``.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import nn

from nnunet_sassnet.networks import unwrap_module

__all__ = ["PretrainedOutputLayers", "pretrained_weights_argument", "load_output_layers", "OUTPUT_LAYER_KEY"]

#: what names an output layer's parameters (nnU-Net's loader skips every key that contains it)
OUTPUT_LAYER_KEY = ".seg_layers."

_OPTION = "-pretrained_weights"


def pretrained_weights_argument(argv: Sequence[str] | None = None) -> str | None:
    """The file given to ``-pretrained_weights`` in ``argv`` (default: this process's command line), else None.

    As nnU-Net's argument parser reads it: ``-pretrained_weights FILE`` or ``-pretrained_weights=FILE`` (it refuses
    abbreviations: they could be its ``-p``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, token in enumerate(argv):
        if token == _OPTION:
            return argv[i + 1] if i + 1 < len(argv) else None
        if token.startswith(_OPTION + "="):
            return token[len(_OPTION) + 1:]
    return None


def _layer(key: str) -> str:
    return key.rsplit(".", 1)[0]


def load_output_layers(network: nn.Module, checkpoint: dict, labels: dict | None = None
                       ) -> tuple[list[str], dict[str, str]]:
    """Copy the output layers of ``checkpoint["network_weights"]`` into ``network`` where their shapes match.

    ``labels``: this dataset's ``dataset.json`` labels; if the checkpoint records other labels, nothing is copied.
    Returns the layers loaded and, for each layer that keeps its weights, why.
    """
    module = unwrap_module(network)
    own = {k: v for k, v in module.state_dict().items() if OUTPUT_LAYER_KEY in k}
    saved = checkpoint.get("network_weights", {})
    saved_labels = (checkpoint.get("init_args") or {}).get("dataset_json", {}).get("labels")
    reasons: dict[str, str] = {}
    if labels is not None and saved_labels is not None and saved_labels != labels:
        reasons = {_layer(k): f"the file's labels {saved_labels} differ from {labels}" for k in own}
        return [], reasons
    for key, value in own.items():
        if key not in saved:
            reasons.setdefault(_layer(key), "not in the file")
        elif saved[key].shape != value.shape:
            reasons.setdefault(_layer(key), f"shape {tuple(saved[key].shape)} in the file, {tuple(value.shape)} here")
    copy = {k: saved[k] for k in own if _layer(k) not in reasons}
    with torch.no_grad():
        params = dict(module.named_parameters())
        params.update(dict(module.named_buffers()))
        for key, value in copy.items():
            params[key].copy_(value.to(params[key].device, params[key].dtype))
    loaded = sorted({_layer(k) for k in copy})
    return loaded, reasons


class PretrainedOutputLayers:
    """Mixin for nnU-Net trainers: after ``-pretrained_weights``, load the output layers too (see the module)."""

    def load_pretrained_output_layers(self, filename: str) -> list[str]:
        """Load the output layers of the nnU-Net checkpoint ``filename`` into the network; log what was loaded
        and what starts fresh. Returns the layers loaded."""
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
        loaded, fresh = load_output_layers(self.network, checkpoint, self.dataset_json.get("labels"))
        lines = [f"Output layers from {filename}: loaded {', '.join(loaded) or 'none'}"]
        lines += [f"  starts fresh: {layer} ({why})" for layer, why in sorted(fresh.items())]
        for line in lines:
            self.print_to_log_file(line)
        return loaded

    def on_train_start(self):
        filename = pretrained_weights_argument()
        network = unwrap_module(self.network) if self.network is not None else None
        head = getattr(network, "sdm_head", None)
        # nnU-Net loaded this file into the network just before (a resumed run loads a checkpoint instead:
        # nnU-Net refuses -pretrained_weights with --c); the SDM head's load hook shows that a load happened
        if filename is not None and self.current_epoch == 0 and head is not None \
                and head.loaded_from_weights is not None:
            self.load_pretrained_output_layers(filename)
        super().on_train_start()
