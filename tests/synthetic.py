"""Tiny synthetic nnU-Net datasets for the tests: bright blobs in noise, written with SimpleITK."""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk


def blob_case(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int, num_channels: int
              ) -> tuple[list[np.ndarray], np.ndarray]:
    """Images (one per channel) and a label map with ``num_classes`` foreground blobs."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    for c in range(1, num_classes + 1):
        center = np.array([rng.uniform(0.3 * s, 0.7 * s) for s in shape])
        radii = np.array([rng.uniform(0.15 * s, 0.25 * s) for s in shape])
        inside = (((grid - center) / radii) ** 2).sum(-1) <= 1.0
        label[inside] = c
    images = []
    for ch in range(num_channels):
        image = rng.normal(20.0, 8.0, shape)
        for c in range(1, num_classes + 1):
            image[label == c] += 60.0 * c * (1 + 0.3 * ch)
        images.append(np.clip(image, 0, 255).astype(np.float32))
    return images, label


def write_image(array: np.ndarray, path: str, spacing: float) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([spacing] * array.ndim)
    sitk.WriteImage(img, path)


def make_dataset(raw_dir: str, dataset_id: int, name: str = "Tiny", n_labeled: int = 4, n_unlabeled: int = 4,
                 n_test: int = 2, shape: tuple[int, ...] = (24, 24, 24), num_classes: int = 1,
                 num_channels: int = 1, spacing: float = 1.0, seed: int = 0) -> str:
    """Write Dataset{id}_{name} with imagesTr/labelsTr, imagesUnlabeled and imagesTs/labelsTs."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_dir, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    groups = [("imagesTr", "labelsTr", n_labeled, "tr"), ("imagesUnlabeled", None, n_unlabeled, "un"),
              ("imagesTs", "labelsTs", n_test, "ts")]
    for image_dir, label_dir, count, prefix in groups:
        for i in range(count):
            case = f"{prefix}{i:03d}"
            images, label = blob_case(rng, shape, num_classes, num_channels)
            for ch, image in enumerate(images):
                write_image(image, os.path.join(folder, image_dir, f"{case}_{ch:04d}.nii.gz"), spacing)
            if label_dir is not None:
                write_image(label, os.path.join(folder, label_dir, f"{case}.nii.gz"), spacing)
    labels = {"background": 0, **{f"class{c}": c for c in range(1, num_classes + 1)}}
    dataset_json = {"channel_names": {str(c): f"ch{c}" for c in range(num_channels)}, "labels": labels,
                    "numTraining": n_labeled, "file_ending": ".nii.gz"}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder
