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

A trainer may carry class-attribute overrides, ``NAME:attr=value,attr=value`` (values as Python literals), e.g.
``nnUNetTrainerMeanTeacherTwoView:consistency_view='intensity'`` or ``nnUNetTrainerBCP:pretraining_fraction=0``
(BCP's ratio exists in its self-training stage only); the attributes of
:class:`~nnunet_sassnet.trainers.published_loss.PublishedLossBalance` (``supervised_ce_weight``, ...) give any
trainer the published loss balance. ``--pretrained-weights CHECKPOINT`` starts every trainer from the same trained
nnU-Net model (all layers, output layers included) instead of from initialisation; ``--fixed-state`` measures
every step from the same state (see :func:`measure`).
"""
from __future__ import annotations

import argparse
import ast
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


def parse_trainer_spec(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:attr=value,...`` -> (trainer name, class-attribute overrides)."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return name, overrides


def trainer_class(name: str, overrides: dict) -> type:
    """nnU-Net's trainer class ``name``, or a subclass of it with ``overrides`` as class attributes (with the
    published loss balance mixed in when an override names one of its settings)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_sassnet.trainers.published_loss import PublishedLossBalance

    cls = recursive_find_trainer_class_by_name(name)
    if not overrides:
        return cls
    bases = (cls,)
    if any(hasattr(PublishedLossBalance, k) for k in overrides) and not issubclass(cls, PublishedLossBalance):
        bases = (PublishedLossBalance, cls)
    return type(f"{name}_measured", bases, dict(overrides))


def measure(spec: str, steps: int, seed: int, device: str, pretrained_weights: Path | None = None,
            fixed_state: bool = False) -> dict:
    """Run ``steps`` training steps of one trainer, measuring the gradient ratio on every step.

    ``fixed_state``: every step starts from the state before the first (network, optimizer, teacher, iteration):
    the ratio over several batches at one point of training, without the lag of an EMA teacher behind a network
    that moves fast (at initialisation), which late in training, at a small learning rate, is small.
    """
    import copy

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_sassnet.trainers.output_layers import load_output_layers

    trainer_name, overrides = parse_trainer_spec(spec)
    np.random.seed(seed)
    torch.manual_seed(seed)
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(DATASET_ID))
    plans = {**load_json(join(folder, "nnUNetPlans.json")), "continue_training": False}  # as nnU-Net passes them
    trainer = trainer_class(trainer_name, overrides)(
        plans=plans, configuration="3d_fullres", fold="all", dataset_json=load_json(join(folder, "dataset.json")),
        device=torch.device(device))
    trainer.gradient_probe_steps_per_epoch = trainer.num_iterations_per_epoch  # every step
    if pretrained_weights is not None:
        trainer.initialize()
        load_pretrained_weights(trainer.network, str(pretrained_weights))  # nnU-Net's -pretrained_weights
        load_output_layers(trainer.network, torch.load(pretrained_weights, map_location="cpu", weights_only=False))
    np.random.seed(seed)  # the same patches and draws for every trainer from here on
    torch.manual_seed(seed)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    start = copy.deepcopy((trainer.network.state_dict(), trainer.optimizer.state_dict(),
                           trainer.extra_checkpoint_state())) if fixed_state else None
    ratios, weights = [], []
    for _ in range(steps):
        out = trainer.train_step(next(trainer.dataloader_train))
        ratios.append(float(out["unlabeled_grad_ratio"]))
        weights.append(float(out["unlabeled_weight"]))
        if start is not None:
            trainer.network.load_state_dict(start[0])
            trainer.optimizer.load_state_dict(copy.deepcopy(start[1]))
            trainer.load_extra_checkpoint_state(copy.deepcopy(start[2]))
    weight_max = float(trainer.unlabeled_weight(trainer.total_iterations))  # at the end of the run
    # steps without an unlabeled term (BCP's pre-training) have no ratio
    per_unit_weight = [r / w for r, w in zip(ratios, weights) if w > 0 and np.isfinite(r)]
    if not per_unit_weight:
        raise RuntimeError(f"{spec}: no step had an unlabeled term (BCP: add :pretraining_fraction=0)")
    at_max = [r * weight_max for r in per_unit_weight]
    return {"trainer": spec, "weight_max": weight_max, "steps": steps, "ratios": ratios,
            "weights": weights, "median_ratio": float(np.nanmedian(ratios)),
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
    parser.add_argument("--pretrained-weights", type=Path,
                        help="an nnU-Net checkpoint of this plan that every trainer starts from")
    parser.add_argument("--fixed-state", action="store_true",
                        help="measure every step from the same state (no drift of student and teacher)")
    parser.add_argument("--note", default="", help="stored in the JSON, e.g. how --pretrained-weights was made")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    env = prepare(args.data, args.workdir, args.labeled, args.unlabeled, args.spacing)
    # nnU-Net reads its folders when nnunetv2.paths is first imported: set them before any trainer import
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet_")})
    os.environ["nnUNet_n_proc_DA"] = "0"
    results = [measure(spec, args.steps, args.seed, args.device, args.pretrained_weights, args.fixed_state)
               for spec in args.trainers]

    print(f"{'trainer':60s} {'weight_max':>10s} {'ratio (t=0)':>12s} {'ratio at weight_max':>20s}")
    for r in results:
        print(f"{r['trainer']:60s} {r['weight_max']:10.4g} {r['median_ratio']:12.3g} "
              f"{r['median_ratio_at_weight_max']:20.3g}")
        for w in args.weights:
            print(f"    at weight {w:<8g} (end of the ramp): ratio {r['median_ratio_per_unit_weight'] * w:.3g}")
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": args.device, "machine": platform.processor() or platform.machine(),
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(),
           "labeled": args.labeled, "unlabeled": args.unlabeled,
           "pretrained_weights": str(args.pretrained_weights) if args.pretrained_weights else None,
           "fixed_state": args.fixed_state, "note": args.note,
           "results": results}
    if args.output:
        args.output.write_text(json.dumps(doc, indent=2))
        print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
