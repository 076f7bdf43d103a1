"""Does the unlabeled term move the network? Its gradient norm against the supervised one, per trainer.

On a few real LA scans (UA-MT's train.list order: the first ``--labeled`` labeled, the next ``--unlabeled``
unlabeled) converted, planned and preprocessed with nnU-Net's own 3d_fullres plan, every trainer named runs
``--steps`` real training steps in this process from the same seed, and each step measures
``||grad of weight(t) x unlabeled term|| / ||grad of the supervised loss||`` on the U-Net's encoder and decoder
(the trainers' own probe, :meth:`nnUNetTrainerSemiSupervised.gradient_ratio`). The ratio is linear in the
weight, so the table also gives it at the full weight (beta_max, the end of the ramp): what the term can do
at most. CPU or GPU::

    python benchmarks/gradient_ratio.py --data ../shared/data/la2018_uamt_lite_1.25mm --workdir /tmp/gradratio \\
        --output gradient_ratio.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from nnunet_sassnet.nnunet_tools import nnunet_environment, tool_command

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("NNUNET_SASSNET_DATA", REPO.parent / "shared" / "data")) / \
    "la2018_uamt_lite_1.25mm"
DEFAULT_TRAINERS = ("nnUNetTrainerSASSNet",)
#: beta_max settings of the SASSNet trainers (Paper, default, Beta005, Beta015): the ratio is linear in the weight
DEFAULT_WEIGHTS = (0.001, 0.015, 0.05, 0.15)
DATASET_ID = 871


def prepare(data: Path, workdir: Path, labeled: int, unlabeled: int, spacing: float) -> dict[str, str]:
    """Convert, plan and preprocess (labeled and unlabeled) the scans once; return nnU-Net's environment."""
    from nnunet_sassnet.conversion import convert_la2018
    from nnunet_sassnet.conversion.splits import read_case_list

    env = nnunet_environment(workdir / "raw", workdir / "preprocessed", workdir / "results", data_workers=1,
                             default_workers=2)
    if (workdir / "prepared").exists():
        return env
    train_list = read_case_list(str(data / "train.list"))
    split = {"labeled": train_list[:labeled], "unlabeled": train_list[labeled:labeled + unlabeled],
             "test": train_list[labeled + unlabeled:labeled + unlabeled + 1]}
    split_file = workdir / "split.json"
    split_file.write_text(json.dumps(split))
    convert_la2018(str(data), DATASET_ID, name="GradRatio", split=str(split_file), spacing=spacing,
                   overwrite=True, raw_dir=str(workdir / "raw"), progress=False)
    for tool, args in (("nnUNetv2_plan_and_preprocess", ["-d", DATASET_ID, "-c", "3d_fullres", "-np", "2"]),
                       ("nnunet_sassnet_preprocess_unlabeled", ["-d", DATASET_ID, "-c", "3d_fullres", "-np", "2"])):
        subprocess.run(tool_command(tool, args), env=env, check=True, stdout=subprocess.DEVNULL)
    (workdir / "prepared").write_text("done\n")
    return env


def measure(trainer_name: str, steps: int, seed: int, device: str) -> dict:
    """Run ``steps`` training steps of one trainer, measuring the gradient ratio on every step."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    np.random.seed(seed)
    torch.manual_seed(seed)
    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", "all", trainer_name, "nnUNetPlans",
                                    device=torch.device(device))
    trainer.gradient_probe_steps_per_epoch = trainer.num_iterations_per_epoch  # every step
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    ratios, weights = [], []
    for _ in range(steps):
        out = trainer.train_step(next(trainer.dataloader_train))
        ratios.append(float(out["unlabeled_grad_ratio"]))
        weights.append(float(out["unlabeled_weight"]))
    weight_max = float(trainer.unlabeled_weight_max)
    per_unit_weight = [r / w for r, w in zip(ratios, weights)]
    at_max = [r * weight_max for r in per_unit_weight]
    return {"trainer": trainer_name, "weight_max": weight_max, "steps": steps, "ratios": ratios,
            "weights": weights, "median_ratio": float(np.median(ratios)),
            "median_ratio_at_weight_max": float(np.median(at_max)),
            "range_ratio_at_weight_max": [float(min(at_max)), float(max(at_max))],
            "median_ratio_per_unit_weight": float(np.median(per_unit_weight)),
            "patch_size": list(trainer.configuration_manager.patch_size), "batch_size": trainer.batch_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LA lite folder (train.list + h5 cases)")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=4)
    parser.add_argument("--spacing", type=float, default=1.25, help="spacing of the h5 scans in mm")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trainers", nargs="+", default=list(DEFAULT_TRAINERS))
    parser.add_argument("--weights", nargs="+", type=float, default=list(DEFAULT_WEIGHTS),
                        help="weights of the unlabeled term to report the ratio at (the ratio is linear in it)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    env = prepare(args.data, args.workdir, args.labeled, args.unlabeled, args.spacing)
    # nnU-Net reads its folders when nnunetv2.paths is first imported: set them before any trainer import
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet_")})
    os.environ["nnUNet_n_proc_DA"] = "0"
    results = [measure(name, args.steps, args.seed, args.device) for name in args.trainers]

    print(f"{'trainer':34s} {'weight_max':>10s} {'ratio (t=0)':>12s} {'ratio at weight_max':>20s}")
    for r in results:
        print(f"{r['trainer']:34s} {r['weight_max']:10.4g} {r['median_ratio']:12.3g} "
              f"{r['median_ratio_at_weight_max']:20.3g}")
        for w in args.weights:
            print(f"    at weight {w:<8g} (end of the ramp): ratio {r['median_ratio_per_unit_weight'] * w:.3g}")
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": args.device, "machine": platform.processor() or platform.machine(),
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(),
           "labeled": args.labeled, "unlabeled": args.unlabeled, "results": results}
    if args.output:
        args.output.write_text(json.dumps(doc, indent=2))
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
