"""nnU-Net's cascade with this package's trainers: 3d_lowres, then 3d_cascade_fullres, then prediction with
-prev_stage_predictions, all through nnU-Net's commands, on a copy of the tiny dataset whose plans get a cascade."""
from __future__ import annotations

import json
import os
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SMALL_PLANS, EarlyStart, early_start, run, training_environment
from planned_copies import copy_planned_dataset
from nnunet_sassnet.discovery import trainer_dir
from nnunet_sassnet.unlabeled.previous_stage import PREDICTIONS_FOLDER, predict_previous_stage, previous_stage_key

TRAINER_DIR = Path(__file__).parent / "cascade_trainers"
LOWRES_TRAINER = "nnUNetTrainer_lowres_smoke"
CASCADE_TRAINER = "nnUNetTrainerSASSNet_cascade_smoke"


def add_cascade(preprocessed: Path) -> None:
    """The small plans get 3d_lowres (1.5 mm instead of 1 mm, the same small U-Net) and 3d_cascade_fullres, linked
    both ways as nnU-Net's planner links them."""
    plans_file = preprocessed / f"{SMALL_PLANS}.json"
    plans = json.loads(plans_file.read_text())
    fullres = plans["configurations"]["3d_fullres"]
    lowres = {**json.loads(json.dumps(fullres)), "data_identifier": f"{SMALL_PLANS}_3d_lowres",
              "spacing": [1.5, 1.5, 1.5], "median_image_size_in_voxels": [16, 16, 16], "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_lowres"] = lowres
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans_file.write_text(json.dumps(plans, indent=2))


@early_start("cascade_trainings", needs=("tiny_dataset",))
def start_cascade_trainings(context: dict, early: EarlyStart) -> dict:
    """A copy of the tiny dataset planned with a cascade, its first stage (nnU-Net's own trainer on fold "all",
    whose validation predicts every labeled case for the next stage) and the cascade's training with a package
    trainer, in the background lane (see ``started_early``)."""
    ds = copy_planned_dataset(context["tiny_dataset"], context["tmp_path_factory"].mktemp("cascade"),
                              edit_preprocessed=add_cascade, configurations=("3d_fullres", "3d_lowres"))
    dataset = str(ds["dataset_id"])
    env = {**training_environment(ds["env"]), "nnUNet_extTrainer": f"{TRAINER_DIR}{os.pathsep}{trainer_dir()}"}
    lowres = run(["nnUNetv2_train", dataset, "3d_lowres", "all", "-tr", LOWRES_TRAINER, "-p", SMALL_PLANS,
                  "-device", "cpu"], env)
    cascade = run(["nnUNetv2_train", dataset, "3d_cascade_fullres", "all", "-tr", CASCADE_TRAINER, "-p", SMALL_PLANS,
                   "-device", "cpu"], env)
    return {"dataset": ds, "env": env, "lowres": lowres, "cascade": cascade}


@pytest.fixture(scope="module")
def cascade_trainings(started_early) -> dict:
    return started_early["cascade_trainings"].result()


@pytest.mark.slow
def test_lowres_then_cascade_with_a_package_trainer_then_prediction(cascade_trainings, tmp_path, monkeypatch):
    ds, env, train = cascade_trainings["dataset"], cascade_trainings["env"], cascade_trainings["cascade"]
    dataset = str(ds["dataset_id"])
    results = ds["root"] / "results" / ds["dataset_name"]
    lowres_model = results / f"{LOWRES_TRAINER}__{SMALL_PLANS}__3d_lowres"
    assert len(list((lowres_model / "predicted_next_stage" / "3d_cascade_fullres").glob("*.b2nd"))) == 5
    # the unlabeled scans got the lowres model's segmentations on their fullres grid, in a folder keyed on the model
    made = list((lowres_model / PREDICTIONS_FOLDER / "3d_cascade_fullres" / "fold_all").iterdir())
    assert len(made) == 1 and f"predicts 4 cases into {made[0]}" in train.stdout
    unlabeled = Path(os.path.realpath(ds["root"] / "preprocessed" / ds["dataset_name"] /
                                      f"{SMALL_PLANS}_3d_fullres_unlabeled"))
    lowres_unlabeled = Path(os.path.realpath(ds["root"] / "preprocessed" / ds["dataset_name"] /
                                             f"{SMALL_PLANS}_3d_lowres_unlabeled"))
    assert made[0].name == previous_stage_key(str(lowres_model / "fold_all" / "checkpoint_final.pth"),
                                              str(lowres_unlabeled), str(unlabeled))
    for case in ("un000", "un001", "un002", "un003"):
        segmentation = blosc2.open(str(made[0] / f"{case}.b2nd"), mode="r")[:]
        assert segmentation.shape == blosc2.open(str(unlabeled / f"{case}.b2nd"), mode="r").shape[1:]
        assert set(np.unique(segmentation)) <= {0, 1}
    # the same model and data: the folder is reused; another lowres checkpoint: made again, the old one deleted
    monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])  # the predictor finds the lowres trainer
    args = (str(lowres_model), "all", str(lowres_unlabeled), str(unlabeled), "3d_cascade_fullres",
            torch.device("cpu"), "nnUNetv2_train ...")
    messages = []
    assert predict_previous_stage(*args, log=messages.append) == str(made[0]) and "made from" in messages[-1]
    checkpoint_file = lowres_model / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    next(iter(checkpoint["network_weights"].values())).add_(0.5)  # as if the lowres model were trained again
    torch.save(checkpoint, checkpoint_file)
    remade = Path(predict_previous_stage(*args, log=messages.append))
    assert remade != made[0] and not made[0].exists() and "predicts 4 cases" in messages[-1]
    assert sorted(p.name for p in remade.iterdir()) == [f"{case}.b2nd" for case in ("un000", "un001", "un002", "un003")]

    cascade_fold = results / f"{CASCADE_TRAINER}__{SMALL_PLANS}__3d_cascade_fullres" / "fold_all"
    assert (cascade_fold / "checkpoint_final.pth").is_file()
    logged = torch.load(cascade_fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    assert len(logged["train_losses"]) == 1 and np.isfinite(logged["train_losses"]).all()
    assert np.isfinite(logged["gen_losses"]).all()  # the unlabeled term ran, on inputs with their lowres channels

    # prediction as nnU-Net does it: the lowres stage, then the cascade with -prev_stage_predictions
    images = ds["root"] / "raw" / ds["dataset_name"] / "imagesTs"
    common = ["-d", dataset, "-p", SMALL_PLANS, "-f", "all", "-device", "cpu", "-npp", "1", "-nps", "1",
              "--disable_tta"]
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "lowres"), "-c", "3d_lowres",
         "-tr", LOWRES_TRAINER, *common], env)
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "cascade"), "-c", "3d_cascade_fullres",
         "-tr", CASCADE_TRAINER, "-prev_stage_predictions", str(tmp_path / "lowres"), *common], env)
    for case in ("ts000", "ts001"):
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cascade" / f"{case}.nii.gz")))
        assert prediction.shape == (24, 24, 24) and set(np.unique(prediction)) <= {0, 1}


def test_a_cascade_without_its_lowres_model_is_refused_with_the_command(tmp_path):
    from nnunet_sassnet.errors import UserInputError
    from nnunet_sassnet.unlabeled.previous_stage import previous_stage_model_fold

    model = tmp_path / f"nnUNetTrainerSASSNet__{SMALL_PLANS}__3d_lowres"
    (model / "fold_0").mkdir(parents=True)  # a training that never finished
    command = f"nnUNetv2_train 990 3d_lowres 0 -tr nnUNetTrainerSASSNet -p {SMALL_PLANS}"
    with pytest.raises(UserInputError, match=f"no fold_0/checkpoint_final.pth .*train it first: {command}"):
        previous_stage_model_fold(str(model), 0, command)
    (model / "fold_all").mkdir()
    (model / "fold_all" / "checkpoint_final.pth").write_bytes(b"")
    assert previous_stage_model_fold(str(model), 0, command) == "fold_all"
