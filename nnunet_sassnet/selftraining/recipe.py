"""The self-training recipe (noisy student): its rounds, each round's steps in order, and where each is kept.

A round: the teacher (trained on the labeled scans in round 1 unless a model is given; the previous round's
model after that), its pseudo-labels of the unlabeled scans (with several folds, those of teacher fold k for
student fold k: :func:`~nnunet_sassnet.selftraining.pseudo_labels.pseudo_labelings`), the student's dataset
(labeled + pseudo-labeled cases, the teacher's plans, splits, nnU-Net's preprocessing), the student's training (nnU-Net's augmentation is
the noise) and, optionally, its fine-tuning on the labeled scans. The student (or its fine-tuned model) is the
next round's teacher. Every round has its own student dataset, which holds the round's record
(:mod:`~nnunet_sassnet.selftraining.state`); a rerun finds it by the round's identity and continues it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from nnunet_sassnet.atomic_files import write_json_atomic
from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.selftraining.folders import NnunetFolders, dataset_id_of, student_dataset_name
from nnunet_sassnet.selftraining.pseudo_labels import (ConfidenceOptions, PredictorSettings, PseudoLabeling,
                                                       make_pseudo_labels, pseudo_labelings)
from nnunet_sassnet.selftraining.state import STATE_FILE, RoundState, find_rounds
from nnunet_sassnet.selftraining.student_dataset import (ignore_label_for, labeled_splits, link_raw_dataset,
                                                         preprocess_student, student_dataset_json, student_splits,
                                                         transfer_plans)
from nnunet_sassnet.selftraining.training import TrainedModel, model_folder, train_fold

__all__ = ["Recipe", "round_identity", "fine_tuning_plans", "planned_student_names", "unlabeled_to_pseudo_label",
           "run_recipe"]


@dataclass(frozen=True)
class Recipe:
    """The checked command line: what to self-train, and how."""

    folders: NnunetFolders
    dataset: str  # the labeled dataset (with imagesUnlabeled)
    dataset_json: dict
    labeled: dict[str, dict]  # case -> {"images": [...], "label": ...}
    unlabeled: dict[str, list[str]]  # case -> its channel files
    teacher: TrainedModel  # round 1's teacher
    teacher_given: bool  # --teacher-model: never trained nor deleted here
    student_trainer: str
    fine_tune_trainer: str | None
    rounds: int
    student_ids: tuple[int, ...] | None  # --student-dataset: one ID per round; None: the next free ones
    student_base_name: str
    confidence: ConfidenceOptions
    predictor: PredictorSettings
    preprocessing_processes: int
    device: str
    force: bool
    ensemble_pseudo_labels: bool = False  # every student fold learns from all teacher folds (optimistic validation)

    @property
    def plans(self) -> str:
        """Every student's plans identifier: the first teacher's."""
        return self.teacher.plans

    @property
    def ignore_label(self) -> int | None:
        return ignore_label_for(self.dataset_json, self.confidence.ignore_below)

    @property
    def labelings(self) -> list[PseudoLabeling]:
        """Which teacher folds pseudo-label for which student folds (the same folds in every round)."""
        return pseudo_labelings(self.teacher.folds, self.ensemble_pseudo_labels)

    @property
    def pseudo_label_folds(self) -> dict[str, list[str]]:
        """Student fold -> the teacher folds its pseudo-labels come from."""
        return {s: list(lab.teacher_folds) for lab in self.labelings for s in lab.student_folds}


def round_identity(recipe: Recipe, teacher: TrainedModel) -> dict:
    """What a round is: a rerun with the same identity continues it, another one is another round."""
    return {"dataset": recipe.dataset, "teacher": str(teacher.folder), "folds": list(teacher.folds),
            "configuration": teacher.configuration, "plans": recipe.plans, "student_trainer": recipe.student_trainer,
            "fine_tune_trainer": recipe.fine_tune_trainer, "ignore_below": recipe.confidence.ignore_below,
            "min_case_confidence": recipe.confidence.min_case_confidence, "tta": recipe.predictor.tta,
            "step_size": recipe.predictor.step_size,
            "pseudo_labels": "ensemble" if len(recipe.labelings) == 1 and len(teacher.folds) > 1 else "per_fold"}


def fine_tuning_plans(recipe: Recipe, student_name: str) -> str:
    """The plans identifier of a student's fine-tuning on the labeled dataset: the plans under a name of their
    own in the labeled dataset's preprocessed folder, so that the fine-tuned model gets a model folder of its own
    there (``TRAINER__<plans>_finetuned<ID>__CONFIGURATION``) beside the teacher's, on the same preprocessed data."""
    return f"{recipe.plans}_finetuned{dataset_id_of(student_name):03d}"


def _student(recipe: Recipe, student_name: str) -> TrainedModel:
    folder = model_folder(recipe.folders.results, student_name, recipe.student_trainer, recipe.plans,
                          recipe.teacher.configuration)
    return TrainedModel(folder, recipe.student_trainer, recipe.plans, recipe.teacher.configuration,
                        recipe.teacher.folds)


def _fine_tuned(recipe: Recipe, student_name: str) -> TrainedModel | None:
    if recipe.fine_tune_trainer is None:
        return None
    plans = fine_tuning_plans(recipe, student_name)
    folder = model_folder(recipe.folders.results, recipe.dataset, recipe.fine_tune_trainer, plans,
                          recipe.teacher.configuration)
    return TrainedModel(folder, recipe.fine_tune_trainer, plans, recipe.teacher.configuration, recipe.teacher.folds)


def _round_model(recipe: Recipe, student_name: str) -> TrainedModel:
    """A round's model, the next round's teacher: the fine-tuned student, else the student."""
    return _fine_tuned(recipe, student_name) or _student(recipe, student_name)


def planned_student_names(recipe: Recipe) -> list[tuple[str, dict]]:
    """With --student-dataset: each round's dataset name and identity, known before any work."""
    names, teacher = [], recipe.teacher
    for number, dataset_id in enumerate(recipe.student_ids or (), 1):
        name = student_dataset_name(dataset_id, recipe.student_base_name, number)
        names.append((name, round_identity(recipe, teacher)))
        teacher = _round_model(recipe, name)
    return names


class _Progress:
    """One line per step, in nnU-Net's manner (nnU-Net's own output and progress bars come in between)."""

    def __init__(self, recipe: Recipe, state: RoundState):
        self.prefix = f"Self-training round {state.round}/{recipe.rounds} ({state.folder.name})"

    def __call__(self, message: str) -> None:
        print(f"{self.prefix}: {message}", flush=True)


def _step(state: RoundState, say: _Progress, step: str, what: str, work: Callable[[], None]) -> None:
    if state.done(step):
        say(f"{what}: done earlier, kept")
        return
    say(f"{what}...")
    state.start(step)
    work()
    state.finish(step)
    say(f"{what}: done in {state.steps[step]['seconds']:.0f} s")


def _train_folds(state: RoundState, say: _Progress, step: str, dataset: str, model: TrainedModel, device: str,
                 skip: tuple[str, ...] = (), pretrained: TrainedModel | None = None) -> None:
    for fold in model.folds:
        if state.fold_done(step, fold) or fold in skip:
            continue
        say(f"{step}: fold {fold} of {model.trainer} on {dataset}")
        how = train_fold(dataset, model, fold, device, pretrained.checkpoint(fold) if pretrained else None)
        state.finish_fold(step, fold)
        say(f"{step}: fold {fold} {how}")


def _open_round(recipe: Recipe, number: int, teacher: TrainedModel) -> RoundState:
    """This round's record: the one a run with the same identity left, else a new student dataset."""
    identity, raw = round_identity(recipe, teacher), recipe.folders.raw
    if recipe.student_ids is not None:
        name = student_dataset_name(recipe.student_ids[number - 1], recipe.student_base_name, number)
        # checked before any work: the ID is free, or holds a round of this command (this one, or one to replace)
        holder = next((p for p in recipe.folders.holders(dataset_id_of(name)) if p.parent == raw), None)
        state = RoundState.load(holder) if holder is not None else None
    else:
        state = next((s for s in find_rounds(raw) if s.identity == identity), None)
        name = state.folder.name if state is not None else student_dataset_name(
            recipe.folders.next_free_id(dataset_id_of(recipe.dataset)), recipe.student_base_name, number)
    # a round of other settings in the given ID: replaced with --force only (see the checks)
    if state is not None and (recipe.force or state.identity != identity or state.redo):
        why = "--force" if recipe.force or state.identity != identity else f"to redo ({state.redo})"
        print(f"Self-training round {number}: {why}: deleting {state.folder.name} and what its steps made",
              flush=True)
        name = state.folder.name
        _remove_round(recipe, state)
        state = None
    if state is None:
        (raw / name).mkdir(parents=True)
        state = RoundState(folder=raw / name, identity=identity, round=number)
        state.save()
    return state


def _remove_round(recipe: Recipe, state: RoundState) -> None:
    """Delete a round (``--force``): the student's dataset and models, the fine-tuned models and their plans, and
    the teacher's folds that this round trained, unless another round uses them. Rounds whose teacher was this
    round's student or fine-tuned model are marked to redo: no record stays "done" against deleted weights."""
    name = state.folder.name
    others = [s for s in find_rounds(recipe.folders.raw) if s.folder != state.folder]
    fine_tuned = _fine_tuned(replace(recipe, fine_tune_trainer=state.identity.get("fine_tune_trainer")), name)
    student = _student(replace(recipe, student_trainer=state.identity.get("student_trainer",
                                                                          recipe.student_trainer)), name)
    for model in filter(None, (fine_tuned, student)):
        for other in others:
            if other.identity.get("teacher") == str(model.folder) and not other.redo:
                other.mark_redo(f"its teacher {model.folder} was deleted by --force of {name}")
                print(f"Self-training: {other.folder.name} learnt from {model.folder}, which is deleted: marked to "
                      f"redo (the same command for it redoes it)", flush=True)
    if fine_tuned is not None:
        shutil.rmtree(fine_tuned.folder, ignore_errors=True)
        (recipe.folders.preprocessed / recipe.dataset / f"{fine_tuned.plans}.json").unlink(missing_ok=True)
    teacher_folder = Path(state.identity["teacher"])
    for fold in state.steps.get("teacher", {}).get("folds_done", []):
        users = [o.folder.name for o in others
                 if o.identity.get("teacher") == str(teacher_folder) and fold in o.identity.get("folds", [])]
        if users:
            print(f"Self-training: teacher fold {fold} ({teacher_folder}) kept: round(s) {', '.join(users)} use it",
                  flush=True)
            continue
        shutil.rmtree(teacher_folder / f"fold_{fold}", ignore_errors=True)
    recipe.folders.remove_dataset(name)


def _teacher_step(recipe: Recipe, state: RoundState, say: _Progress, teacher: TrainedModel) -> None:
    if state.round > 1 or recipe.teacher_given:
        # a trained model: nothing to do, and never deleted by --force
        what = "the previous round's model" if state.round > 1 else "the given model"
        if not state.done("teacher"):
            state.start("teacher")
            state.finish("teacher")
        say(f"teacher: {what}, {teacher.folder} (folds {' '.join(teacher.folds)})")
        return

    def work() -> None:
        # folds that had ended before this command first ran are the user's: reused, never trained nor deleted
        if "reused_folds" not in state.details:
            state.details["reused_folds"] = [f for f in teacher.folds if teacher.checkpoint(f).is_file()]
            state.save()
        reused = tuple(state.details["reused_folds"])
        if reused:
            say(f"teacher: fold(s) {' '.join(reused)} trained already in {teacher.folder}, reused")
        _train_folds(state, say, "teacher", recipe.dataset, teacher, recipe.device, skip=reused)

    _step(state, say, "teacher", f"teacher {teacher.trainer} on {recipe.dataset}, fold(s) "
                                 f"{' '.join(teacher.folds)}", work)


def _kept_cases(state: RoundState) -> list[str]:
    return sorted(c for c, record in state.cases.items() if record["kept"])


def unlabeled_to_pseudo_label(recipe: Recipe) -> dict[str, list[str]]:
    """The unlabeled cases (case -> its channel files) that the teacher pseudo-labels and the student's dataset
    holds as training cases: the one place that decides it. Scans that are labeled cases were left out when the
    command was checked (``checks._unlabeled_cases``, the unlabeled pipeline's rule)."""
    return recipe.unlabeled


def _pseudo_labeled_images(recipe: Recipe) -> dict[str, tuple[list[str], PseudoLabeling]]:
    """Each pseudo-labeled case of the student's dataset -> its images and the labeling it belongs to."""
    return {lab.case(case): (images, lab) for lab in recipe.labelings
            for case, images in unlabeled_to_pseudo_label(recipe).items()}


def _pseudo_labels_step(recipe: Recipe, state: RoundState, say: _Progress, teacher: TrainedModel) -> None:
    if len(teacher.folds) > 1:
        if recipe.ensemble_pseudo_labels:
            say(f"pseudo-labels: the ensemble of folds {' '.join(teacher.folds)} for every student fold "
                f"(--ensemble-pseudo-labels): each student fold's validation cases were training cases of the other "
                f"teacher folds, so the students' cross-validation (and nnUNetv2_find_best_configuration) is "
                f"optimistic")
        else:
            say("pseudo-labels: student fold k learns from teacher fold k alone (its validation cases stay unseen)")
    state.details["pseudo_label_folds"] = recipe.pseudo_label_folds
    state.save()

    def work() -> None:
        cases = unlabeled_to_pseudo_label(recipe)
        for lab in recipe.labelings:
            make_pseudo_labels(replace(teacher, folds=lab.teacher_folds),
                               {lab.case(case): images for case, images in cases.items()}, state.folder,
                               recipe.dataset_json, recipe.ignore_label, recipe.confidence, recipe.predictor, state)
        if not _kept_cases(state):
            best = max(r["confidence"] for r in state.cases.values())
            raise UserInputError(f"--min-case-confidence {recipe.confidence.min_case_confidence}: every unlabeled "
                                 f"case is below it (highest: {best:.4f}; all in {state.path}); pass a lower value")

    _step(state, say, "pseudo_labels", f"pseudo-labels of {len(unlabeled_to_pseudo_label(recipe))} unlabeled cases "
                                       f"with nnU-Net's predictor", work)
    kept = _kept_cases(state)
    if recipe.confidence.needs_probabilities:
        ignored = sum(r.get("ignored_voxels", 0) for c, r in state.cases.items() if c in kept)
        voxels = sum(state.cases[c]["voxels"] for c in kept)
        say(f"pseudo-labels: {len(kept)} of {len(state.cases)} cases kept"
            + (f", {100 * ignored / voxels:.1f} % of their voxels ignored" if recipe.ignore_label is not None
               and recipe.confidence.ignore_below is not None else ""))


def _dataset_step(recipe: Recipe, state: RoundState, say: _Progress, teacher: TrainedModel) -> None:
    def work() -> None:
        pseudo_labeled = _pseudo_labeled_images(recipe)
        kept = [c for c in _kept_cases(state) if c in pseudo_labeled]
        dataset_json = student_dataset_json(recipe.dataset_json, len(recipe.labeled) + len(kept),
                                            recipe.ignore_label, kept)
        link_raw_dataset(state.folder, recipe.labeled, recipe.unlabeled,
                         {case: pseudo_labeled[case][0] for case in kept}, dataset_json)
        preprocessed = recipe.folders.preprocessed / state.folder.name
        transfer_plans(teacher.folder, state.folder, preprocessed, recipe.plans)
        splits = labeled_splits(recipe.folders.preprocessed / recipe.dataset, list(recipe.labeled))
        if splits is not None:
            # one labeling (one fold, fold all, or the ensemble): every fold trains on it, as the folds not
            # trained here would
            one = len(recipe.labelings) == 1
            by_fold = {fold: [c for c in kept if one or fold in pseudo_labeled[c][1].student_folds]
                       for fold in map(str, range(len(splits)))}
            write_json_atomic(preprocessed / "splits_final.json", student_splits(splits, by_fold))
        preprocess_student(dataset_id_of(state.folder.name), recipe.plans, teacher.configuration,
                           recipe.preprocessing_processes)

    _step(state, say, "dataset", f"the student's dataset ({len(recipe.labeled)} labeled + pseudo-labeled cases, "
                                 f"plans {recipe.plans} of the teacher, nnU-Net's preprocessing)", work)


def _fine_tune_step(recipe: Recipe, state: RoundState, say: _Progress, student: TrainedModel,
                    fine_tuned: TrainedModel) -> None:
    def work() -> None:
        plans = json.loads((student.folder / "plans.json").read_text())
        plans.update(dataset_name=recipe.dataset, plans_name=fine_tuned.plans)
        write_json_atomic(recipe.folders.preprocessed / recipe.dataset / f"{fine_tuned.plans}.json", plans)
        _train_folds(state, say, "fine_tune", recipe.dataset, fine_tuned, recipe.device, pretrained=student)

    _step(state, say, "fine_tune", f"fine-tuning of the student on the labeled scans ({fine_tuned.trainer}, "
                                   f"-pretrained_weights)", work)


def _run_round(recipe: Recipe, state: RoundState, teacher: TrainedModel) -> TrainedModel:
    say = _Progress(recipe, state)
    name = state.folder.name
    student, fine_tuned = _student(recipe, name), _fine_tuned(recipe, name)
    state.details.update(teacher=teacher.describe(), student=student.describe(),
                         fine_tuned=fine_tuned.describe() if fine_tuned else None)
    state.save()
    _teacher_step(recipe, state, say, teacher)
    _pseudo_labels_step(recipe, state, say, teacher)
    _dataset_step(recipe, state, say, teacher)
    _step(state, say, "student", f"student {student.trainer} on {name}, fold(s) {' '.join(student.folds)}",
          lambda: _train_folds(state, say, "student", name, student, recipe.device))
    if fine_tuned is not None:
        _fine_tune_step(recipe, state, say, student, fine_tuned)
    return fine_tuned or student


def run_recipe(recipe: Recipe) -> TrainedModel:
    """Every round in order (each continued where a run of it stopped); returns the last round's model."""
    teacher = recipe.teacher
    for number in range(1, recipe.rounds + 1):
        state = _open_round(recipe, number, teacher)
        teacher = _run_round(recipe, state, teacher)
    folds = " ".join(teacher.folds)
    print(f"Self-training done: the model of round {recipe.rounds} is {teacher.folder} (folds {folds}); predict "
          f"with nnUNetv2_predict -d {teacher.folder.parent.name} -c {teacher.configuration} -tr {teacher.trainer} -p {teacher.plans} "
          f"-f {folds} -i INPUT -o OUTPUT. Each round's record: {STATE_FILE} in its student's dataset folder",
          flush=True)
    return teacher
