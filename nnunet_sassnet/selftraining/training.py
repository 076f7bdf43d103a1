"""Trained models and nnU-Net's training of one fold, in this process, through nnU-Net's ``run_training``.

A fold is trained exactly as ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS`` trains it (the
final validation included); a fold folder that an interrupted run left with ``checkpoint_latest.pth`` is
continued (``--c``), one with ``checkpoint_final.pth`` gets its final validation only (``--val``): a kill during a
training costs the epochs since nnU-Net's last checkpoint, not the training. nnU-Net's own trainers write their
checkpoints in place, so a kill while one is written leaves it truncated; such a file is moved aside
(``NAME.unreadable``) with one line saying so, and the training goes on from the next readable checkpoint
(``checkpoint_best.pth``) or from its start.
"""
from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

from nnunet_sassnet.errors import UserInputError

__all__ = ["TrainedModel", "model_folder", "find_trainer_class", "set_device_threads",
           "set_aside_unreadable_checkpoints", "load_fine_tuning_output_layers", "train_fold"]

FINAL_CHECKPOINT = "checkpoint_final.pth"
#: what nnU-Net's ``--c`` continues from, in its order of preference after checkpoint_final.pth
RESUMABLE_CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_best.pth")


def model_folder(results: Path, dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """nnU-Net's model folder: ``nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION``."""
    return results / dataset / f"{trainer}__{plans}__{configuration}"


@dataclass(frozen=True)
class TrainedModel:
    """A model folder of nnU-Net (trained or to be trained) and the folds that make the model."""

    folder: Path
    trainer: str
    plans: str
    configuration: str
    folds: tuple[str, ...]

    def checkpoint(self, fold: str) -> Path:
        return self.folder / f"fold_{fold}" / FINAL_CHECKPOINT

    def missing_folds(self) -> list[str]:
        return [f for f in self.folds if not self.checkpoint(f).is_file()]

    def describe(self) -> dict:
        return {"folder": str(self.folder), "trainer": self.trainer, "plans": self.plans,
                "configuration": self.configuration, "folds": list(self.folds)}

    @classmethod
    def from_folder(cls, folder: Path, folds: tuple[str, ...]) -> "TrainedModel":
        """A model folder that nnU-Net's training wrote (``--teacher-model``): its plans, trainer, configuration."""
        if not folder.is_dir():
            raise UserInputError(f"--teacher-model {folder}: folder not found; give a model folder that "
                                 f"nnUNetv2_train wrote (nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION)")
        for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            if not (folder / name).is_file():
                raise UserInputError(f"--teacher-model {folder}: {name} missing; give the model folder that "
                                     f"nnUNetv2_train wrote (plans.json, dataset.json, dataset_fingerprint.json, fold_X/)")
        missing = [f for f in folds if not (folder / f"fold_{f}" / FINAL_CHECKPOINT).is_file()]
        if missing:
            raise UserInputError(f"--teacher-model {folder}: no fold_{missing[0]}/{FINAL_CHECKPOINT}; train fold(s) "
                                 f"{' '.join(missing)} to the end first, or pass the trained folds with -f")
        trainer, plans_name, configuration = folder.name.split("__") if folder.name.count("__") == 2 else (
            None, None, None)
        plans = json.loads((folder / "plans.json").read_text())
        if trainer is None or configuration not in plans.get("configurations", {}):
            raise UserInputError(f"--teacher-model {folder}: not named TRAINER__PLANS__CONFIGURATION as nnU-Net "
                                 f"names its model folders; give the folder that nnUNetv2_train wrote")
        return cls(folder.resolve(), trainer, plans.get("plans_name", plans_name), configuration, folds)


def find_trainer_class(name: str, option: str) -> type:
    """nnU-Net's lookup of a trainer class by name (its own trainers, then ``nnUNet_extTrainer``)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError):
        raise UserInputError(f"{option} {name}: nnU-Net finds no trainer of that name (nor in nnUNet_extTrainer); "
                             f"check the spelling, e.g. nnUNetTrainer or nnUNetTrainerSASSNet") from None


def set_device_threads(device: str) -> None:
    """Torch's threads as ``nnUNetv2_train -device`` sets them; ``OMP_NUM_THREADS`` caps them on the CPU."""
    import torch

    from nnunet_sassnet.nnunet_tools import cap_torch_threads

    if device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
        cap_torch_threads()
    elif device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def _unreadable(path: Path) -> str | None:
    """Why torch cannot load the checkpoint ``path``; None where it can."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated zip or pickle fails in many ways, all of them mean unreadable
        return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    return None


def set_aside_unreadable_checkpoints(fold_folder: Path) -> list[Path]:
    """Move each checkpoint of ``fold_folder`` that torch cannot load (cut short by a kill while it was written) to
    ``NAME.unreadable``, saying so in one line; returns the files moved. nnU-Net's ``--c`` then continues from the
    next checkpoint that is there, or the training starts again."""
    names = (FINAL_CHECKPOINT, *RESUMABLE_CHECKPOINTS)
    unreadable = {name: why for name in names if (fold_folder / name).is_file()
                  and (why := _unreadable(fold_folder / name)) is not None}
    for name in unreadable:
        (fold_folder / name).replace(fold_folder / f"{name}.unreadable")
    left = [n for n in names if (fold_folder / n).is_file()]
    going_on = f"continuing from {left[0]}" if left else "training from the start"
    for name, why in unreadable.items():
        print(f"{fold_folder / name}: unreadable ({why}; a kill while it was written?), moved to "
              f"{name}.unreadable; {going_on}", flush=True)
    moved = [fold_folder / name for name in unreadable]
    return moved


def load_fine_tuning_output_layers(trainer, pretrained_weights: Path) -> list[str]:
    """The output layers of ``pretrained_weights`` into the trainer's network, which nnU-Net's
    ``-pretrained_weights`` loading leaves out (it expects another label set). A student has the labeled
    dataset's labels (with ``--ignore-below`` also the ignore label, which is no output channel), so its output
    layers are loaded too, where the labels and each layer's shape match (:func:`load_output_layers`, as this
    package's trainers do it); the log and the console name what was loaded and what starts fresh."""
    import torch

    from nnunet_sassnet.trainers.output_layers import load_output_layers

    checkpoint = torch.load(pretrained_weights, map_location="cpu", weights_only=False)
    theirs = (checkpoint.get("init_args") or {}).get("dataset_json", {}).get("labels")
    ours = trainer.dataset_json.get("labels")
    without_ignore = [{k: v for k, v in (labels or {}).items() if k != "ignore"} for labels in (theirs, ours)]
    if theirs is not None and without_ignore[0] != without_ignore[1]:
        loaded, fresh = [], {"output layers": f"the student's labels {theirs} differ from {ours}"}
    else:
        loaded, fresh = load_output_layers(trainer.network, checkpoint)
    lines = [f"Fine-tuning: output layers from {pretrained_weights}: loaded {', '.join(loaded) or 'none'}"]
    lines += [f"  starts fresh: {layer} ({why})" for layer, why in sorted(fresh.items())]
    for line in lines:
        trainer.print_to_log_file(line)
        print(line, flush=True)
    return loaded


def _train_from_pretrained(dataset: str, model: TrainedModel, fold: str, device: str,
                           pretrained_weights: Path) -> None:
    """``run_training(..., pretrained_weights=...)`` in nnU-Net's order (one GPU), with the output layers loaded
    after nnU-Net's loader has loaded the rest."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    trainer = get_trainer_from_args(dataset, model.configuration, fold if fold == "all" else int(fold),
                                    model.trainer, model.plans, device=torch.device(device))
    maybe_load_checkpoint(trainer, False, False, str(pretrained_weights))
    load_fine_tuning_output_layers(trainer, pretrained_weights)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    trainer.run_training()
    trainer.perform_actual_validation(False)


def train_fold(dataset: str, model: TrainedModel, fold: str, device: str,
               pretrained_weights: Path | None = None) -> str:
    """Train one fold of ``model`` on ``dataset`` (or finish it); returns what was done, for the progress line."""
    import torch
    from nnunetv2.run.run_training import run_training

    fold_folder = model.folder / f"fold_{fold}"
    set_aside_unreadable_checkpoints(fold_folder)
    common = dict(dataset_name_or_id=dataset, configuration=model.configuration, fold=fold,
                  trainer_class_name=model.trainer, plans_identifier=model.plans, device=torch.device(device))
    if (fold_folder / FINAL_CHECKPOINT).is_file():
        run_training(**common, only_run_validation=True)
        return "its final validation (the training had ended)"
    resume = any((fold_folder / name).is_file() for name in RESUMABLE_CHECKPOINTS)
    if pretrained_weights is not None and not resume:
        _train_from_pretrained(dataset, model, fold, device, pretrained_weights)
    else:
        # nnU-Net refuses --c with -pretrained_weights: a continued fine-tuning has its weights in the checkpoint
        run_training(**common, continue_training=resume)
    if device == "cuda":
        torch.cuda.empty_cache()
    return "continued from its last checkpoint" if resume else "trained"
