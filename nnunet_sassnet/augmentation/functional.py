"""nnU-Net's training transforms as batched functions on ``(B, C, *spatial)`` tensors, on any device.

Each function applies one step of nnU-Net's ``get_training_transforms`` to the samples of a batch with parameters
drawn per sample (see :mod:`~nnunet_sassnet.augmentation.parameters`), and gives what batchgeneratorsv2 gives when
it applies that step to each sample with the same parameters (image within float tolerance, segmentation exactly).
Samples a step does not touch are given by a boolean mask ``apply`` of shape ``(B,)``. Functions may work in place
on their input and return the result.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["spatial_grids", "center_crop", "resample_image", "resample_segmentation", "gaussian_noise",
           "gaussian_blur", "multiplicative_brightness", "contrast", "simulate_low_resolution", "gamma", "mirror",
           "mask_outside_segmentation", "remove_label", "segmentation_to_regions", "downsample_segmentation",
           "blur_kernel_size"]

_UPSAMPLING_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
#: grid_sample's scores of the one-hot segmentation are scaled and rounded to float16 as in batchgeneratorsv2:
#: float16's spacing of 0.25-0.5 around half the scale turns near ties into exact ones, settled by the nearest label
_SEG_SCORE_SCALE = 1000.0


def _rotation_scaling_matrices(angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``Rz @ Ry @ Rx @ S`` (3D) or ``R @ S`` (2D, angle of the last axis) per sample, float64, ``(B, d, d)``."""
    b, dim = scales.shape
    cos, sin = torch.cos(angles), torch.sin(angles)
    if dim == 2:
        rot = torch.stack((torch.stack((cos[:, -1], -sin[:, -1]), -1), torch.stack((sin[:, -1], cos[:, -1]), -1)), 1)
    else:
        one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
        rx = torch.stack((torch.stack((one, zero, zero), -1), torch.stack((zero, cos[:, 0], -sin[:, 0]), -1),
                          torch.stack((zero, sin[:, 0], cos[:, 0]), -1)), 1)
        ry = torch.stack((torch.stack((cos[:, 1], zero, sin[:, 1]), -1), torch.stack((zero, one, zero), -1),
                          torch.stack((-sin[:, 1], zero, cos[:, 1]), -1)), 1)
        rz = torch.stack((torch.stack((cos[:, 2], -sin[:, 2], zero), -1), torch.stack((sin[:, 2], cos[:, 2], zero), -1),
                          torch.stack((zero, zero, one), -1)), 1)
        rot = rz @ ry @ rx
    return rot @ torch.diag_embed(scales)


def spatial_grids(angles: torch.Tensor, scales: torch.Tensor, input_shape: Sequence[int],
                  patch_size: Sequence[int], device: torch.device) -> torch.Tensor:
    """grid_sample grids ``(B, *patch_size, d)`` of nnU-Net's rotation and scaling about the centre of the input.

    ``angles``/``scales``: ``(B, d)`` float64 (radians; 1 for no scaling). The patch's voxel grid, centred, is
    mapped by ``Rz Ry Rx S`` and placed at the centre of ``input_shape`` (what SpatialTransform does with
    ``random_crop=False`` and no elastic deformation), in grid_sample's normalised, reversed-axis coordinates.
    """
    space = [torch.linspace((1 - s) / 2, (s - 1) / 2, s) for s in patch_size]
    base = torch.stack(torch.meshgrid(space, indexing="ij"), -1).float().to(device)
    affine = _rotation_scaling_matrices(angles.double(), scales.double())
    flat = base.reshape(1, -1, len(patch_size)).expand(len(affine), -1, -1)
    grids = torch.bmm(flat, affine.transpose(1, 2).float().to(device)).view(len(affine), *patch_size, len(patch_size))
    # the centre of the input is shape / 2 in SpatialTransform's coordinates, its offset from the grid's centre 0
    grids /= torch.tensor([s / 2 for s in input_shape], device=device)
    return torch.flip(grids, (-1,))


def center_crop(x: torch.Tensor, patch_size: Sequence[int], pad_value: float) -> torch.Tensor:
    """The central ``patch_size`` of ``x`` ``(B, C, *spatial)`` (centre ``floor(shape / 2)``), padded with
    ``pad_value`` where the input is smaller: SpatialTransform's path for samples it neither rotates nor scales."""
    spatial = x.shape[2:]
    slices, pad = [slice(None), slice(None)], []
    for size, crop in zip(spatial, patch_size):
        start = size // 2 - crop // 2
        lo, hi = max(0, start), min(size, start + crop)
        slices.append(slice(lo, hi))
        pad.append((max(0, -start), crop - (hi - lo) - max(0, -start)))
    out = x[tuple(slices)]
    flat = [p for pair in reversed(pad) for p in pair]
    return F.pad(out, flat, mode="constant", value=pad_value) if any(flat) else out


def resample_image(image: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling with zeros outside the image (nnU-Net's image path of SpatialTransform)."""
    return F.grid_sample(image, grids.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def _kernel_reaches_outside(grids: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Per sample: whether a bilinear kernel at some grid point reads a voxel outside the input."""
    size = torch.tensor([float(s) for s in spatial_shape[::-1]], dtype=torch.float64)
    bound = float((1 - 1 / size).min())
    flat = grids.reshape(grids.shape[0], -1)
    return (-flat.amin(1) > bound) | (flat.amax(1) > bound)


def present_labels(segmentation: torch.Tensor) -> torch.Tensor:
    """The sorted labels present in an integer tensor (a histogram: sorting the whole volume, as
    ``torch.unique`` does on the CPU, is the slow way)."""
    lo, hi = (int(v) for v in torch.aminmax(segmentation))
    counts = torch.bincount((segmentation.flatten() - lo).long(), minlength=hi - lo + 1)
    return (counts.nonzero().flatten() + lo).to(segmentation.dtype)


def resample_segmentation(segmentation: torch.Tensor, grids: torch.Tensor, pad_label: int) -> torch.Tensor:
    """Segmentation resampling as nnU-Net's SpatialTransform does it (bilinear one-hot scores, ties to the nearest).

    Outside the input counts as label ``pad_label``. Per voxel the label with the highest bilinearly interpolated
    indicator (scaled by 1000, rounded to float16) wins; ties go to the lowest label unless the nearest
    neighbour's label is among the tied ones. ``segmentation``: ``(B, C, *spatial)`` integer labels.
    """
    b, c = segmentation.shape[:2]
    spatial = segmentation.shape[2:]
    reaches_outside = _kernel_reaches_outside(grids, spatial).to(segmentation.device)
    labels = present_labels(segmentation)
    if bool(reaches_outside.any()):
        labels = torch.unique(torch.cat((labels, torch.tensor([pad_label], dtype=labels.dtype,
                                                              device=labels.device))))
    grid = grids.float()
    nearest = F.grid_sample(segmentation.float() - pad_label, grid, mode="nearest", padding_mode="zeros",
                            align_corners=False) + pad_label
    out_shape = nearest.shape[2:]
    if len(labels) == 1:
        return torch.full((b, c, *out_shape), int(labels[0]), dtype=segmentation.dtype, device=segmentation.device)
    # one grid_sample for all labels of all channels: the indicators share the grid
    indicators = (segmentation[:, :, None] == labels.view(1, 1, -1, *([1] * len(spatial)))).float()
    indicators.mul_(_SEG_SCORE_SCALE)
    pad_index = (labels == pad_label).nonzero().flatten().tolist()
    # the padding label's indicator is 1 outside: sample (indicator - 1) with zeros padding, then add the 1 back
    for k in pad_index:
        indicators[:, :, k].sub_(_SEG_SCORE_SCALE)
    scores = F.grid_sample(indicators.flatten(1, 2), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False).view(b, c, len(labels), *out_shape)
    for k in pad_index:
        scores[:, :, k].add_(_SEG_SCORE_SCALE)
    scores = scores.to(torch.float16)
    best, winner = scores.max(2)  # first maximum: ties go to the lowest label
    result = labels[winner]
    nearest = nearest.to(segmentation.dtype)
    nearest_index = torch.searchsorted(labels, nearest.contiguous()).clamp_(max=len(labels) - 1)
    nearest_score = scores.gather(2, nearest_index[:, :, None])[:, :, 0]
    use_nearest = (nearest_score == best) & (labels[nearest_index] == nearest)
    return torch.where(use_nearest, nearest, result).to(segmentation.dtype)


def gaussian_noise(image: torch.Tensor, apply: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Adds N(0, std^2) noise to every channel of the samples in ``apply``; ``std``: ``(B,)`` (one per sample)."""
    idx = apply.nonzero().flatten()
    if len(idx):
        sub = image[idx]
        noise = torch.randn_like(sub) * std[idx].view(-1, *([1] * (image.ndim - 1))).to(image)
        image[idx] = sub + noise
    return image


def blur_kernel_size(sigma: float, truncate: float = 6.0) -> int:
    """batchgeneratorsv2's odd Gaussian kernel size for ``sigma`` (``sigma * truncate + 0.5`` to the nearest odd)."""
    n = sigma * truncate + 0.5
    rounded = round(n)
    if rounded % 2 == 1:
        return rounded
    return rounded + 1 if n - rounded >= 0 else rounded - 1


def _gaussian_kernels(sigmas: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1D Gaussian kernels ``(N, size)``, each of its own odd size (zeros around it) for its sigma."""
    kernels = torch.zeros((len(sigmas), size), dtype=torch.float32)
    for i, sigma in enumerate(sigmas.tolist()):
        if sigma <= 0:
            kernels[i, size // 2] = 1.0
            continue
        k = blur_kernel_size(sigma)
        x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        kernels[i, (size - k) // 2:(size + k) // 2] = pdf / pdf.sum()
    return kernels


def gaussian_blur(image: torch.Tensor, apply: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, one sigma per sample, channel and axis.

    ``sigmas``: ``(B, C, d)``; a sigma of 0 leaves that channel and axis as it is (channels not drawn for the blur).
    """
    idx = apply.nonzero().flatten()
    if not len(idx):
        return image
    sub = image[idx]
    n, c = sub.shape[:2]
    dim = sub.ndim - 2
    sig = sigmas[idx].cpu().float()
    size = max(blur_kernel_size(float(s)) for s in sig[sig > 0].tolist()) if bool((sig > 0).any()) else 1
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    x = sub.reshape(1, n * c, *sub.shape[2:])
    for d in range(dim):
        kernels = _gaussian_kernels(sig[..., d].flatten(), size).to(image)
        shape = [n * c, 1] + [1] * dim
        shape[2 + d] = size
        pad = [0, 0] * dim
        pad[2 * (dim - 1 - d)] = pad[2 * (dim - 1 - d) + 1] = size // 2
        x = conv(F.pad(x, pad, mode="reflect"), kernels.view(shape), groups=n * c)
    image[idx] = x.view_as(sub)
    return image


def multiplicative_brightness(image: torch.Tensor, apply: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Multiplies each channel of the samples in ``apply`` by ``multipliers`` ``(B, C)``."""
    m = torch.where(apply[:, None], multipliers, torch.ones_like(multipliers)).to(image)
    return image.mul_(m.view(*m.shape, *([1] * (image.ndim - 2))))


def contrast(image: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``(x - mean) * factor + mean`` per channel, clipped to the channel's former range (preserve_range)."""
    idx = apply.nonzero().flatten()
    if not len(idx):
        return image
    sub = image[idx]
    flat = sub.flatten(2)
    shape = (*sub.shape[:2], *([1] * (sub.ndim - 2)))
    mean = flat.mean(2).view(shape)
    lo, hi = flat.amin(2).view(shape), flat.amax(2).view(shape)
    f = factors[idx].to(image).view(shape)
    image[idx] = torch.minimum(torch.maximum((sub - mean) * f + mean, lo), hi)
    return image


def simulate_low_resolution(image: torch.Tensor, apply: torch.Tensor, channels: torch.Tensor,
                            scales: torch.Tensor) -> torch.Tensor:
    """Nearest-exact downsampling by ``scales`` ``(B, C, d)`` and linear upsampling back, for the channels drawn
    (``channels`` ``(B, C)`` bool) of the samples in ``apply``. Each channel has its own low-resolution shape."""
    spatial = image.shape[2:]
    mode = _UPSAMPLING_MODES[len(spatial)]
    for b, c in (channels & apply[:, None]).nonzero().tolist():
        new_shape = [round(s * float(f)) for s, f in zip(spatial, scales[b, c])]
        low = F.interpolate(image[b, c][None, None], new_shape, mode="nearest-exact")
        image[b, c] = F.interpolate(low, spatial, mode=mode)[0, 0]
    return image


def gamma(image: torch.Tensor, apply: torch.Tensor, gammas: torch.Tensor, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma step per channel, keeping the channel's mean and standard deviation (``p_retain_stats=1``):
    rescale to [0, 1], raise to ``gammas`` ``(B, C)``, scale back; on the negated image when ``invert``."""
    idx = apply.nonzero().flatten()
    if not len(idx):
        return image
    eps = 1e-7
    x = -image[idx] if invert else image[idx]
    shape = (*x.shape[:2], *([1] * (x.ndim - 2)))
    flat = x.flatten(2)
    mean, std = flat.mean(2).view(shape), flat.std(2).view(shape)
    lo, hi = flat.amin(2).view(shape), flat.amax(2).view(shape)
    rng = hi - lo
    x = ((x - lo) / rng.clamp(min=eps)).pow(gammas[idx].to(x).view(shape)) * rng + lo
    flat = x.flatten(2)
    mean_here, std_here = flat.mean(2).view(shape), flat.std(2).view(shape)
    x = (x - mean_here) * (std / std_here.clamp(min=eps)) + mean
    image[idx] = -x if invert else x
    return image


def mirror(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flips each sample along the spatial axes where ``flips`` ``(B, d)`` is true."""
    for pattern in torch.unique(flips, dim=0):
        axes = [2 + a for a in pattern.nonzero().flatten().tolist()]
        if not axes:
            continue
        which = (flips == pattern).all(1).nonzero().flatten().to(x.device)
        x[which] = torch.flip(x[which], axes)
    return x


def mask_outside_segmentation(image: torch.Tensor, segmentation: torch.Tensor, channels: Sequence[int],
                              value: float = 0.0) -> torch.Tensor:
    """Sets ``channels`` of the image to ``value`` where the segmentation's first channel is negative (outside the
    nonzero region, for normalisation with ``use_mask_for_norm``)."""
    outside = segmentation[:, 0] < 0
    for c in channels:
        image[:, c][outside] = value
    return image


def remove_label(segmentation: torch.Tensor, label: int, set_to: int) -> torch.Tensor:
    """Replaces ``label`` by ``set_to`` in every channel."""
    return segmentation.masked_fill_(segmentation == label, set_to)


def segmentation_to_regions(segmentation: torch.Tensor, regions: Sequence[Sequence[int] | int]) -> torch.Tensor:
    """One boolean channel per region (labels of the region in the segmentation's first channel)."""
    seg = segmentation[:, 0]
    out = [torch.isin(seg, torch.as_tensor([r] if isinstance(r, int) else list(r), device=seg.device))
           for r in regions]
    return torch.stack(out, 1)


def downsample_segmentation(segmentation: torch.Tensor, scales: Sequence[Sequence[float] | float]
                            ) -> list[torch.Tensor]:
    """Deep-supervision targets: nearest-exact downsampling to ``round(shape * scale)`` per scale."""
    results = []
    spatial = segmentation.shape[2:]
    for s in scales:
        s = list(s) if isinstance(s, (list, tuple)) else [s] * len(spatial)
        if all(i == 1 for i in s):
            results.append(segmentation)
        else:
            shape = [round(i * j) for i, j in zip(spatial, s)]
            results.append(F.interpolate(segmentation.float(), shape, mode="nearest-exact").to(segmentation.dtype))
    return results
