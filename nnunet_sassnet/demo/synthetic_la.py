"""Synthetic left-atrium LGE-MRI scans in the 2018 challenge's layout, deterministic for a seed.

Each scan is a small heart-centred crop (like the crops used by the semi-supervised LA papers) written as
``<ID>/lgemri.nrrd`` (uint8) and, for labeled scans, ``<ID>/laendo.nrrd`` (cavity 0/255). The anatomy is
drawn from signed distance functions in millimetres:

* the left atrium: an irregular ellipsoid body, four pulmonary veins (curved tubes; the label stops a few
  millimetres past the ostium while the vessel goes on, as in the challenge's labels) and an appendage;
* a thin atrial wall with bright, patchy enhancement (LGE "scar"), outside the label;
* distractors with about the brightness of the atrium's blood: the left ventricle (inside its thick, dark
  myocardium), the right atrium, the ascending and the descending aorta; plus dark lungs and a textured spine.

Image formation: partial-volume edges (linear ramp over one voxel), blurring by the point spread function,
a smooth multiplicative bias field, Rician noise, and per-scan gain, contrast and noise level.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_sassnet.demo.config import SyntheticLAConfig

__all__ = ["SyntheticLAConfig", "generate_case", "write_dataset"]

IMAGE_FILE = "lgemri.nrrd"
LABEL_FILE = "laendo.nrrd"
#: "no surface nearby" for signed distances (finite, so that the smooth union stays finite)
_FAR = 1e4


# ------------------------------------------------------------------------------------------ geometry

def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random rotation matrix with each Euler angle within +-max_degrees."""
    a, b, c = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(p: np.ndarray, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray | None = None
               ) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid; ``p`` has shape (..., 3)."""
    q = p - center.astype(p.dtype)  # in p's precision: float64 operands would double the work
    if rotation is not None:
        q = q @ rotation.astype(p.dtype)  # world -> body coordinates
    q /= radii.astype(p.dtype)
    k = np.sqrt(np.einsum("...i,...i->...", q, q))
    return (k - 1.0) * radii.min()


def _segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) from ``p`` to the segment a-b, and the position t in [0, 1] along it."""
    ab = (b - a).astype(p.dtype)
    offset = p - a.astype(p.dtype)
    t = np.clip((offset @ ab) / float(ab @ ab), 0.0, 1.0)
    offset -= t[..., None] * ab  # from the closest point of the segment
    return np.sqrt(np.einsum("...i,...i->...", offset, offset)), t


def _tube(p: np.ndarray, points: list[np.ndarray], radius: float) -> np.ndarray:
    """Signed distance to a tube of constant radius along a polyline."""
    d = np.full(p.shape[:-1], _FAR)
    for a, b in zip(points[:-1], points[1:]):
        d = np.minimum(d, _segment(p, a, b)[0])
    return d - radius


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union of two signed distances with a fillet of size ~k mm (veins and appendage blend into the body)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1] varying over about ``cells`` voxels (Gaussian-filtered noise)."""
    field = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=cells, mode="reflect")
    field -= field.mean()
    return field / (np.abs(field).max() + 1e-6)


def _occupancy(distance: np.ndarray, voxel: float) -> np.ndarray:
    """Fraction of a voxel inside a surface: a linear ramp over one voxel (partial-volume effect)."""
    return np.clip(0.5 - distance / voxel, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ one scan

def generate_case(rng: np.random.Generator, shape_xyz: tuple[int, int, int], spacing: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One scan: (uint8 image, uint8 label 0/1), both as SimpleITK arrays (z, y, x).

    World axes in mm: x left-right (+x: patient left), y anterior-posterior (+y: posterior), z inferior-superior.
    """
    nx, ny, nz = shape_xyz
    shape = (nz, ny, nx)
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) * spacing for n in shape), indexing="ij")
    p = np.stack([xx, yy, zz], -1)
    extent = np.array([nx, ny, nz], dtype=np.float32) * spacing

    # the whole chest is turned a little, so orientation is not a constant the network could memorise
    chest = _rotation(rng, 12.0)
    center = extent / 2 + rng.uniform(-5, 5, 3) + np.array([0.0, 4.0, 0.0])

    def world(offset) -> np.ndarray:
        return center + chest @ np.asarray(offset, dtype=np.float64)

    # ---- left atrium body: irregular ellipsoid ------------------------------------------------------
    radii = np.array([17.0, 11.5, 12.0]) * rng.uniform(0.85, 1.15, 3)
    body_rotation = chest @ _rotation(rng, 15.0)
    irregularity = _smooth_field(rng, shape, cells=6)
    d_la = _ellipsoid(p, center, radii, body_rotation) - 2.2 * irregularity

    # ---- pulmonary veins: two left, two right, running posterior-laterally; labeled only near the ostium -
    d_vessels = np.full(shape, _FAR, dtype=np.float32)
    d_la_label = d_la.copy()
    for side in (-1.0, 1.0):
        for level in (-1.0, 1.0):
            start = np.array([side * 0.75 * radii[0], 0.45 * radii[1], level * 0.45 * radii[2]])
            direction = np.array([side * rng.uniform(0.5, 0.9), rng.uniform(0.6, 1.0), level * rng.uniform(0.1, 0.4)])
            direction /= np.linalg.norm(direction)
            bend = np.array([0.0, 0.0, level * rng.uniform(0.0, 0.3)])
            length = rng.uniform(22.0, 32.0)
            a = world(start)
            b = world(start + direction * length * 0.5)
            c = world(start + (direction + bend) * length)
            radius = rng.uniform(2.8, 4.0)
            d_vein = _tube(p, [a, b, c], radius)
            d_vessels = np.minimum(d_vessels, d_vein)
            # the challenge's labels include the veins' first few millimetres only
            cut = _segment(p, a, c)[1] * length <= rng.uniform(6.0, 10.0)
            d_la_label = _smooth_union(d_la_label, np.where(cut, d_vein, _FAR), 2.0)

    # ---- appendage: a curved finger on the anterior-left-superior side -------------------------------
    a = world([0.55 * radii[0], -0.6 * radii[1], 0.5 * radii[2]])
    b = world([0.55 * radii[0] + rng.uniform(5, 8), -0.6 * radii[1] - rng.uniform(6, 9), 0.5 * radii[2] + 3])
    c = world([0.55 * radii[0] + rng.uniform(8, 12), -0.6 * radii[1] - rng.uniform(8, 13), 0.5 * radii[2] - 2])
    d_appendage = _smooth_union(_tube(p, [a, b], rng.uniform(3.5, 4.5)), _tube(p, [b, c], rng.uniform(2.5, 3.5)), 2)
    d_la_label = _smooth_union(d_la_label, d_appendage, 2.0)
    d_la_image = _smooth_union(d_la_label, d_vessels, 2.0)

    # ---- distractors ----------------------------------------------------------------------------------
    d_lv = _ellipsoid(p, world([rng.uniform(10, 16), -radii[1] - 22, -radii[2] - 10]),
                      np.array([24.0, 20.0, 19.0]) * rng.uniform(0.9, 1.1, 3), chest @ _rotation(rng, 20))
    d_ra = _ellipsoid(p, world([-radii[0] - 13, -rng.uniform(8, 14), rng.uniform(-6, 2)]),
                      np.array([13.0, 14.0, 16.0]) * rng.uniform(0.85, 1.15, 3), chest @ _rotation(rng, 20))
    up = np.array([0.0, 0.0, 1.0])
    asc = world([rng.uniform(-8, -2), -radii[1] - rng.uniform(10, 14), 0.0])
    d_ascending = _tube(p, [asc - 80 * chest @ up, asc + 80 * chest @ up], rng.uniform(9.0, 12.0))
    desc = world([rng.uniform(12, 18), radii[1] + rng.uniform(9, 13), 0.0])
    d_descending = _tube(p, [desc - 80 * chest @ up, desc + 80 * chest @ up], rng.uniform(7.0, 9.0))
    # the atrial wall (about 2 mm) separates the cavity from its neighbours
    d_wall = d_la_image - rng.uniform(1.8, 2.6)
    d_spine = _ellipsoid(p, world([0.0, radii[1] + 24, 0.0]), np.array([16.0, 12.0, 90.0]), chest)
    d_lung_left = _ellipsoid(p, world([48, 12, 0]), np.array([22.0, 34.0, 90.0]), chest)
    d_lung_right = _ellipsoid(p, world([-48, 12, 0]), np.array([22.0, 34.0, 90.0]), chest)

    # ---- intensities (painted back to front, each structure's partial volume blended over the others) -
    voxel = spacing
    blood = rng.uniform(135, 165)
    image = 70.0 + 10.0 * _smooth_field(rng, shape, cells=4)  # mediastinum / myocardium with texture
    layers = [
        (d_lung_left, 18.0), (d_lung_right, 18.0),
        (d_spine, 105.0 + 25.0 * _smooth_field(rng, shape, cells=2)),
        # arterial blood is a little brighter than atrial blood (inflow), the other chambers' a little darker
        (d_descending, blood * rng.uniform(1.0, 1.15)), (d_ascending, blood * rng.uniform(1.0, 1.15)),
        # the left ventricle's thick myocardium is nulled (dark) in LGE images
        (d_lv - rng.uniform(7.0, 10.0), 35.0 + 10.0 * _smooth_field(rng, shape, cells=3)),
        (d_lv, blood * rng.uniform(0.8, 0.95)), (d_ra, blood * rng.uniform(0.75, 0.92)),
        # the thin atrial wall, with patchy enhancement (fibrosis) in places; outside the label
        (d_wall, 55.0 + 130.0 * np.clip(1.4 * _smooth_field(rng, shape, cells=5), 0, 1) ** 1.5),
        (d_la_image, blood),
    ]
    for distance, value in layers:
        occupancy = _occupancy(distance, voxel)
        image = image * (1 - occupancy) + value * occupancy
    image = ndimage.gaussian_filter(image, sigma=0.6)  # point spread function

    # ---- acquisition: bias field, per-scan gain and contrast, Rician noise -------------------------------
    bias = np.exp(rng.uniform(0.1, 0.3) * _smooth_field(rng, shape, cells=max(shape) // 2))
    gain, gamma = rng.uniform(0.75, 1.3), rng.uniform(0.85, 1.15)
    image = 255.0 * (np.clip(image * bias, 0, None) / 255.0) ** gamma * gain
    sigma = rng.uniform(5.0, 11.0)
    image = np.sqrt((image + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    label = (d_la_label <= 0).astype(np.uint8)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


# ------------------------------------------------------------------------------------------ data set

def _case_ids(rng: np.random.Generator, count: int) -> list[str]:
    """Challenge-like case IDs (20 upper-case letters and digits), unique and sorted like a listing."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    ids: set[str] = set()
    while len(ids) < count:
        ids.add("".join(rng.choice(alphabet, 20)))
    return sorted(ids)


def _write_nrrd(array: np.ndarray, path: Path, spacing: float) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    sitk.WriteImage(image, str(path), True)


def write_dataset(output_dir: str | os.PathLike, seed: int = 0, config: SyntheticLAConfig = SyntheticLAConfig(),
                  progress: bool = True) -> dict[str, list[str]]:
    """Write the scans into ``output_dir/<ID>/`` and the split into ``output_dir/split.json``; return the split.

    ``output_dir`` must be new or empty. Unlabeled scans get no ``laendo.nrrd``. The split JSON is the
    converter's ``--split FILE`` format.
    """
    from tqdm import tqdm

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; write the synthetic scans into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = config.num_labeled + config.num_unlabeled + config.num_test
    ids = _case_ids(rng, total)
    # shuffled, so that the three groups are not alphabetical blocks
    order = rng.permutation(total)
    groups = {"labeled": [ids[i] for i in order[:config.num_labeled]],
              "unlabeled": [ids[i] for i in order[config.num_labeled:config.num_labeled + config.num_unlabeled]],
              "test": [ids[i] for i in order[config.num_labeled + config.num_unlabeled:]]}
    # one child generator per case: a case does not change when the number of other cases does
    case_seeds = rng.integers(0, 2**63 - 1, total)
    with tqdm(total=total, desc="Generating scans", unit="scan", disable=not progress, leave=False) as bar:
        for group, case_ids in groups.items():
            for case_id in case_ids:
                case_rng = np.random.default_rng(case_seeds[ids.index(case_id)])
                jitter = case_rng.integers(-config.shape_jitter, config.shape_jitter + 1, 3)
                shape = tuple(int(s + j) for s, j in zip(config.shape, jitter))
                image, label = generate_case(case_rng, shape, config.spacing_mm)
                folder = out / case_id
                folder.mkdir()
                _write_nrrd(image, folder / IMAGE_FILE, config.spacing_mm)
                if group != "unlabeled":
                    _write_nrrd(label * np.uint8(255), folder / LABEL_FILE, config.spacing_mm)
                bar.update()
    with open(out / "split.json", "w", encoding="utf-8") as f:
        json.dump(groups, f, indent=2)
    return groups
