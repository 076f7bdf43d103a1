"""nnU-Net's training augmentation batched on the device: each step gives nnU-Net's result for the same drawn
parameters (batchgeneratorsv2 applied sample by sample, through the pipeline nnU-Net builds), the parameters follow
nnU-Net's distributions, and trainers train with it."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sassnet.augmentation import AugmentationConfig, DeviceAugmentation
from nnunet_sassnet.augmentation import functional as AF
from nnunet_sassnet.augmentation.parameters import PROBABILITIES
from nnunet_sassnet.trainers import nnUNetTrainerBCP, trainer_variant
from nnunet_sassnet.trainers.device_augmentation import DeviceAugmentedLoader

ROTATION_3D = (-30. / 360 * 2. * np.pi, 30. / 360 * 2. * np.pi)
ROTATION_FULL = (-np.pi, np.pi)


def nnunet_pipeline(config: AugmentationConfig, ignore_label: int | None = None):
    """The transforms nnU-Net builds for ``config`` (its ComposeTransforms' list)."""
    regions = None
    if config.regions is not None:
        regions = list(config.regions[:-1]) if ignore_label is not None else list(config.regions)
    mask = [i in config.mask_channels for i in range(max(config.mask_channels, default=-1) + 1)] or None
    return nnUNetTrainer.get_training_transforms(
        np.array(config.patch_size), config.rotation, config.deep_supervision_scales, config.mirror_axes,
        config.dummy_2d, use_mask_for_norm=mask, regions=regions, ignore_label=ignore_label).transforms


def blob_batch(rng: np.random.Generator, batch: int, channels: int, shape: tuple[int, ...], labels: int = 3,
               padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth images and blob segmentations with labels 0..labels-1; the loader's padding (-1) along one side."""
    low = torch.from_numpy(rng.normal(size=(batch, channels + 1, *[max(2, s // 4) for s in shape]))).float()
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    smooth = F.interpolate(low, shape, mode=mode, align_corners=False)
    image = smooth[:, :channels] * 2 + 0.1 * torch.from_numpy(rng.normal(size=(batch, channels, *shape))).float()
    seg = torch.bucketize(smooth[:, channels:].contiguous(), torch.linspace(-0.3, 0.3, labels - 1)).to(torch.int16)
    if padded:
        seg[:, :, :2] = -1
        image[:, :, :2] = 0
    return image, seg


def reference(transforms, image: torch.Tensor, seg: torch.Tensor | None, params, i: int) -> dict:
    """nnU-Net's transforms applied to sample ``i`` with the batched step's parameters for that sample."""
    p = params.subset(i)
    data = {"image": image[i].clone()}
    if seg is not None:
        data["segmentation"] = seg[i].clone()
    channels = image.shape[1]
    for t in transforms:
        if isinstance(t, RandomTransform):
            inner, applied = t.transform, None
            if isinstance(inner, GaussianNoiseTransform):
                applied = bool(p.noise)
                inner_params = {"num_apply": 0}  # noise is random by nature: tested on its own
                assert not applied, "the reference cannot add nnU-Net's noise"
            elif isinstance(inner, GaussianBlurTransform):
                applied = bool(p.blur)
                chosen = p.blur_sigmas[:, 0] > 0
                inner_params = {"apply_to_channel": chosen,
                                "sigmas": [p.blur_sigmas[c].tolist() for c in range(channels) if chosen[c]]}
            elif isinstance(inner, MultiplicativeBrightnessTransform):
                applied = bool(p.brightness)
                inner_params = {"apply_to_channel": torch.arange(channels),
                                "multipliers": p.brightness_factors.float()}
            elif isinstance(inner, ContrastTransform):
                applied = bool(p.contrast)
                inner_params = {"apply_to_channel": torch.arange(channels), "multipliers": p.contrast_factors.float()}
            elif isinstance(inner, SimulateLowResolutionTransform):
                applied = bool(p.low_resolution)
                idx = p.low_resolution_channels.nonzero().flatten()
                inner_params = {"apply_to_channel": idx, "scales": p.low_resolution_scales[idx].float()}
            elif isinstance(inner, GammaTransform):
                inverted = inner.p_invert_image == 1
                applied = bool(p.gamma_inverted if inverted else p.gamma)
                values = p.gamma_inverted_values if inverted else p.gamma_values
                inner_params = {"apply_to_channel": torch.arange(channels),
                                "retain_stats": torch.ones(channels, dtype=torch.bool),
                                "invert_image": torch.full((channels,), inverted), "gamma": values.float()}
            else:
                raise AssertionError(f"nnU-Net's pipeline has a step the test does not know: {inner}")
            if applied:
                data = inner.apply(data, **inner_params)
        elif isinstance(t, SpatialTransform):
            t = copy.deepcopy(t)
            t.p_rotation = t.p_scaling = float(p.resampled)
            t.rotation = lambda image, dim: float(p.angles[dim])
            t.scaling = lambda image, dim: float(p.scales[0])
            data = t(**data)
        elif isinstance(t, MirrorTransform):
            data = t.apply(data, axes=p.mirror.nonzero().flatten().tolist())
        else:
            data = t(**data)
    return data


def compare(config: AugmentationConfig, image, seg, params, ignore_label=None):
    """Batched result == nnU-Net's per-sample result (image to float tolerance, targets exactly)."""
    transforms = nnunet_pipeline(config, ignore_label)
    out_image, out_target = DeviceAugmentation(config).apply(image.clone(), seg.clone() if seg is not None
                                                             else None, params)
    for i in range(image.shape[0]):
        ref = reference(transforms, image, seg, params, i)
        torch.testing.assert_close(out_image[i], ref["image"], rtol=1e-4, atol=1e-4)
        if seg is None:
            continue
        targets = out_target if isinstance(out_target, list) else [out_target]
        refs = ref["segmentation"] if isinstance(ref["segmentation"], list) else [ref["segmentation"]]
        assert len(targets) == len(refs)
        for mine, theirs in zip(targets, refs):
            assert mine[i].dtype == theirs.dtype and mine[i].shape == theirs.shape
            assert torch.equal(mine[i], theirs), f"sample {i}: {int((mine[i] != theirs).sum())} voxels differ"


def everything_applied(augmentation: DeviceAugmentation, batch: int, channels: int):
    """Parameters with every step but noise applied to every other sample (the rest cropped and mirrored only)."""
    params = augmentation.draw(batch, channels)
    on = torch.arange(batch) % 2 == 0
    for name in ("rotate", "scale", "blur", "brightness", "contrast", "low_resolution", "gamma_inverted", "gamma"):
        setattr(params, name, on.clone())
    params.angles = torch.where(on[:, None], torch.from_numpy(
        np.random.default_rng(1).uniform(*augmentation.config.rotation, size=params.angles.shape)), 0.)
    params.scales = torch.where(on[:, None], torch.linspace(0.75, 1.35, batch)[:, None].double(), 1.).expand_as(
        params.scales).clone()
    params.noise[:] = False
    return params


@pytest.mark.parametrize("dummy_2d", [False, True])
def test_3d_pipeline_matches_nnunet(dummy_2d):
    rng = np.random.default_rng(0)
    patch = (8, 16, 16) if dummy_2d else (12, 16, 16)
    enlarged = (8, 24, 26) if dummy_2d else (20, 24, 26)
    config = AugmentationConfig(patch, ROTATION_FULL if dummy_2d else ROTATION_3D, dummy_2d, (0, 1, 2),
                                deep_supervision_scales=((1, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    image, seg = blob_batch(rng, 6, 2, enlarged)
    compare(config, image, seg, everything_applied(DeviceAugmentation(config), 6, 2))


def test_2d_regions_ignore_label_and_mask_match_nnunet():
    rng = np.random.default_rng(1)
    config = AugmentationConfig((20, 24), ROTATION_FULL, False, (0, 1), mask_channels=(0,),
                                regions=((1, 2), 2, 3), deep_supervision_scales=((1, 1), (0.5, 0.5)))
    image, seg = blob_batch(rng, 6, 2, (30, 34), labels=4)
    compare(config, image, seg, everything_applied(DeviceAugmentation(config), 6, 2), ignore_label=3)


def test_drawn_parameters_match_nnunet_for_many_batches():
    """Any drawn parameters (noise off), a batch with labels touching the border and no segmentation."""
    config = AugmentationConfig((12, 16, 16), ROTATION_3D, False, (0, 1, 2))
    augmentation = DeviceAugmentation(config, np.random.default_rng(3))
    rng = np.random.default_rng(2)
    for _ in range(3):
        image, seg = blob_batch(rng, 4, 1, (20, 24, 26), padded=False)
        params = augmentation.draw(4, 1)
        params.noise[:] = False
        compare(config, image, seg, params)
        compare(config, image, None, params)


def test_gaussian_noise_has_the_drawn_spread_on_the_drawn_samples():
    image = torch.zeros(4, 2, 24, 24, 24)
    std = torch.tensor([0.05, 0.1, 0.02, 0.08], dtype=torch.float64)
    out = AF.gaussian_noise(image.clone(), torch.tensor([True, True, False, True]), std)
    assert torch.equal(out[2], image[2])
    for i in (0, 1, 3):
        assert abs(float(out[i].std()) / float(std[i]) - 1) < 0.03 and abs(float(out[i].mean())) < 0.01


def _within_binomial(hits: np.ndarray, p: float) -> None:
    n = hits.size
    sd = np.sqrt(p * (1 - p) / n)
    assert abs(hits.mean() - p) < 4.5 * sd, (hits.mean(), p)


def test_parameter_distributions_follow_nnunets_pipeline():
    """Frequencies within their binomial interval, ranges and synchronisation as nnU-Net's transforms say."""
    config = AugmentationConfig((12, 16, 16), ROTATION_3D, False, (0, 1, 2))
    transforms = nnunet_pipeline(config)
    params = DeviceAugmentation(config, np.random.default_rng(5)).draw(20000, 2)
    spatial = next(t for t in transforms if isinstance(t, SpatialTransform))
    _within_binomial(params.rotate.numpy(), spatial.p_rotation)
    _within_binomial(params.scale.numpy(), spatial.p_scaling)
    assert spatial.p_elastic_deform == 0 and spatial.p_rot_per_axis == 1 and not spatial.random_crop
    assert spatial.p_synchronize_scaling_across_axes == 1
    scales = params.scales[params.scale]
    assert torch.all(scales == scales[:, :1]) and spatial.scaling[0] <= scales.min() and \
        scales.max() <= spatial.scaling[1]
    angles = params.angles[params.rotate]
    assert angles.min() >= config.rotation[0] and angles.max() <= config.rotation[1] and angles.std(0).min() > 0.25
    assert torch.all(params.angles[~params.rotate] == 0) and torch.all(params.scales[~params.scale] == 1)
    steps = {type(t.transform): t for t in transforms if isinstance(t, RandomTransform)}
    gammas = [t for t in transforms if isinstance(t, RandomTransform) and isinstance(t.transform, GammaTransform)]
    frequencies = {GaussianNoiseTransform: params.noise, GaussianBlurTransform: params.blur,
                   MultiplicativeBrightnessTransform: params.brightness, ContrastTransform: params.contrast,
                   SimulateLowResolutionTransform: params.low_resolution}
    for kind, drawn in frequencies.items():
        _within_binomial(drawn.numpy(), steps[kind].apply_probability)
    inverted = next(t for t in gammas if t.transform.p_invert_image == 1)
    plain = next(t for t in gammas if t.transform.p_invert_image == 0)
    _within_binomial(params.gamma_inverted.numpy(), inverted.apply_probability)
    _within_binomial(params.gamma.numpy(), plain.apply_probability)
    blur = steps[GaussianBlurTransform].transform
    _within_binomial((params.blur_sigmas[..., 0] > 0).numpy(), blur.p_per_channel)
    sig = params.blur_sigmas[params.blur_sigmas > 0]
    assert blur.blur_sigma[0] <= sig.min() and sig.max() <= blur.blur_sigma[1]
    assert not blur.synchronize_axes and params.blur_sigmas[..., 0].ne(params.blur_sigmas[..., 1]).any()
    low = steps[SimulateLowResolutionTransform].transform
    _within_binomial(params.low_resolution_channels.numpy(), low.p_per_channel)
    assert low.synchronize_axes and torch.all(params.low_resolution_scales == params.low_resolution_scales[..., :1])
    assert low.scale[0] <= params.low_resolution_scales.min() and params.low_resolution_scales.max() <= low.scale[1]
    noise = steps[GaussianNoiseTransform].transform
    assert noise.noise_variance[0] <= params.noise_std.min() and params.noise_std.max() <= noise.noise_variance[1]
    # brightness, contrast, gamma: nnU-Net's BGContrast, half of the factors below 1, channels not synchronised
    for factors, kind in ((params.brightness_factors, MultiplicativeBrightnessTransform),
                          (params.contrast_factors, ContrastTransform)):
        lo, hi = steps[kind].transform.__dict__.get("multiplier_range", steps[kind].transform.__dict__.get(
            "contrast_range")).contrast_range
        _within_binomial((factors < 1).numpy(), 0.5)
        assert lo <= factors.min() and factors.max() <= hi and (factors[:, 0] != factors[:, 1]).all()
    lo, hi = plain.transform.gamma.contrast_range
    assert lo <= params.gamma_values.min() and params.gamma_values.max() <= hi
    _within_binomial(params.mirror.numpy(), 0.5)
    assert PROBABILITIES["mirror_per_axis"] == 0.5


# ---- trainers -----------------------------------------------------------------------------------------------
def started(trainer: str | type, augment_on_device: bool | None, **settings):
    """A trainer on the tiny dataset (fold all, CPU), loaders started; ``trainer``: a name nnU-Net finds or a
    class; ``augment_on_device`` None keeps the class's setting."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.run.run_training import get_trainer_from_args

    from conftest import SMALL_PLANS

    torch.manual_seed(0)
    if isinstance(trainer, str):
        trainer = get_trainer_from_args("990", "3d_fullres", "all", trainer, SMALL_PLANS, device=torch.device("cpu"))
    else:
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(990))
        plans = {**load_json(join(folder, f"{SMALL_PLANS}.json")), "continue_training": False}  # as nnU-Net's CLI
        trainer = trainer(plans, "3d_fullres", "all",
                          load_json(join(folder, "dataset.json")), torch.device("cpu"))
    if augment_on_device is not None:
        trainer.augment_on_device = augment_on_device
    for key, value in settings.items():
        setattr(trainer, key, value)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def test_default_on_the_cpu_keeps_the_workers_augmenting(nnunet_paths):
    trainer = started("nnUNetTrainerSDM_smoke", None)
    assert trainer.augment_on_device is None and not trainer.augments_on_device
    assert not isinstance(trainer.dataloader_train, DeviceAugmentedLoader)
    assert trainer.dataloader_train.data_loader.transforms is not None


#: BCP's two stages in four steps: labeled-labeled copy-paste for two, then labeled-unlabeled with the teacher
nnUNetTrainerBCP_device_stages = trainer_variant(
    nnUNetTrainerBCP, "nnUNetTrainerBCP_device_stages", __name__, num_epochs=4, num_iterations_per_epoch=1,
    pretraining_fraction=0.5, gradient_probe_steps_per_epoch=0)


@pytest.mark.parametrize("trainer", ["nnUNetTrainerSASSNet_smoke", nnUNetTrainerBCP_device_stages],
                         ids=["SASSNet", "BCP"])
def test_semi_supervised_trainers_train_with_both_streams_augmented_on_the_device(nnunet_paths, trainer):
    trainer = started(trainer, True)
    patch = tuple(trainer.configuration_manager.patch_size)
    # the workers load and crop only: nnU-Net's enlarged patches, no transforms
    for stream in (trainer.dataloader_train, trainer.dataloader_unlabeled):
        assert isinstance(stream, DeviceAugmentedLoader) and stream.data_loader.transforms is None
        assert tuple(next(stream.loader)["data"].shape[2:]) != patch
    labeled, unlabeled = next(trainer.dataloader_train), next(trainer.dataloader_unlabeled)
    assert labeled["data"].shape[2:] == patch and unlabeled["data"].shape[2:] == patch
    assert isinstance(labeled["target"], list) and labeled["target"][0].shape[2:] == patch
    assert labeled["target"][1].shape[2:] == tuple(s // 2 for s in patch)
    assert set(torch.unique(labeled["target"][0]).tolist()) <= {0, 1}
    # the unlabeled stream: the same pipeline without deep-supervision targets
    assert trainer.dataloader_unlabeled.augmentation.config == dataclasses.replace(
        trainer.dataloader_train.augmentation.config, deep_supervision_scales=None)
    losses = [float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(4)]
    assert all(np.isfinite(losses))


def test_supervised_trainer_on_the_device_trains_and_ends(nnunet_paths):
    trainer = started("nnUNetTrainerAugmentOnDevice", None, num_epochs=1, num_iterations_per_epoch=2,
                      num_val_iterations_per_epoch=1)
    assert trainer.augments_on_device and trainer.dataloader_train.data_loader.transforms is None
    outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
    assert all(np.isfinite(float(o["loss"])) for o in outputs)
    trainer.on_train_epoch_end(outputs)
    trainer.on_train_end()  # stops the workers of the wrapped loader
    assert not isinstance(trainer.dataloader_train, DeviceAugmentedLoader)


def test_ledger_records_where_the_augmentation_ran_and_keeps_recorded_identities():
    from benchmarks.la_semisup.ledger import augments_on_device
    from benchmarks.la_semisup.settings import RunSpec
    from benchmarks.la_semisup.trainer_lookup import class_settings, settings_id
    from nnunet_sassnet.trainers import nnUNetTrainerAugmentOnDevice, nnUNetTrainerSASSNet

    gpu, cpu = {"device_name": "NVIDIA H100 80GB HBM3"}, {"device_name": "CPU"}
    sassnet = RunSpec("nnUNetTrainerSASSNet", 0, settings=class_settings(nnUNetTrainerSASSNet))
    assert augments_on_device(sassnet, gpu) and not augments_on_device(sassnet, cpu)
    supervised = RunSpec("nnUNetTrainerAugmentOnDevice", 0, settings=class_settings(nnUNetTrainerAugmentOnDevice))
    assert augments_on_device(supervised, cpu)
    assert not augments_on_device(RunSpec("nnUNetTrainer", 0, settings={}), gpu)
    # the default (None) keeps the settings id of the runs recorded before the setting existed
    before = {k: v for k, v in sassnet.settings.items() if k != "augment_on_device"}
    assert "augment_on_device" in sassnet.settings and settings_id(sassnet.settings) == settings_id(before)
