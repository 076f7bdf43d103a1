"""The command line, checked before any work: each mistake is one line that names the file or option and the fix,
and nothing is written."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.selftraining.folders import DATASET_NAME, NnunetFolders, dataset_id_of
from nnunet_sassnet.selftraining.pseudo_labels import ConfidenceOptions, PredictorSettings
from nnunet_sassnet.selftraining.recipe import Recipe, planned_student_names
from nnunet_sassnet.selftraining.state import RoundState
from nnunet_sassnet.selftraining.student_dataset import labeled_cases, labeled_splits
from nnunet_sassnet.selftraining.training import TrainedModel, find_trainer_class, model_folder
from nnunet_sassnet.unlabeled.cases import UNLABELED_IMAGES_FOLDER, list_unlabeled_cases, read_raw_dataset_json
from nnunet_sassnet.unlabeled.labeled_copies import describe_labeled_copies, find_labeled_copies
from nnunet_sassnet.unlabeled.raw_fingerprints import FingerprintCache

__all__ = ["build_recipe"]

#: nnUNetv2_preprocess's default processes per configuration
DEFAULT_PREPROCESSING_PROCESSES = {"2d": 8, "3d_fullres": 4, "3d_lowres": 8}


def _check_ranges(args: argparse.Namespace) -> None:
    if args.rounds < 1:
        raise UserInputError(f"--rounds {args.rounds}: must be at least 1")
    for option, value in (("--ignore-below", args.ignore_below), ("--min-case-confidence", args.min_case_confidence)):
        if value is not None and not 0 < value <= 1:
            raise UserInputError(f"{option} {value}: a probability, above 0 and at most 1 (e.g. 0.9)")
    if not 0 < args.step_size <= 1:
        raise UserInputError(f"-step_size {args.step_size}: above 0 and at most 1 (nnU-Net's default 0.5)")
    for option, value in (("-npp", args.npp), ("-nps", args.nps), ("-np", args.np)):
        if value is not None and value < 0:
            raise UserInputError(f"{option} {value}: must not be negative")
    for fold in args.f:
        if fold != "all" and not fold.isdigit():
            raise UserInputError(f"-f {fold}: a fold is 'all' or a number (0 to 4 for nnU-Net's 5-fold split)")
    if len(set(args.f)) != len(args.f):
        raise UserInputError(f"-f {' '.join(args.f)}: names a fold twice")
    if "all" in args.f and len(args.f) > 1 and not args.ensemble_pseudo_labels:
        # fold all trains on every case of the student's dataset: the pseudo-labels of every teacher fold
        raise UserInputError(f"-f {' '.join(args.f)}: fold all with numbered folds; each student fold learns from "
                             f"its own teacher fold's pseudo-labels, and fold all would train on those of every "
                             f"fold: run -f all in a command of its own (or add --ensemble-pseudo-labels)")


def _unlabeled_cases(raw_dataset: Path, dataset_json: dict) -> dict[str, list[str]]:
    """The unlabeled scans to pseudo-label: those of ``imagesUnlabeled`` that are no labeled case.

    A scan that is a case of ``imagesTr`` (same name or same voxels) is left out by the rule of the unlabeled
    pipeline (:mod:`~nnunet_sassnet.unlabeled.labeled_copies`), said in one line: its pseudo-labeled copy would be
    a training case of the fold in which the labeled case validates. Fingerprints are kept in memory only: the
    checks write nothing.
    """
    unlabeled = list_unlabeled_cases(str(raw_dataset), dataset_json, needed_by="self-training pseudo-labels them")
    copies = find_labeled_copies(str(raw_dataset), list(unlabeled), FingerprintCache(None))
    if not copies:
        return unlabeled
    print(describe_labeled_copies(str(raw_dataset), copies), flush=True)
    remaining = {case: files for case, files in unlabeled.items() if case not in copies}
    if not remaining:
        raise UserInputError(f"{raw_dataset / UNLABELED_IMAGES_FOLDER}: every scan there is a case of imagesTr (same "
                             f"name or same voxels); self-training pseudo-labels scans without labels: put those "
                             f"there")
    return remaining


def _labeled_cases(raw_dataset: Path, dataset_json: dict) -> dict[str, dict]:
    labeled = labeled_cases(raw_dataset, dataset_json)
    if not labeled:
        raise UserInputError(f"{raw_dataset / 'imagesTr'}: no labeled cases; the teacher learns from them")
    missing = [files["label"] for files in labeled.values() if not Path(files["label"]).is_file()]
    if missing:
        raise UserInputError(f"{missing[0]}: label file missing for a case of imagesTr; add it or remove the case")
    return labeled


def _given_teacher(args: argparse.Namespace, folds: tuple[str, ...], dataset_json: dict,
                   raw_dataset: Path) -> TrainedModel:
    teacher = TrainedModel.from_folder(Path(args.teacher_model).expanduser(), folds)
    for option, given, actual in (("-tr", args.tr, teacher.trainer), ("-p", args.p, teacher.plans),
                                  ("-c", args.c, teacher.configuration)):
        if given is not None and given != actual:
            raise UserInputError(f"{option} {given}: --teacher-model {teacher.folder} is {actual}; leave {option} "
                                 f"out (the model folder says it) or give the model folder of {given}")
    model_json = json.loads((teacher.folder / "dataset.json").read_text())
    for key in ("labels", "channel_names", "file_ending"):
        # nnU-Net's older dataset.json files name the channels "modality"
        theirs, ours = (d.get(key, d.get("modality") if key == "channel_names" else None)
                        for d in (model_json, dataset_json))
        if theirs != ours:
            raise UserInputError(f"--teacher-model {teacher.folder}: its dataset.json has {key} {theirs}, "
                                 f"{raw_dataset / 'dataset.json'} has {ours}; give a model trained on this "
                                 f"dataset's labels and channels")
    return teacher


def _teacher_to_train(args: argparse.Namespace, folds: tuple[str, ...], folders: NnunetFolders,
                      dataset: str) -> TrainedModel:
    trainer, plans, configuration = args.tr or "nnUNetTrainer", args.p or "nnUNetPlans", args.c
    if configuration is None:
        raise UserInputError("-c missing: the configuration to train (e.g. 3d_fullres), or --teacher-model with a "
                             "trained model folder")
    plans_file = folders.preprocessed / dataset / f"{plans}.json"
    if not plans_file.is_file():
        raise UserInputError(f"{plans_file} not found: the teacher is trained on the preprocessed dataset; run "
                             f"nnUNetv2_plan_and_preprocess -d {dataset_id_of(dataset)} -c {configuration} first "
                             f"(or pass -p with your plans, or --teacher-model with a trained model)")
    return TrainedModel(model_folder(folders.results, dataset, trainer, plans, configuration), trainer, plans,
                        configuration, folds)


def _check_configuration(teacher: TrainedModel, plans: dict, plans_file: Path) -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if teacher.configuration not in plans["configurations"]:
        raise UserInputError(f"-c {teacher.configuration}: {plans_file} has no such configuration (it has "
                             f"{', '.join(plans['configurations'])})")
    if PlansManager(plans).get_configuration(teacher.configuration).previous_stage_name is not None:
        raise UserInputError(f"-c {teacher.configuration}: a cascade stage, which needs the previous stage's "
                             f"predictions; self-train 2d, 3d_fullres or 3d_lowres")


def _check_trainers(args: argparse.Namespace, teacher: TrainedModel, dataset_json: dict, raw_dataset: Path,
                    teacher_trained_here: bool) -> None:
    """Every trainer exists (nnU-Net's and this package's trainers all train on datasets with an ignore label)."""
    roles = [("--student-trainer", args.student_trainer or teacher.trainer)]
    if teacher_trained_here:
        roles.append(("-tr", teacher.trainer))
    if args.fine_tune_trainer:
        roles.append(("--fine-tune-trainer", args.fine_tune_trainer))
    for option, name in roles:
        find_trainer_class(name, option)


def _check_folds(folds: tuple[str, ...], folders: NnunetFolders, dataset: str, labeled: dict) -> None:
    numbered = [int(f) for f in folds if f != "all"]
    if not numbered:
        return
    splits = labeled_splits(folders.preprocessed / dataset, list(labeled))
    if splits is None:
        raise UserInputError(f"-f {numbered[0]}: {dataset} has {len(labeled)} labeled cases, fewer than nnU-Net's "
                             f"5-fold split needs, and no splits_final.json; pass -f all, or write "
                             f"{folders.preprocessed / dataset / 'splits_final.json'}")
    beyond = [f for f in numbered if f >= len(splits)]
    if beyond:
        # nnU-Net would train such a fold on a random 80:20 split, with pseudo-labeled cases among the validation
        raise UserInputError(f"-f {beyond[0]}: the split of {dataset} has {len(splits)} folds (0 to "
                             f"{len(splits) - 1}); pass one of those or all")


def _student_ids(args: argparse.Namespace, folders: NnunetFolders, dataset: str) -> tuple[tuple[int, ...] | None, str]:
    """--student-dataset: one ID per round (the given one, then the next ones), and the base of their names."""
    base = DATASET_NAME.fullmatch(dataset).group(2) + "_selftrain"
    if args.student_dataset is None:
        return None, base
    text = args.student_dataset
    match = DATASET_NAME.fullmatch(text)
    if match is not None:
        first, base = int(match.group(1)), match.group(2)
    elif text.isdigit():
        first = int(text)
    else:
        raise UserInputError(f"--student-dataset {text}: an ID (e.g. 511) or a name DatasetXXX_Name")
    ids = tuple(range(first, first + args.rounds))
    if not (1 <= first and ids[-1] <= 999):
        raise UserInputError(f"--student-dataset {text}: the rounds need IDs {first} to {ids[-1]}; nnU-Net's IDs "
                             f"go from 1 to 999")
    if dataset_id_of(dataset) in ids:
        raise UserInputError(f"--student-dataset {text}: {dataset} itself has that ID; choose a free one")
    return ids, base


def _check_student_ids(recipe: Recipe) -> None:
    """Each round's ID is free or holds a round of this command (the same one, or one to replace with --force)."""
    for name, identity in planned_student_names(recipe):
        holders = recipe.folders.holders(dataset_id_of(name))
        if not holders:
            continue
        raw = next((p for p in holders if p.parent == recipe.folders.raw), None)
        state = RoundState.load(raw) if raw is not None else None
        if state is None:
            raise UserInputError(f"--student-dataset: dataset ID {dataset_id_of(name)} is taken ({holders[0]}); "
                                 f"choose a free ID, or leave the option out for the next free one")
        if state.identity != identity and not recipe.force:
            differs = sorted(k for k in {*identity, *state.identity} if identity.get(k) != state.identity.get(k))
            raise UserInputError(f"--student-dataset: {raw} holds a self-training round with other settings "
                                 f"({', '.join(differs)}); choose a free ID, or add --force to replace it")


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The command line as a :class:`Recipe`; raises :class:`UserInputError` for bad input."""
    _check_ranges(args)
    folders = NnunetFolders.from_environment()
    dataset = folders.dataset_name(args.d)
    raw_dataset = folders.raw / dataset
    dataset_json = read_raw_dataset_json(str(raw_dataset))
    unlabeled = _unlabeled_cases(raw_dataset, dataset_json)
    labeled = _labeled_cases(raw_dataset, dataset_json)
    folds = tuple(args.f)
    if args.teacher_model:
        teacher = _given_teacher(args, folds, dataset_json, raw_dataset)
        plans_file = teacher.folder / "plans.json"
    else:
        teacher = _teacher_to_train(args, folds, folders, dataset)
        plans_file = folders.preprocessed / dataset / f"{teacher.plans}.json"
    plans = json.loads(plans_file.read_text())
    _check_configuration(teacher, plans, plans_file)
    confidence = ConfidenceOptions(args.ignore_below, args.min_case_confidence)
    if confidence.needs_probabilities and any(isinstance(v, (list, tuple)) for v in dataset_json["labels"].values()):
        raise UserInputError(f"{raw_dataset / 'dataset.json'}: region-based labels; --ignore-below and "
                             f"--min-case-confidence read class probabilities (softmax): leave them out")
    _check_trainers(args, teacher, dataset_json, raw_dataset, teacher_trained_here=not args.teacher_model)
    _check_folds(folds, folders, dataset, labeled)
    if args.fine_tune_trainer:
        data_identifier = plans["configurations"][teacher.configuration].get("data_identifier")
        data = folders.preprocessed / dataset / str(data_identifier)
        if not data.is_dir():
            raise UserInputError(f"--fine-tune-trainer: {data} not found; fine-tuning trains on the labeled "
                                 f"dataset's preprocessed cases: run nnUNetv2_preprocess -d {dataset_id_of(dataset)} "
                                 f"-plans_name {teacher.plans} -c {teacher.configuration} first")
    student_ids, base = _student_ids(args, folders, dataset)
    processes = args.np if args.np is not None else DEFAULT_PREPROCESSING_PROCESSES.get(teacher.configuration, 4)
    recipe = Recipe(
        folders=folders, dataset=dataset, dataset_json=dataset_json, labeled=labeled, unlabeled=unlabeled,
        teacher=teacher, teacher_given=bool(args.teacher_model),
        student_trainer=args.student_trainer or teacher.trainer, fine_tune_trainer=args.fine_tune_trainer,
        rounds=args.rounds, student_ids=student_ids, student_base_name=base, confidence=confidence,
        predictor=PredictorSettings(device=args.device, tta=not args.disable_tta, step_size=args.step_size,
                                    preprocessing_processes=args.npp, export_processes=args.nps),
        preprocessing_processes=processes, device=args.device, force=args.force,
        ensemble_pseudo_labels=args.ensemble_pseudo_labels)
    clashing = sorted({lab.case(c) for lab in recipe.labelings for c in unlabeled} & set(labeled))
    if clashing:
        raise UserInputError(f"{raw_dataset / 'imagesTr'}: case {clashing[0]} has the name of a pseudo-labeled case "
                             f"of the student's dataset (an unlabeled case with its fold's suffix); rename it")
    _check_student_ids(recipe)
    return recipe
