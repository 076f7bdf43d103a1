"""Cost of one discriminator update at nnU-Net's LA patch: precision, memory layout and width.

4 patches of 48x80x96 (nnU-Net's 3d_fullres plan for LA at 1.25 mm), the plan's pooling, Adam (fused),
float32 vs bfloat16/float16 autocast, NCDHW vs channels-last, 64 (published) vs 32 first-layer features.

    python benchmarks/discriminator_speed.py            # GPU figures (CUDA required)
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from nnunet_sassnet.networks import SDMDiscriminator, discriminator_strides

PATCH = (48, 80, 96)
POOLING = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]  # the LA 1.25 mm plan


def update_ms(features: int, dtype, channels_last: bool, device: str, reps: int = 30) -> float:
    d = SDMDiscriminator(1, 1, discriminator_strides(POOLING), base_features=features).to(device)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    d = d.to(memory_format=fmt)
    opt = torch.optim.Adam(d.parameters(), 1e-4, fused=True)
    sdm = torch.rand(4, 1, *PATCH, device=device).to(memory_format=fmt)
    img = torch.rand(4, 1, *PATCH, device=device).to(memory_format=fmt)
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0], device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.float16, enabled=dtype is not None):
            loss = F.binary_cross_entropy_with_logits(d(sdm, img).float(), labels)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def main() -> int:
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    for features in (64, 32):
        for dtype in (None, torch.bfloat16, torch.float16):
            for channels_last in (False, True):
                ms = update_ms(features, dtype, channels_last, "cuda")
                print(f"features {features}, {str(dtype or 'float32'):>14}, "
                      f"{'channels_last' if channels_last else 'NCDHW'}: {ms:.2f} ms per update")
    return 0


if __name__ == "__main__":
    sys.exit(main())
