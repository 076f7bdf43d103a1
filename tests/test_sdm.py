"""SDM targets against the published definition (scipy + scikit-image, as in SASSNet's compute_sdf)."""
from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt
from skimage import segmentation

from conftest import LA_H5
from nnunet_sassnet.sdm import signed_distance_map, signed_distance_map_torch, signed_distance_maps


def published_sdm(mask: np.ndarray, sampling=None) -> np.ndarray:
    """SASSNet's compute_sdf for one mask (float64), with the full mask defined as -1."""
    posmask = mask.astype(bool)
    if not posmask.any():
        return np.zeros(mask.shape)
    if posmask.all():
        return -np.ones(mask.shape)
    negmask = ~posmask
    posdis = distance_transform_edt(posmask, sampling=sampling)
    negdis = distance_transform_edt(negmask, sampling=sampling)
    boundary = segmentation.find_boundaries(posmask, mode="inner").astype(np.uint8)
    sdf = (negdis - negdis.min()) / (negdis.max() - negdis.min()) \
        - (posdis - posdis.min()) / (posdis.max() - posdis.min())
    sdf[boundary == 1] = 0
    return sdf


def la_masks():
    files = sorted(LA_H5.glob("*/mri_norm2.h5"))
    if not files:
        pytest.skip(f"real LA scans not found under {LA_H5}")
    for f in files:
        with h5py.File(f, "r") as h:
            yield f.parent.name, h["label"][:]


def training_patches(label: np.ndarray, size=(112, 112, 80)):
    """A centred patch (the atrium inside) and a corner patch (the atrium cut by the patch border)."""
    c = [s // 2 for s in label.shape]
    centred = tuple(slice(max(0, ci - si // 2), max(0, ci - si // 2) + si) for ci, si in zip(c, size))
    corner = tuple(slice(0, si) for si in size)
    return label[centred], label[corner]


@pytest.mark.needs_la_data(LA_H5)
def test_equals_published_definition_on_real_la_masks():
    checked = 0
    for i, (case, label) in enumerate(la_masks()):
        # whole scans (576 x 576 x 88) of the first three only: the published scipy + scikit-image code takes
        # seconds per scan; both training patches of every scan
        for patch in ((label,) if i < 3 else ()) + training_patches(label):
            ref = published_sdm(patch)
            ours = signed_distance_map(patch)
            assert ours.dtype == np.float32 and ours.shape == patch.shape
            assert np.abs(ours - ref).max() <= 1e-5, case
            checked += 1
    assert checked == 3 + 2 * 12


@pytest.mark.needs_la_data(LA_H5)
def test_torch_implementation_equals_published_definition_on_real_la_masks():
    patches = [training_patches(label)[0] for _, label in itertools.islice(la_masks(), 4)]
    batch = torch.from_numpy(np.stack(patches))
    ours = signed_distance_map_torch(batch).numpy()
    for i, patch in enumerate(patches):
        assert np.abs(ours[i] - published_sdm(patch)).max() <= 1e-5


def edge_case_masks():
    one_voxel = np.zeros((7, 8, 9), bool)
    one_voxel[3, 4, 5] = True
    corner_voxel = np.zeros((7, 8, 9), bool)
    corner_voxel[0, 0, 0] = True
    touching = np.zeros((10, 12, 9), bool)
    touching[:, :5, 3:] = True  # cut by three patch faces
    all_but_one = np.ones((6, 6, 6), bool)
    all_but_one[2, 3, 1] = False
    rng = np.random.default_rng(0)
    noise = rng.random((11, 13, 7)) > 0.6
    disk = np.hypot(*np.mgrid[-10:11, -7:8]) <= 5  # 2D
    return {"one_voxel": one_voxel, "corner_voxel": corner_voxel, "touching_border": touching,
            "all_but_one": all_but_one, "noise": noise, "disk_2d": disk}


@pytest.mark.parametrize("name", list(edge_case_masks()))
def test_edge_cases_equal_published_definition(name):
    mask = edge_case_masks()[name]
    ref = published_sdm(mask)
    assert np.abs(signed_distance_map(mask) - ref).max() <= 1e-5
    assert np.abs(signed_distance_map_torch(torch.from_numpy(mask)[None])[0].numpy() - ref).max() <= 1e-5


def test_empty_and_full_masks():
    for impl in (lambda m: signed_distance_map(m), lambda m: signed_distance_map_torch(torch.from_numpy(m)[None])[0]):
        assert np.all(np.asarray(impl(np.zeros((4, 5, 6), bool))) == 0)
        assert np.all(np.asarray(impl(np.ones((4, 5, 6), bool))) == -1)


def test_inner_boundary_is_zero_and_signs_are_right():
    mask = edge_case_masks()["touching_border"]
    sdm = signed_distance_map(mask)
    assert np.all(sdm[~mask] > 0)
    assert sdm.max() == pytest.approx(1.0) and sdm.min() == pytest.approx(-1.0)
    # foreground voxels on the patch border without a background neighbour are not boundary
    assert sdm[0, 0, 8] < 0
    assert sdm[5, 4, 5] == 0  # background face neighbour at [5, 5, 5]


def test_spacing_variant_is_identical_on_isotropic_data_and_physical_otherwise():
    mask = edge_case_masks()["noise"]
    iso = signed_distance_map(mask, spacing=(2.5, 2.5, 2.5))
    assert np.abs(iso - signed_distance_map(mask)).max() <= 1e-6
    spacing = (0.7, 0.7, 2.5)
    ref = published_sdm(mask, sampling=spacing)
    assert np.abs(signed_distance_map(mask, spacing) - ref).max() <= 1e-5
    torch_sdm = signed_distance_map_torch(torch.from_numpy(mask)[None], spacing)[0].numpy()
    assert np.abs(torch_sdm - ref).max() <= 1e-5


def test_batched_dispatch_matches_single_masks():
    masks = edge_case_masks()
    batch = np.stack([masks["noise"][:6, :6, :6], masks["all_but_one"], np.zeros((6, 6, 6), bool)])
    out = signed_distance_maps(torch.from_numpy(batch))
    for i in range(len(batch)):
        assert torch.equal(out[i], torch.from_numpy(signed_distance_map(batch[i])))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="binary"):
        signed_distance_map(np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="spacing"):
        signed_distance_map(np.zeros((3, 3), bool), spacing=(1.0, 0.0))
