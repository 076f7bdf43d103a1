"""SASSNet's network pieces around nnU-Net's own U-Net: the SDM head and the discriminator."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["SASSNetwork", "SDMHead", "SDMDiscriminator", "discriminator_strides", "unwrap_module"]


def unwrap_module(module: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (whose state dicts carry prefixes)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


class SDMHead(nn.Module):
    """SASSNet's SDM head: a 1x1 convolution and tanh, as in the paper.

    Its convolution is named ``seg_layers.0`` because it is an output layer: nnU-Net's
    ``load_pretrained_weights`` (``nnUNetv2_train -pretrained_weights``) transfers every parameter except those
    of output layers, recognised by ``.seg_layers.`` in their names, and checks that the checkpoint holds all
    others. So a supervised nnU-Net model (which has no SDM head) loads into a SASSNet network, and the head
    keeps its fresh initialisation, as nnU-Net's own output layers do.

    Checkpoints written before the head had this name (``sdm_head.0.*``) still load.
    """

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int):
        super().__init__()
        self.seg_layers = nn.ModuleList([conv_op(in_channels, out_channels, kernel_size=1, bias=True)])
        #: after a ``load_state_dict``: whether the loaded weights held this head (None: nothing loaded yet)
        self.loaded_from_weights: bool | None = None
        self._register_load_state_dict_pre_hook(self._before_load)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.seg_layers[0](features))

    def _before_load(self, state_dict: dict, prefix: str, *args) -> None:
        conv = self.seg_layers[0]
        for name in ("weight", "bias"):
            old_key = f"{prefix}0.{name}"  # the head was an nn.Sequential(conv, tanh)
            if old_key in state_dict:
                state_dict[f"{prefix}seg_layers.0.{name}"] = state_dict.pop(old_key)
        # nnU-Net's pretrained loader fills what the checkpoint lacks with the network's own state_dict(),
        # whose tensors share storage with the parameters: that is how a head absent from the file shows
        incoming = state_dict.get(f"{prefix}seg_layers.0.weight")
        self.loaded_from_weights = incoming is not None and incoming.data_ptr() != conv.weight.data_ptr()
        if incoming is not None and not self.loaded_from_weights:
            print("The loaded weights hold no SDM head (nnU-Net's output layers are not transferred): the SDM "
                  "head starts from its initialisation", flush=True)


class SASSNetwork(nn.Module):
    """nnU-Net's U-Net (any encoder/decoder architecture of dynamic_network_architectures) plus an SDM head.

    ``forward(x)`` returns exactly what the U-Net returns and never runs the head, so nnU-Net's predictor and
    validation see a plain segmentation network. ``forward(x, return_sdm=True)`` returns
    ``(segmentation output, sdm)``; the SDM head (1x1 convolution + tanh, as in the paper) reads the features
    of the decoder's last, full-resolution stage. Those features are taken with a forward hook on that stage,
    so the decoder is used as it is.

    The head predicts one SDM channel per segmentation output channel (channel ``c`` belongs to output ``c``):
    ``build_network_architecture`` receives only the number of outputs, which is classes (background included)
    or regions. With labels, channel 0 (background) is never trained nor used.

    Parameter names equal those of the wrapped U-Net (``encoder.*``, ``decoder.*``) plus
    ``sdm_head.seg_layers.0.*``, so a plain nnU-Net checkpoint loads with ``-pretrained_weights`` (see
    :class:`SDMHead`).
    """

    def __init__(self, unet: nn.Module, num_sdm_channels: int):
        super().__init__()
        decoder = getattr(unet, "decoder", None)
        if getattr(unet, "encoder", None) is None or decoder is None or not hasattr(decoder, "stages") \
                or not hasattr(decoder, "seg_layers"):
            raise NotImplementedError(
                f"SASSNet needs an encoder/decoder U-Net from dynamic_network_architectures (PlainConvUNet, "
                f"ResidualEncoderUNet); got {type(unet).__name__}")
        self.encoder = unet.encoder
        self.decoder = decoder
        final_seg_layer = decoder.seg_layers[-1]
        self.sdm_head = SDMHead(type(final_seg_layer), final_seg_layer.in_channels, num_sdm_channels)
        self._capture_features = False
        self._features: torch.Tensor | None = None
        decoder.stages[-1].register_forward_hook(self._store_features)

    def _store_features(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if self._capture_features:
            self._features = output

    def forward(self, x: torch.Tensor, return_sdm: bool = False):
        if not return_sdm:
            return self.decoder(self.encoder(x))
        self._capture_features = True
        try:
            seg = self.decoder(self.encoder(x))
            features = self._features
        finally:
            self._capture_features = False
            self._features = None
        return seg, self.sdm_head(features)


def discriminator_strides(pool_op_kernel_sizes: Sequence[Sequence[int]], num_stages: int = 4
                          ) -> list[tuple[int, ...]]:
    """Per-axis strides of the discriminator's downsampling stages, following the plan's pooling.

    The published discriminator halves every axis four times (a 112x112x80 patch becomes 7x7x5). nnU-Net's
    plans already say which axes may be halved how often (anisotropic data pools the coarse axis later, 2d
    and tiny patches pool less), so stage ``k`` uses the plan's ``k``-th pooling (capped at 2 per axis).
    Stages past the plan's pooling keep stride 1.
    """
    pools = [tuple(int(p) for p in k) for k in pool_op_kernel_sizes[1:]]  # the first entry is the stem: all 1
    ndim = len(pool_op_kernel_sizes[0])
    strides = []
    for k in range(num_stages):
        strides.append(tuple(min(2, p) for p in pools[k]) if k < len(pools) else (1,) * ndim)
    return strides


class SDMDiscriminator(nn.Module):
    """SASSNet's discriminator: tells SDMs predicted on labeled patches from those on unlabeled patches.

    Five convolutions as in the paper: one on the SDM and one on the image, added (the fusion), then three
    more; LeakyReLU(0.2) and channel dropout between them; global average pooling and a linear classifier
    with one logit (the published code's two-way softmax is the same model). Kernels are 4 along axes that
    are halved and 3 along axes that keep their size (see :func:`discriminator_strides`).

    ``input_pool`` (per axis, e.g. ``(2, 2, 2)``): SDM and image are average-pooled by it before the first
    convolutions, so that D runs at a lower resolution (not in the published code; None: full resolution).
    """

    def __init__(self, sdm_channels: int, image_channels: int, strides: Sequence[Sequence[int]],
                 base_features: int = 64, dropout: float = 0.5, input_pool: Sequence[int] | None = None):
        super().__init__()
        if len(strides) != 4:
            raise ValueError("the discriminator has four downsampling stages; give four strides")
        ndim = len(strides[0])
        conv_op = {2: nn.Conv2d, 3: nn.Conv3d}.get(ndim)
        if conv_op is None:
            raise ValueError(f"2d or 3d strides expected, got {strides[0]}")
        dropout_op = nn.Dropout2d if ndim == 2 else nn.Dropout3d
        pool = tuple(int(k) for k in input_pool) if input_pool is not None else (1,) * ndim
        if len(pool) != ndim or min(pool) < 1:
            raise ValueError(f"input_pool needs {ndim} factors >= 1, got {pool}")
        # no parameters: checkpoints are the same with and without it
        pool_op = nn.AvgPool2d if ndim == 2 else nn.AvgPool3d
        self.input_pool = pool_op(pool) if max(pool) > 1 else nn.Identity()

        def conv(cin: int, cout: int, stride: Sequence[int]) -> nn.Module:
            kernel = tuple(4 if s == 2 else 3 for s in stride)
            return conv_op(cin, cout, kernel_size=kernel, stride=tuple(stride), padding=1)

        f = base_features
        self.sdm_conv = conv(sdm_channels, f, strides[0])
        self.image_conv = conv(image_channels, f, strides[0])
        self.body = nn.Sequential(
            nn.LeakyReLU(0.2), dropout_op(dropout),
            conv(f, 2 * f, strides[1]), nn.LeakyReLU(0.2), dropout_op(dropout),
            conv(2 * f, 4 * f, strides[2]), nn.LeakyReLU(0.2), dropout_op(dropout),
            conv(4 * f, 8 * f, strides[3]), nn.LeakyReLU(0.2),
        )
        self.classifier = nn.Linear(8 * f, 1)

    def forward(self, sdm: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Logit of "this SDM comes from a labeled patch", shape (N,)."""
        x = self.body(self.sdm_conv(self.input_pool(sdm)) + self.image_conv(self.input_pool(image)))
        x = x.flatten(2).mean(2)
        return self.classifier(x).squeeze(1)

