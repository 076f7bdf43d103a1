"""Export a model of this package's trainers as a plain nnU-Net model, for machines without this package.

``nnunet_sassnet_export_plain -i MODEL_FOLDER -o OUTPUT_FOLDER`` writes a model folder whose checkpoints name
``nnUNetTrainer`` and hold the U-Net's weights without the SDM head (``sdm_head.*``), the discriminator or the
optimizers. The network then is exactly nnU-Net's U-Net from the plans (SASSNet's network runs that U-Net and
nothing else at inference), so plain ``nnUNetv2_predict`` gives the same segmentation as
``nnUNetv2_predict -tr nnUNetTrainerSASSNet``. The mirroring axes for test-time augmentation are kept from the
checkpoint, where nnU-Net's predictor reads them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

from nnunet_sassnet.checkpoints import load_weights_only
from nnunet_sassnet.errors import UserInputError, run_cli

#: the trainer the exported checkpoints name: nnU-Net's own, found everywhere nnU-Net is installed
PLAIN_TRAINER = "nnUNetTrainer"
#: parameters of the SDM head, which plain nnU-Net's network does not have
HEAD_PREFIX = "sdm_head."
#: model files copied as they are (nnU-Net's predictor reads the first two)
MODEL_FILES = ("dataset.json", "plans.json", "dataset_fingerprint.json")
#: checkpoint entries kept; the optimizer states are left out (they hold the SDM head's parameters too), so an
#: exported model is for inference and for ``nnUNetv2_train -pretrained_weights``, not for ``--c``
KEPT_ENTRIES = ("init_args", "current_epoch", "logging", "_best_ema", "inference_allowed_mirroring_axes")


def _plain_values(value: Any) -> Any:
    """Numpy scalars as Python numbers, so that the exported checkpoint loads with ``weights_only=True``."""
    import numpy as np

    if isinstance(value, dict):
        return {k: _plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_values(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def _plain_network(model_folder: Path, configuration: str):
    """nnU-Net's network for this model, built as nnU-Net's predictor builds it for ``nnUNetTrainer``."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((model_folder / "plans.json").read_text()))
    try:
        configuration_manager = plans_manager.get_configuration(configuration)
    except Exception as e:  # noqa: BLE001 - nnU-Net raises a bare error for an unknown configuration
        raise UserInputError(f"{model_folder / 'plans.json'}: has no configuration {configuration!r} that the "
                             f"checkpoints name; export the folder the training wrote") from e
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_inputs, num_outputs,
                                                    enable_deep_supervision=False)


def plain_checkpoint(checkpoint: dict, path: Path, network) -> dict:
    """The checkpoint for plain nnU-Net: ``nnUNetTrainer``, the U-Net's weights, the kept entries.

    ``network`` is nnU-Net's network for the model; the weights must load into it exactly (as nnU-Net's
    predictor loads them), else the checkpoint is refused.
    """
    weights = {k: v for k, v in checkpoint["network_weights"].items() if not k.startswith(HEAD_PREFIX)}
    try:
        result = network.load_state_dict(weights, strict=False)
        problems = [*(f"missing {k}" for k in result.missing_keys),
                    *(f"unexpected {k}" for k in result.unexpected_keys)]
    except RuntimeError as e:  # shapes that differ from the plans' network
        problems = [" ".join(str(e).split())[:200]]
    if problems:
        raise UserInputError(f"{path}: the network of trainer {checkpoint.get('trainer_name')!r} is not nnU-Net's "
                             f"network of the plans plus an SDM head ({'; '.join(problems[:3])}); only models of "
                             f"this package's trainers can be exported")
    plain = {k: _plain_values(checkpoint[k]) for k in KEPT_ENTRIES if k in checkpoint}
    plain["network_weights"] = weights
    plain["trainer_name"] = PLAIN_TRAINER
    return plain


def _checkpoints(model_folder: Path) -> list[Path]:
    """Every ``fold_*/checkpoint_*.pth`` of a model folder, after checking that the folder is one."""
    if not model_folder.is_dir():
        raise UserInputError(f"{model_folder}: no such folder; pass the model folder nnUNetv2_train wrote, "
                             f"$nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION")
    missing = [name for name in MODEL_FILES[:2] if not (model_folder / name).is_file()]
    checkpoints = sorted(model_folder.glob("fold_*/checkpoint_*.pth"))
    if missing or not checkpoints:
        what = f"no {' or '.join(missing)}" if missing else "no fold_*/checkpoint_*.pth"
        raise UserInputError(f"{model_folder}: is not an nnU-Net model folder ({what}); pass the folder "
                             f"nnUNetv2_train wrote, $nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION")
    return checkpoints


def export_plain_model(model_folder: str | Path, output_folder: str | Path) -> list[Path]:
    """Write ``output_folder`` as a plain nnU-Net model of ``model_folder``; returns the checkpoints written.

    Everything is written to a hidden folder beside ``output_folder`` and renamed at the end: on any error
    nothing is left behind. ``output_folder`` must not exist.
    """
    import torch

    model_folder, output_folder = Path(model_folder).resolve(), Path(output_folder).resolve()
    if output_folder.exists():
        raise UserInputError(f"{output_folder}: already exists; choose a new output folder or delete it")
    checkpoints = _checkpoints(model_folder)
    created = next((p for p in reversed(output_folder.parents) if not p.exists()), None)
    output_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = output_folder.parent / f".{output_folder.name}.partial-{uuid.uuid4().hex[:8]}"
    written = []
    try:
        staging.mkdir()
        for name in MODEL_FILES:
            if (model_folder / name).is_file():
                shutil.copy2(model_folder / name, staging / name)
        network, configuration = None, None
        for path in checkpoints:
            checkpoint = load_weights_only(path)
            if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint \
                    or "configuration" not in checkpoint.get("init_args", {}):
                raise UserInputError(f"{path}: is not a checkpoint of nnUNetv2_train (no network_weights or "
                                     f"init_args); export the model folder nnUNetv2_train wrote")
            if network is None or checkpoint["init_args"]["configuration"] != configuration:
                configuration = checkpoint["init_args"]["configuration"]
                network = _plain_network(model_folder, configuration)
            target = staging / path.relative_to(model_folder)
            target.parent.mkdir(exist_ok=True)
            torch.save(plain_checkpoint(checkpoint, path, network), target)
            written.append(output_folder / path.relative_to(model_folder))
        os.rename(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``nnunet_sassnet_export_plain``: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="nnunet_sassnet_export_plain",
        description="Write a copy of a model trained with nnunet-sassnet's trainers that plain nnU-Net runs "
                    "(checkpoints name nnUNetTrainer and hold the U-Net without the SDM head). Predict with "
                    "nnUNetv2_predict_from_modelfolder -m OUTPUT, or put OUTPUT at "
                    "$nnUNet_results/DatasetXXX_Name/nnUNetTrainer__PLANS__CONFIGURATION for nnUNetv2_predict "
                    "-tr nnUNetTrainer.")
    parser.add_argument("-i", dest="model_folder", required=True,
                        help="model folder written by nnUNetv2_train (TRAINER__PLANS__CONFIGURATION)")
    parser.add_argument("-o", dest="output_folder", required=True, help="new folder for the plain model")
    args = parser.parse_args(argv)

    def body() -> int:
        written = export_plain_model(args.model_folder, args.output_folder)
        folds = sorted({p.parent.name for p in written})
        print(f"wrote {args.output_folder}: {len(written)} checkpoints ({', '.join(folds)}) for {PLAIN_TRAINER}\n"
              f"predict with: nnUNetv2_predict_from_modelfolder -i INPUT -o OUTPUT -m {args.output_folder}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
