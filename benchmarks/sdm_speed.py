"""Exact SDM targets: our implementations against the published scipy + scikit-image code.

* CPU (target 6): ``signed_distance_map`` (the ``edt`` package) vs SASSNet's ``compute_sdf`` on 112x112x80 LA
  label patches (the published training patch), >= 2x faster, max abs difference <= 1e-5.
* GPU: ``signed_distance_map_torch`` on a batch of training-sized patches, compiled kernel vs the eager
  brute-force min-plus transform, and the error against the float64 published definition.

    python benchmarks/sdm_speed.py                      # CPU figures (LA h5 scans from ../shared)
    python benchmarks/sdm_speed.py --device cuda        # adds the GPU figures
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "la2018_uamt_h5"


def published_compute_sdf(mask: np.ndarray) -> np.ndarray:
    """SASSNet's compute_sdf for one mask (scipy + scikit-image, float64)."""
    from scipy.ndimage import distance_transform_edt as distance
    from skimage import segmentation

    posmask = mask.astype(bool)
    out = np.zeros(mask.shape)
    if posmask.any():
        negmask = ~posmask
        posdis = distance(posmask)
        negdis = distance(negmask)
        boundary = segmentation.find_boundaries(posmask, mode="inner").astype(np.uint8)
        out = (negdis - negdis.min()) / (negdis.max() - negdis.min()) \
            - (posdis - posdis.min()) / (posdis.max() - posdis.min())
        out[boundary == 1] = 0
    return out


def load_patches(data: Path, size=(112, 112, 80), count: int = 8) -> list[np.ndarray]:
    """Label patches of the published training size around the atrium; half-resolution scans are doubled."""
    patches = []
    for f in sorted(data.rglob("mri_norm2.h5"))[:count]:
        with h5py.File(f, "r") as h:
            label = h["label"][:].astype(bool)
            image = h["image"]
            if image.dtype == np.uint8:  # the 1.25 mm copy: back to the 0.625 mm grid
                label = label.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        centre = np.array(np.nonzero(label)).mean(1).astype(int)
        lo = [int(np.clip(c - s // 2, 0, max(0, n - s))) for c, s, n in zip(centre, size, label.shape)]
        patch = label[tuple(slice(a, a + s) for a, s in zip(lo, size))]
        pad = [(0, s - p) for s, p in zip(size, patch.shape)]
        patches.append(np.pad(patch, pad))
    if not patches:
        raise SystemExit(f"error: no mri_norm2.h5 under {data}")
    return patches


def time_call(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output", help="JSON file for the figures")
    args = parser.parse_args(argv)

    import torch

    from nnunet_sassnet.sdm import signed_distance_map, signed_distance_map_torch

    patches = load_patches(Path(args.data))
    results = {"date": time.strftime("%Y-%m-%d"), "patch": list(patches[0].shape), "masks": len(patches),
               "cpu_threads": os.cpu_count()}
    refs = [published_compute_sdf(p) for p in patches]
    t_pub = time_call(lambda: [published_compute_sdf(p) for p in patches], args.reps) / len(patches)
    t_ours = time_call(lambda: [signed_distance_map(p) for p in patches], args.reps) / len(patches)
    err = max(float(np.abs(signed_distance_map(p) - r).max()) for p, r in zip(patches, refs))
    results["cpu"] = {"published_s_per_mask": t_pub, "ours_s_per_mask": t_ours, "speedup": t_pub / t_ours,
                      "max_abs_error": err}
    print(f"CPU, {results['masks']} LA masks of {results['patch']}: published {t_pub * 1000:.1f} ms, "
          f"ours {t_ours * 1000:.1f} ms per mask, max abs error {err:.2e}")
    print(f"target 6 CPU SDM speed-up over the published code: {t_pub / t_ours:.2f} (pass mark >= 2) "
          f"{'PASS' if t_pub / t_ours >= 2 and err <= 1e-5 else 'MISS'}")

    if args.device == "cuda":
        device = torch.device("cuda")
        results["gpu"] = {"device": torch.cuda.get_device_name()}
        batches = {
            "2 x 112x112x80 (published patch)": torch.from_numpy(np.stack(patches[:2])),
            "2 x 96x128x192 (nnU-Net 0.625 mm plan patch)": torch.from_numpy(
                np.stack([np.pad(p, ((0, 0), (8, 8), (56, 56)))[8:104] for p in patches[:2]])),
        }
        for label, batch in batches.items():
            batch = batch.to(device)
            timings = {}
            for mode in ("t", "f"):  # compiled kernel, eager brute force
                os.environ["nnUNet_compile"] = mode
                for _ in range(3):
                    signed_distance_map_torch(batch)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    out = signed_distance_map_torch(batch)
                torch.cuda.synchronize()
                timings[mode] = (time.perf_counter() - t0) / 20
            err = max(float(np.abs(out[i].cpu().numpy() - published_compute_sdf(batch[i].cpu().numpy())).max())
                      for i in range(len(batch)))
            results["gpu"][label] = {"compiled_s": timings["t"], "eager_s": timings["f"], "max_abs_error": err}
            print(f"GPU {label}: compiled {timings['t'] * 1000:.2f} ms, eager brute force "
                  f"{timings['f'] * 1000:.2f} ms, max abs error {err:.2e}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
