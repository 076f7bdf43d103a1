"""``nnunet_sassnet_selftrain`` end to end on a tiny synthetic dataset, on the CPU.

Real nnU-Net throughout: nnU-Net's planning of the labeled dataset, its training (a trainer of one epoch of two
steps, tests/selftraining_trainers), its predictor, its preprocessing; the command as a console script (from the
warm fork server, see conftest.py). The kill test stops the command with SIGKILL inside each step, in one chain of
runs, and checks that the same command continues at the step that was running.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SMALL_PLANS, run, training_environment

from nnunet_sassnet import nnunet_tools as tools
from nnunet_sassnet.selftraining import main
from nnunet_sassnet.selftraining.state import STATE_FILE
from nnunet_sassnet.unlabeled.labeled_copies import find_labeled_copies

TRAINERS = Path(__file__).resolve().parent / "selftraining_trainers"
TRAINER = "nnUNetTrainer_selftrain_test"
LABELED, UNLABELED = [f"tr{i:03d}" for i in range(5)], [f"un{i:03d}" for i in range(4)]
DATASET = "Dataset990_Tiny"
FIRST_STUDENT = "Dataset961_Tiny_selftrain"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labeled_dataset(tiny_dataset) -> dict:
    """The session's tiny dataset (Dataset990_Tiny: 5 labeled, 4 unlabeled 24^3 scans, small plans), with the
    test trainer's folder for nnU-Net."""
    env = training_environment(tiny_dataset["env"])
    env["nnUNet_extTrainer"] = os.pathsep.join([str(TRAINERS), env["nnUNet_extTrainer"]])
    root = tiny_dataset["root"]
    return {**tiny_dataset, "env": env, "raw": root / "raw", "preprocessed": root / "preprocessed",
            "results": root / "results"}


def _argv(*args: str) -> list[str]:
    return ["-d", "990", "-c", "3d_fullres", "-tr", TRAINER, "-p", SMALL_PLANS, "-device", "cpu", "-npp", "0", "-nps",
            "0", "--disable_tta", "-np", "1", *args]


def _selftrain(dataset: dict, *args: str, check: bool = True, **variables: str):
    return run(["nnunet_sassnet_selftrain", *_argv(*args)], {**dataset["env"], **variables}, check=check)


def _state(dataset: dict, name: str) -> dict:
    return json.loads((dataset["raw"] / name / STATE_FILE).read_text())


def _model(dataset: dict, name: str, fold: str) -> Path:
    return dataset["results"] / name / f"{TRAINER}__{SMALL_PLANS}__3d_fullres" / f"fold_{fold}"


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def one_round(labeled_dataset) -> dict:
    """One round, fold 0: the teacher trained here, the student with nnU-Net's final validation."""
    start = time.monotonic()
    result = _selftrain(labeled_dataset, "-f", "0", "--student-dataset", "961", SELFTRAIN_TEST_VALIDATE=FIRST_STUDENT)
    return {"output": result.stdout, "seconds": time.monotonic() - start,
            "teacher": _model(labeled_dataset, DATASET, "0").parent}


def test_one_round_trains_a_teacher_and_a_student_on_labeled_and_pseudo_labeled_cases(labeled_dataset, one_round):
    raw, preprocessed = labeled_dataset["raw"] / FIRST_STUDENT, labeled_dataset["preprocessed"] / FIRST_STUDENT
    state = _state(labeled_dataset, FIRST_STUDENT)
    assert [s for s in state["steps"] if state["steps"][s]["status"] == "done"] == \
        ["teacher", "pseudo_labels", "dataset", "student"]
    assert (one_round["teacher"] / "fold_0" / "checkpoint_final.pth").is_file()
    assert (_model(labeled_dataset, FIRST_STUDENT, "0") / "checkpoint_final.pth").is_file()
    # one line per step, nnU-Net's own output in between
    lines = [line for line in one_round["output"].splitlines() if line.startswith("Self-training round 1/1")]
    assert sum(line.endswith("...") for line in lines) == 4
    assert "Self-training done" in one_round["output"]
    cases = sorted(LABELED + UNLABELED)
    assert sorted(p.name for p in (raw / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(p.name for p in (raw / "imagesUnlabeled").iterdir()) == [f"{c}_0000.nii.gz" for c in UNLABELED]
    for case in UNLABELED:  # the pseudo-labels are nnU-Net's predictions, and the images the unlabeled scans
        assert os.path.samefile(raw / "labelsTr" / f"{case}.nii.gz", raw / "pseudo_labels" / f"{case}.nii.gz")
        assert os.path.samefile(raw / "imagesTr" / f"{case}_0000.nii.gz",
                                labeled_dataset["raw"] / DATASET / "imagesUnlabeled" / f"{case}_0000.nii.gz")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["numTraining"] == 9 and "ignore" not in dataset_json["labels"]
    # the pseudo-labeled cases are named as such, so a semi-supervised student still reads their scans as unlabeled
    # data: by the rule for labeled cases in imagesUnlabeled, each would otherwise be left out (same name)
    assert dataset_json["pseudo_labeled_cases"] == UNLABELED and find_labeled_copies(str(raw)) == {}
    # the teacher's plans, not a new planning: only the dataset's name differs
    teacher_plans = json.loads((one_round["teacher"] / "plans.json").read_text())
    student_plans = json.loads((preprocessed / f"{SMALL_PLANS}.json").read_text())
    assert student_plans.pop("dataset_name") == FIRST_STUDENT
    assert {k: v for k, v in teacher_plans.items() if k != "dataset_name"} == student_plans
    assert sorted(p.name[:-5] for p in (preprocessed / f"{SMALL_PLANS}_3d_fullres").glob("*.b2nd")
                  if not p.name.endswith("_seg.b2nd")) == cases


def test_pseudo_labeled_cases_are_never_validation_cases_and_labeled_folds_are_kept(labeled_dataset, one_round):
    teacher_splits = json.loads((labeled_dataset["preprocessed"] / DATASET / "splits_final.json").read_text())
    splits = json.loads((labeled_dataset["preprocessed"] / FIRST_STUDENT / "splits_final.json").read_text())
    assert len(splits) == len(teacher_splits) == 5
    for fold, teacher_fold in zip(splits, teacher_splits):
        assert fold["val"] == teacher_fold["val"]
        assert sorted(fold["train"]) == sorted(teacher_fold["train"] + UNLABELED)
    # nnU-Net's cross-validation of the student scores fold 0's labeled validation case only
    summary = json.loads((_model(labeled_dataset, FIRST_STUDENT, "0") / "validation" / "summary.json").read_text())
    scored = sorted(Path(c["reference_file"]).name for c in summary["metric_per_case"])
    assert scored == [f"{c}.nii.gz" for c in teacher_splits[0]["val"]]


def test_the_same_command_again_keeps_every_finished_step(labeled_dataset, one_round):
    checkpoint = _model(labeled_dataset, FIRST_STUDENT, "0") / "checkpoint_final.pth"
    before, steps = checkpoint.stat().st_mtime_ns, _state(labeled_dataset, FIRST_STUDENT)["steps"]
    start = time.monotonic()
    again = _selftrain(labeled_dataset, "-f", "0", "--student-dataset", "961")
    assert again.stdout.count("done earlier, kept") == 4
    assert checkpoint.stat().st_mtime_ns == before and _state(labeled_dataset, FIRST_STUDENT)["steps"] == steps
    assert time.monotonic() - start < one_round["seconds"] / 2


def _teacher_probabilities(teacher: Path, images: Path, env: dict) -> dict[str, tuple]:
    """(segmentation, probabilities) of each unlabeled case by the teacher, from nnU-Net's predictor here."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(teacher), ["0"], "checkpoint_final.pth")
    files = [[str(images / f"{case}_0000.nii.gz")] for case in UNLABELED]
    return dict(zip(UNLABELED, predictor.predict_from_files_sequential(files, None, save_probabilities=True)))


def _between(values: np.ndarray, target: float) -> float:
    """A threshold between two neighbouring distinct values around ``target`` (no voxel sits on it)."""
    distinct = np.unique(values)
    i = int(np.clip(np.searchsorted(distinct, target), 1, len(distinct) - 1))
    return float((distinct[i - 1] + distinct[i]) / 2)


CONFIDENT_STUDENT = "Dataset962_Tiny_selftrain"


@pytest.fixture(scope="module")
def confident_round(labeled_dataset, one_round) -> dict:
    """A round from the first round's teacher (--teacher-model) with both confidence options, the thresholds
    chosen from the teacher's own probabilities; its student fine-tuned on the labeled cases."""
    teacher = one_round["teacher"]
    predicted = _teacher_probabilities(teacher, labeled_dataset["raw"] / DATASET / "imagesUnlabeled",
                                       labeled_dataset["env"])
    confidence = {c: probabilities.max(axis=0) for c, (_, probabilities) in predicted.items()}
    case_confidence = {c: float(confidence[c][predicted[c][0] > 0].mean()) for c in UNLABELED}
    ranked = sorted(UNLABELED, key=case_confidence.get)
    min_case = (case_confidence[ranked[0]] + case_confidence[ranked[1]]) / 2  # the least confident case is left out
    kept = sorted(ranked[1:])
    kept_voxels = np.concatenate([confidence[c].ravel() for c in kept])
    ignore_below = _between(kept_voxels, float(np.median(kept_voxels)))
    args = ("-f", "0", "--teacher-model", str(teacher), "--student-dataset", "962", "--ignore-below",
            str(ignore_below), "--min-case-confidence", str(min_case), "--fine-tune-trainer", TRAINER)
    result = _selftrain(labeled_dataset, *args)
    return {"args": args, "output": result.stdout, "predicted": predicted, "confidence": confidence, "kept": kept,
            "left_out": ranked[0], "case_confidence": case_confidence, "ignore_below": ignore_below}


def test_ignore_below_makes_uncertain_voxels_the_ignore_label_and_nnunet_trains_on_them(labeled_dataset,
                                                                                         confident_round):
    raw, kept = labeled_dataset["raw"] / CONFIDENT_STUDENT, confident_round["kept"]
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json["labels"]["ignore"] == 2
    state = _state(labeled_dataset, CONFIDENT_STUDENT)
    for case in kept:
        expected = np.where(confident_round["confidence"][case] < confident_round["ignore_below"], 2,
                            confident_round["predicted"][case][0])
        written = _read(raw / "labelsTr" / f"{case}.nii.gz")
        assert np.array_equal(written, expected), case
        assert 0 < (written == 2).sum() < written.size and state["cases"][case]["ignored_voxels"] == (written == 2).sum()
    # nnU-Net trained on them: its preprocessed labels hold the ignore label, and the student's training ended
    import blosc2

    data = labeled_dataset["preprocessed"] / CONFIDENT_STUDENT / f"{SMALL_PLANS}_3d_fullres"
    assert (np.asarray(blosc2.open(str(data / f"{kept[0]}_seg.b2nd"))[:]) == 2).any()
    model = _model(labeled_dataset, CONFIDENT_STUDENT, "0")
    assert (model / "checkpoint_final.pth").is_file()
    assert json.loads((model.parent / "dataset.json").read_text())["labels"]["ignore"] == 2


def test_min_case_confidence_leaves_the_least_confident_case_out(labeled_dataset, confident_round):
    raw, kept, left_out = labeled_dataset["raw"] / CONFIDENT_STUDENT, confident_round["kept"], confident_round["left_out"]
    state = _state(labeled_dataset, CONFIDENT_STUDENT)
    for case in UNLABELED:
        assert state["cases"][case]["confidence"] == pytest.approx(confident_round["case_confidence"][case], abs=1e-4)
        assert state["cases"][case]["kept"] == (case in kept)
    assert json.loads((raw / "dataset.json").read_text())["numTraining"] == len(LABELED) + len(kept)
    assert sorted(p.name for p in (raw / "labelsTr").glob("un*")) == [f"{c}.nii.gz" for c in kept]
    assert not (raw / "imagesTr" / f"{left_out}_0000.nii.gz").exists()
    assert (raw / "imagesUnlabeled" / f"{left_out}_0000.nii.gz").is_file()  # a semi-supervised student's scan
    splits = json.loads((labeled_dataset["preprocessed"] / CONFIDENT_STUDENT / "splits_final.json").read_text())
    assert all(left_out not in fold["train"] + fold["val"] for fold in splits)


def test_fine_tuning_starts_from_the_student_and_trains_on_the_labeled_dataset(labeled_dataset, confident_round):
    student = _model(labeled_dataset, CONFIDENT_STUDENT, "0") / "checkpoint_final.pth"
    folder = labeled_dataset["results"] / DATASET / f"{TRAINER}__{SMALL_PLANS}_finetuned962__3d_fullres"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    assert f"Loading pretrained weights from file  {student}" in confident_round["output"]
    # and the output layers, which nnU-Net's loader leaves out: the student has the same labels (and the ignore
    # label, no output channel)
    loaded = [line for line in confident_round["output"].splitlines()
              if line.startswith(f"Fine-tuning: output layers from {student}: loaded ")]
    assert len(loaded) == 1 and "decoder.seg_layers.0" in loaded[0] and "starts fresh" not in confident_round["output"]
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["dataset_name"] == DATASET and plans["plans_name"] == f"{SMALL_PLANS}_finetuned962"
    original = json.loads((labeled_dataset["preprocessed"] / DATASET / f"{SMALL_PLANS}.json").read_text())
    assert plans["configurations"] == original["configurations"]  # the labeled dataset's preprocessed data
    assert f"the model of round 1 is {folder}" in confident_round["output"]


def _two_fold_teacher(one_round: dict, folder: Path) -> Path:
    """A teacher model folder of two folds: fold 0 is the first round's teacher, fold 1 the same network with
    output biases that make it predict background everywhere (so each fold's pseudo-labels are recognisable)."""
    import shutil

    import torch

    model = folder / one_round["teacher"].name
    for fold in ("fold_0", "fold_1"):
        (model / fold).mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(one_round["teacher"] / name, model / name)
    shutil.copy(one_round["teacher"] / "fold_0" / "checkpoint_final.pth", model / "fold_0" / "checkpoint_final.pth")
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for key, value in checkpoint["network_weights"].items():
        if "seg_layers" in key and key.endswith("bias"):
            value[0], value[1:] = 100.0, -100.0
    torch.save(checkpoint, model / "fold_1" / "checkpoint_final.pth")
    return model


PER_FOLD_STUDENT = "Dataset963_Tiny_selftrain"


def test_student_fold_k_learns_from_teacher_fold_k_alone(labeled_dataset, one_round, tmp_path):
    teacher = _two_fold_teacher(one_round, tmp_path)
    killed = _selftrain(labeled_dataset, "-f", "0", "1", "--teacher-model", str(teacher), "--student-dataset", "963",
                        check=False, SELFTRAIN_TEST_KILL=f"train:{PER_FOLD_STUDENT}")  # stopped at the student
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert "student fold k learns from teacher fold k alone" in killed.stdout
    state = _state(labeled_dataset, PER_FOLD_STUDENT)
    assert state["details"]["pseudo_label_folds"] == {"0": ["0"], "1": ["1"]}
    assert state["steps"]["dataset"]["status"] == "done"
    raw = labeled_dataset["raw"] / PER_FOLD_STUDENT
    for case in UNLABELED:  # fold 1 predicts background everywhere, fold 0 does not: no ensemble of the two
        assert (_read(raw / "labelsTr" / f"{case}_fold1.nii.gz") == 0).all()
        assert os.path.samefile(raw / "imagesTr" / f"{case}_fold0_0000.nii.gz",
                                labeled_dataset["raw"] / DATASET / "imagesUnlabeled" / f"{case}_0000.nii.gz")
    assert any((_read(raw / "labelsTr" / f"{case}_fold0.nii.gz") > 0).any() for case in UNLABELED)
    teacher_splits = json.loads((labeled_dataset["preprocessed"] / DATASET / "splits_final.json").read_text())
    splits = json.loads((labeled_dataset["preprocessed"] / PER_FOLD_STUDENT / "splits_final.json").read_text())
    for k, (fold, teacher_fold) in enumerate(zip(splits, teacher_splits)):
        own = [f"{case}_fold{k}" for case in UNLABELED] if k < 2 else []
        assert fold["val"] == teacher_fold["val"] and sorted(fold["train"]) == sorted(teacher_fold["train"] + own)


def _kill_when(path: Path, dataset: dict, *args: str) -> int:
    """Run the command and SIGKILL it (its process group: the command and its workers) once ``path`` exists."""
    started: list = []
    outcome: dict = {}

    def command() -> None:
        outcome["run"] = tools.run_tool(["nnunet_sassnet_selftrain", *_argv(*args)], dataset["env"],
                                        timeout=600, on_start=started.append)

    thread = threading.Thread(target=command)
    thread.start()
    deadline = time.monotonic() + 300
    while not path.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if started and thread.is_alive():
        os.killpg(started[0].pid, signal.SIGKILL)
    thread.join()
    return outcome["run"].returncode


def _truncated_copy(checkpoint: Path, target: Path) -> None:
    """``target``: the first half of a real checkpoint, as a kill while nnU-Net writes it leaves it."""
    data = checkpoint.read_bytes()
    target.write_bytes(data[:len(data) // 2])


def test_unreadable_checkpoints_are_set_aside_and_training_goes_on_from_the_next(one_round, tmp_path, capsys):
    from nnunet_sassnet.selftraining.training import set_aside_unreadable_checkpoints

    whole = one_round["teacher"] / "fold_0" / "checkpoint_final.pth"
    (tmp_path / "checkpoint_best.pth").write_bytes(whole.read_bytes())
    _truncated_copy(whole, tmp_path / "checkpoint_latest.pth")
    assert set_aside_unreadable_checkpoints(tmp_path) == [tmp_path / "checkpoint_latest.pth"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'checkpoint_latest.pth'}: unreadable (")
    assert lines[0].endswith("continuing from checkpoint_best.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pth", "checkpoint_latest.pth.unreadable"]
    assert set_aside_unreadable_checkpoints(tmp_path) == []  # a readable one stays
    _truncated_copy(whole, tmp_path / "checkpoint_best.pth")
    assert set_aside_unreadable_checkpoints(tmp_path) == [tmp_path / "checkpoint_best.pth"]
    assert capsys.readouterr().out.strip().endswith("training from the start")


def test_sigkill_in_each_step_then_the_same_command_continues_through_two_rounds(labeled_dataset, one_round):
    args = ("-f", "all", "--rounds", "2", "--student-dataset", "970")
    first, second = "Dataset970_Tiny_selftrain", "Dataset971_Tiny_selftrain_round2"
    raw = labeled_dataset["raw"] / first

    def attempts() -> dict:
        steps = _state(labeled_dataset, first)["steps"]
        return {step: (record["status"], record["attempts"]) for step, record in steps.items()}

    # 1: the teacher's training
    killed = _selftrain(labeled_dataset, *args, check=False, SELFTRAIN_TEST_KILL=f"train:{DATASET}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert attempts() == {"teacher": ("running", 1)}
    # a kill while nnU-Net wrote the teacher's checkpoint_latest.pth had left it truncated: set aside, trained again
    teacher_fold = _model(labeled_dataset, DATASET, "all")
    _truncated_copy(one_round["teacher"] / "fold_0" / "checkpoint_final.pth", teacher_fold / "checkpoint_latest.pth")
    # 2: pseudo-labelling, while the predictor predicts the second case
    killed = _selftrain(labeled_dataset, *args, check=False, SELFTRAIN_TEST_KILL=f"predict:{raw / 'pseudo_labels'}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert f"{teacher_fold / 'checkpoint_latest.pth'}: unreadable (" in killed.stdout
    assert (teacher_fold / "checkpoint_final.pth").is_file()
    assert attempts() == {"teacher": ("done", 2), "pseudo_labels": ("running", 1)}
    predicted = sorted((raw / "pseudo_labels").glob("un*.nii.gz"))
    assert [p.name for p in predicted] == ["un000.nii.gz"]
    first_prediction = predicted[0].stat().st_mtime_ns
    # 3: the student's dataset, while nnU-Net's preprocessing starts its workers
    data = labeled_dataset["preprocessed"] / first / f"{SMALL_PLANS}_3d_fullres"
    assert _kill_when(data, labeled_dataset, *args) == -signal.SIGKILL
    assert attempts() == {"teacher": ("done", 2), "pseudo_labels": ("done", 2), "dataset": ("running", 1)}
    assert (raw / "pseudo_labels" / "un000.nii.gz").stat().st_mtime_ns == first_prediction  # not predicted again
    # 4: the student's training
    killed = _selftrain(labeled_dataset, *args, check=False, SELFTRAIN_TEST_KILL=f"train:{first}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert attempts() == {"teacher": ("done", 2), "pseudo_labels": ("done", 2), "dataset": ("done", 2),
                          "student": ("running", 1)}
    # then both rounds to the end; the finished steps are kept
    final = _selftrain(labeled_dataset, *args)
    assert final.stdout.count("done earlier, kept") == 3
    assert attempts() == {"teacher": ("done", 2), "pseudo_labels": ("done", 2), "dataset": ("done", 2),
                          "student": ("done", 2)}
    round2 = _state(labeled_dataset, second)
    assert round2["round"] == 2 and all(r["status"] == "done" for r in round2["steps"].values())
    # round 2's teacher is round 1's student: it predicted round 2's pseudo-labels
    assert round2["identity"]["teacher"] == str(_model(labeled_dataset, first, "all").parent)
    predictor_plans = json.loads((labeled_dataset["raw"] / second / "pseudo_labels" / "plans.json").read_text())
    assert predictor_plans["dataset_name"] == first
    assert (_model(labeled_dataset, second, "all") / "checkpoint_final.pth").is_file()
    splits = json.loads((labeled_dataset["preprocessed"] / second / "splits_final.json").read_text())
    assert all(not set(fold["val"]) & set(UNLABELED) for fold in splits)


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_bad_input_is_one_line_and_writes_nothing(labeled_dataset, one_round, tmp_path, monkeypatch, capsys):
    from synthetic import make_dataset

    env = labeled_dataset["env"]
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, env[key])
    folder = Path(make_dataset(env["nnUNet_raw"], 966, name="NoUnlabeled", n_labeled=2, n_unlabeled=0, n_test=0))
    (folder / "imagesUnlabeled").rmdir()
    other_labels = tmp_path / f"{TRAINER}__{SMALL_PLANS}__3d_fullres"
    (other_labels / "fold_0").mkdir(parents=True)
    (other_labels / "fold_0" / "checkpoint_final.pth").touch()
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        (other_labels / name).write_text((one_round["teacher"] / name).read_text())
    model_json = json.loads((other_labels / "dataset.json").read_text())
    model_json["labels"]["class2"] = 2
    (other_labels / "dataset.json").write_text(json.dumps(model_json))
    cases = {
        ("-d", "966", "-f", "0"): f"no unlabeled images: {folder / 'imagesUnlabeled'} does not exist; self-training ",
        ("-f", "0", "--teacher-model", str(tmp_path / "missing")): "folder not found",
        ("-f", "0", "--teacher-model", str(other_labels)): "its dataset.json has labels",
        ("-f", "0", "--student-dataset", "966"): "dataset ID 966 is taken",
        ("-f", "0", "--student-dataset", "961", "--ignore-below", "0.5"): "add --force to replace it",
        ("-f", "5",): f"-f 5: the split of {DATASET} has 5 folds",
        ("-f", "0", "--ignore-below", "1.5"): "--ignore-below 1.5: a probability",
        ("-f", "all", "0"): "-f all 0: fold all with numbered folds",
    }
    before = _snapshot(labeled_dataset["root"])
    for args, message in cases.items():
        argv = [*_argv(), *args]
        if args[0] == "-d":
            argv = [*argv[2:], *args]  # another dataset than the one _argv names
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, (args, err)
        assert _snapshot(labeled_dataset["root"]) == before, args


def test_a_copy_of_a_validation_case_in_imagesUnlabeled_is_not_pseudo_labeled(labeled_dataset, monkeypatch, capsys):
    """Fold 0's validation image under another name in imagesUnlabeled: left out by the unlabeled pipeline's rule
    (its pseudo-labeled copy would be a training case of fold 0), said once, before any work."""
    from nnunet_sassnet.selftraining.checks import build_recipe
    from nnunet_sassnet.selftraining.cli import build_parser

    env = labeled_dataset["env"]
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, env[key])
    source, name = labeled_dataset["raw"] / DATASET, "Dataset967_TinyWithCopy"
    raw, preprocessed = labeled_dataset["raw"] / name, labeled_dataset["preprocessed"] / name
    for sub in ("imagesTr", "labelsTr", "imagesUnlabeled"):
        (raw / sub).mkdir(parents=True)
        for f in (source / sub).iterdir():
            os.link(f, raw / sub / f.name)
    (raw / "dataset.json").write_text((source / "dataset.json").read_text())
    preprocessed.mkdir()
    for f in (f"{SMALL_PLANS}.json", "dataset.json", "splits_final.json"):
        (preprocessed / f).write_text((labeled_dataset["preprocessed"] / DATASET / f).read_text())
    validation = json.loads((preprocessed / "splits_final.json").read_text())[0]["val"][0]
    copy = raw / "imagesUnlabeled" / "scan_from_elsewhere_0000.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(raw / "imagesTr" / f"{validation}_0000.nii.gz")), str(copy))  # new bytes
    before = _snapshot(labeled_dataset["root"])
    recipe = build_recipe(build_parser().parse_args([*_argv()[2:], "-d", "967", "-f", "0"]))
    assert sorted(recipe.unlabeled) == UNLABELED
    said = capsys.readouterr().out
    assert f"scan_from_elsewhere (same voxels as imagesTr case {validation})" in said
    assert _snapshot(labeled_dataset["root"]) == before


def test_force_keeps_a_teacher_fold_that_other_rounds_use_and_marks_rounds_taught_by_its_student_to_redo(
        labeled_dataset, one_round, confident_round):
    """--force of the first round: its teacher fold 0 is the --teacher-model of the confident round (kept), and a
    round taught by its student (a record of a later round) may no longer say "done"."""
    from nnunet_sassnet.selftraining.state import RoundState

    teacher_checkpoint = one_round["teacher"] / "fold_0" / "checkpoint_final.pth"
    before = teacher_checkpoint.stat().st_mtime_ns
    student = _model(labeled_dataset, FIRST_STUDENT, "0").parent
    later = RoundState(folder=labeled_dataset["raw"] / "Dataset975_Tiny_selftrain_round2", round=2,
                       identity={**_state(labeled_dataset, FIRST_STUDENT)["identity"], "teacher": str(student)},
                       steps={"teacher": {"status": "done"}, "pseudo_labels": {"status": "done"}})
    later.folder.mkdir()
    later.save()
    killed = _selftrain(labeled_dataset, "-f", "0", "--student-dataset", "961", "--force", check=False,
                        SELFTRAIN_TEST_KILL=f"predict:{labeled_dataset['raw'] / FIRST_STUDENT / 'pseudo_labels'}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert f"teacher fold 0 ({one_round['teacher']}) kept: round(s) {CONFIDENT_STUDENT} use it" in killed.stdout
    assert teacher_checkpoint.stat().st_mtime_ns == before and not student.exists()
    redo = RoundState.load(later.folder)
    assert redo.redo.startswith(f"its teacher {student} was deleted") and not any(map(redo.done, redo.steps))


def test_force_deletes_the_round_and_what_it_made_and_starts_it_again(labeled_dataset, one_round, confident_round):
    """Defined last: it deletes the confident round that the tests above read."""
    raw = labeled_dataset["raw"] / CONFIDENT_STUDENT
    fine_tuned = labeled_dataset["results"] / DATASET / f"{TRAINER}__{SMALL_PLANS}_finetuned962__3d_fullres"
    alias_plans = labeled_dataset["preprocessed"] / DATASET / f"{SMALL_PLANS}_finetuned962.json"
    assert fine_tuned.is_dir() and alias_plans.is_file()
    # stopped once the new round has predicted its first case
    killed = _selftrain(labeled_dataset, *confident_round["args"], "--force", check=False,
                        SELFTRAIN_TEST_KILL=f"predict:{raw / 'pseudo_labels'}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert f"--force: deleting {CONFIDENT_STUDENT}" in killed.stdout
    for gone in (labeled_dataset["results"] / CONFIDENT_STUDENT, labeled_dataset["preprocessed"] / CONFIDENT_STUDENT,
                 fine_tuned, alias_plans):
        assert not gone.exists(), gone
    assert not list((raw / "labelsTr").iterdir()) and not (raw / "imagesTr").exists()
    steps = _state(labeled_dataset, CONFIDENT_STUDENT)["steps"]
    assert {k: (v["status"], v["attempts"]) for k, v in steps.items()} == {"teacher": ("done", 1),
                                                                           "pseudo_labels": ("running", 1)}
    assert [p.name for p in (raw / "pseudo_labels").glob("un*.nii.gz")] == ["un000.nii.gz"]
    # a given teacher is never deleted
    assert (one_round["teacher"] / "fold_0" / "checkpoint_final.pth").is_file()


#: nnU-Net's fork pool (create_lists_from_splitted_dataset_folder: the student dataset's preprocessing lists its
#: images with it) called again and again under the command's SIGTERM handler, while another thread writes a log
#: (as the command's threads do): a worker forked while that thread holds stderr's lock waits for it for ever, and
#: only SIGTERM's default action ends it when Pool.terminate() sends it. A call of more than 10 s has hung.
_POOL_LOOP = """
import os, sys, threading
from nnunet_sassnet.selftraining.cli import _stop_on_sigterm
from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder


def log():
    while True:
        print("log line " * 10, file=sys.stderr)


_stop_on_sigterm()
threading.Thread(target=log, daemon=True).start()
for call in range(int(sys.argv[2])):
    watchdog = threading.Timer(10, lambda: (print(f"call {call} hung", flush=True), os._exit(3)))
    watchdog.start()
    create_lists_from_splitted_dataset_folder(sys.argv[1], ".nii.gz", num_processes=4)
    watchdog.cancel()
print("calls done", flush=True)
"""


def test_nnunet_worker_pools_end_under_the_commands_sigterm_handler(tmp_path):
    import subprocess
    import sys

    for case in range(6):
        (tmp_path / f"case{case}_0000.nii.gz").touch()
    log = tmp_path / "loop.out"  # a file, not a pipe: a hung worker would hold a pipe open
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", _POOL_LOOP, str(tmp_path), "100"], stdout=out,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            process.wait(timeout=120)
        finally:
            try:  # a hung pool's workers outlive the loop's process
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log.read_text()
    assert process.returncode == 0 and "calls done" in output, output[-2000:]


def test_ensemble_pseudo_labels_give_every_student_fold_the_ensemble_of_all_teacher_folds():
    from nnunet_sassnet.selftraining.pseudo_labels import PseudoLabeling, pseudo_labelings

    assert pseudo_labelings(("0", "1", "2"), ensemble=True) == [PseudoLabeling(("0", "1", "2"), "", ("0", "1", "2"))]
    per_fold = pseudo_labelings(("0", "2"), ensemble=False)
    assert [(p.teacher_folds, p.case("un000"), p.student_folds) for p in per_fold] == \
        [(("0",), "un000_fold0", ("0",)), (("2",), "un000_fold2", ("2",))]
    assert pseudo_labelings(("all",), ensemble=False) == [PseudoLabeling(("all",), "", ("all",))]
