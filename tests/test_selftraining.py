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
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["dataset_name"] == DATASET and plans["plans_name"] == f"{SMALL_PLANS}_finetuned962"
    original = json.loads((labeled_dataset["preprocessed"] / DATASET / f"{SMALL_PLANS}.json").read_text())
    assert plans["configurations"] == original["configurations"]  # the labeled dataset's preprocessed data
    assert f"the model of round 1 is {folder}" in confident_round["output"]


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


def test_sigkill_in_each_step_then_the_same_command_continues_through_two_rounds(labeled_dataset):
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
    # 2: pseudo-labelling, while the predictor predicts the second case
    killed = _selftrain(labeled_dataset, *args, check=False, SELFTRAIN_TEST_KILL=f"predict:{raw / 'pseudo_labels'}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
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
