"""nnU-Net's cascade (``3d_lowres`` -> ``3d_cascade_fullres``) for this package's trainers.

Labeled cases: nnU-Net's own (its loader adds the ``3d_lowres`` model's validation segmentations as one-hot input
channels). Which lowres model: this trainer's own, as nnU-Net does, or the one named by the trainer's
``previous_stage_trainer``. Unlabeled scans: that model predicts them at the start of training (see
:mod:`nnunet_sassnet.unlabeled.previous_stage`) and the unlabeled loader reads those segmentations like nnU-Net's
loader reads the labeled cases' ones.
"""
from __future__ import annotations

import os

from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

__all__ = ["previous_stage_segmentations", "previous_stage_model_folder", "previous_stage_of_unlabeled"]


def previous_stage_model_folder(trainer, trainer_name: str | None = None) -> str:
    """``<nnUNet_results>/<dataset>/<trainer>__<plans>__<previous stage>``: the lowres model of a cascade trainer
    (``trainer_name``: that model's trainer; default the cascade trainer's class, nnU-Net's rule)."""
    # nnU-Net's own folder of the previous stage (set in its __init__, for this trainer's class) names the dataset's
    # results folder
    dataset_results = os.path.dirname(os.path.dirname(os.path.dirname(trainer.folder_with_segs_from_previous_stage)))
    name = trainer_name or trainer.__class__.__name__
    return os.path.join(dataset_results, f"{name}__{trainer.plans_manager.plans_name}__"
                                         f"{trainer.configuration_manager.previous_stage_name}")


def previous_stage_segmentations(trainer, trainer_name: str) -> str:
    """nnU-Net's folder of the previous stage's segmentations of the labeled cases, for the lowres model of
    ``trainer_name`` (nnU-Net's ``folder_with_segs_from_previous_stage``)."""
    return os.path.join(previous_stage_model_folder(trainer, trainer_name), "predicted_next_stage",
                        trainer.configuration_name)


def previous_stage_of_unlabeled(trainer, unlabeled_folder: str) -> str | None:
    """Cascade trainers: the folder of the previous stage's segmentations of the unlabeled cases in
    ``unlabeled_folder`` (predicted now where needed); None for other configurations."""
    if not trainer.is_cascaded:
        return None
    from nnunet_sassnet.unlabeled import ensure_preprocessed
    from nnunet_sassnet.unlabeled.previous_stage import predict_previous_stage, previous_stage_model_fold

    lowres = trainer.configuration_manager.previous_stage_name
    model_folder = os.path.dirname(os.path.dirname(trainer.folder_with_segs_from_previous_stage))
    lowres_trainer = os.path.basename(model_folder).split("__")[0]
    plans = trainer.plans_manager.plans_name
    command = (f"nnUNetv2_train {trainer.plans_manager.dataset_name} {lowres} {trainer.fold} -tr {lowres_trainer} "
               f"-p {plans}")
    previous_stage_model_fold(model_folder, trainer.fold, command)  # refused before any preprocessing
    lowres_data = ensure_preprocessed(trainer.plans_manager.dataset_name, lowres, plans,
                                      num_processes=max(1, get_allowed_n_proc_DA()), log=trainer.print_to_log_file)
    try:
        return predict_previous_stage(model_folder, trainer.fold, lowres_data.folder, unlabeled_folder,
                                      trainer.configuration_name, trainer.device, command, trainer.print_to_log_file)
    finally:
        lowres_data.release()
