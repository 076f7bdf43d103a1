"""A SASSNet model through nnU-Net's other tools (--val, find_best_configuration, ensemble) and exported for
plain nnU-Net: the same segmentation, voxel for voxel, where this package cannot be imported."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SMALL_PLANS, run, training_environment
from nnunet_sassnet import export

pytestmark = pytest.mark.slow

TRAINER = "nnUNetTrainerSASSNet_smoke"

# nnUNetv2_predict's entry function in an interpreter where nnunet_sassnet cannot be imported and
# nnUNet_extTrainer is unset: what a machine with only nnU-Net does. -npp 0 -nps 0: no worker interpreters.
PLAIN_PREDICT = """
import os, sys
class HidePackage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "nnunet_sassnet":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, HidePackage())
os.environ.pop("nnUNet_extTrainer", None)
from nnunetv2.inference.predict_from_raw_data import predict_entry_point
sys.argv = ["nnUNetv2_predict", *sys.argv[1:]]
predict_entry_point()
assert not [m for m in sys.modules if m.startswith("nnunet_sassnet")]
"""


def predict_args(images: Path, output: Path, trainer: str, folds: str) -> list[str]:
    return ["-i", str(images), "-o", str(output), "-d", "990", "-c", "3d_fullres", "-tr", trainer, "-p", SMALL_PLANS,
            "-f", *folds.split(), "-device", "cpu", "--disable_progress_bar", "--save_probabilities",
            "-npp", "0", "-nps", "0"]


def run_entry(entry: str, argv: list[str], env: dict) -> None:
    """A stock command's entry function (what its console script calls) in this process, with ``env``'s nnU-Net
    variables: the same code as the command without starting an interpreter and importing torch again."""
    import importlib

    module, function = entry.split(":")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            if key.startswith("nnUNet"):
                patch.setenv(key, value)
        patch.setattr(sys, "argv", [function, *argv])
        getattr(importlib.import_module(module), function)()


PREDICT = "nnunetv2.inference.predict_from_raw_data:predict_entry_point"


def read_segmentations(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


@pytest.fixture(scope="module")
def sassnet_model(tiny_dataset, sassnet_fold0, tmp_path_factory) -> dict:
    """Two folds of a tiny SASSNet model in their own nnUNet_results, and each fold's test predictions.

    Fold 0 is the session's shared training (conftest.sassnet_fold0), copied; fold 1 is trained here with --npz.
    """
    root = tmp_path_factory.mktemp("export")
    env = {**training_environment(tiny_dataset["env"]), "nnUNet_results": str(root / "results")}
    name = tiny_dataset["dataset_name"]
    assert sassnet_fold0["trainer"] == TRAINER
    # fold 0 and the model's files only: in-process tests write folds of their own into the shared folder
    shutil.copytree(sassnet_fold0["model"], root / "results" / name / sassnet_fold0["model"].name,
                    ignore=lambda folder, names: [n for n in names if Path(folder) == sassnet_fold0["model"]
                                                  and n.startswith("fold_") and n != "fold_0"])
    run(["nnUNetv2_train", "990", "3d_fullres", "1", "-tr", TRAINER, "-p", SMALL_PLANS, "-device", "cpu", "--npz"],
        env)
    images = tiny_dataset["root"] / "raw" / name / "imagesTs"
    predictions = {}
    for fold in ("0", "1"):
        predictions[fold] = root / f"pred_fold{fold}"
        run_entry(PREDICT, predict_args(images, predictions[fold], TRAINER, fold), env)
    return {"env": env, "root": root, "name": name, "images": images, "predictions": predictions,
            "model": root / "results" / name / f"{TRAINER}__{SMALL_PLANS}__3d_fullres"}


def test_val_npz_find_best_configuration_and_ensemble(sassnet_model, tmp_path):
    env, model = sassnet_model["env"], sassnet_model["model"]
    assert not list((model / "fold_0" / "validation").glob("*.npz"))
    run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", TRAINER, "-p", SMALL_PLANS, "-device", "cpu",
         "--val", "--npz"], env)
    assert list((model / "fold_0" / "validation").glob("*.npz"))

    run_entry("nnunetv2.evaluation.find_best_configuration:find_best_configuration_entry_point",
              ["990", "-c", "3d_fullres", "-tr", TRAINER, "-p", SMALL_PLANS, "-f", "0", "1", "-np", "1"], env)
    instructions = (model.parent / "inference_instructions.txt").read_text()
    assert f"-tr {TRAINER}" in instructions
    assert (model / "crossval_results_folds_0_1" / "summary.json").is_file()

    # the ensemble of the two folds' probabilities is their mean's argmax
    predictions, ensemble = sassnet_model["predictions"], tmp_path / "ensemble"
    run_entry("nnunetv2.ensembling.ensemble:entry_point_ensemble_folders",
              ["-i", str(predictions["0"]), str(predictions["1"]), "-o", str(ensemble), "-np", "1"], env)
    segmentations = read_segmentations(ensemble)
    assert sorted(segmentations) == ["ts000.nii.gz", "ts001.nii.gz"]
    for case, seg in segmentations.items():
        stem = case[:-len(".nii.gz")]
        mean = sum(np.load(predictions[f] / f"{stem}.npz")["probabilities"] for f in ("0", "1")) / 2
        np.testing.assert_array_equal(seg, mean.argmax(0))


def test_exported_model_predicts_the_same_with_plain_nnunet(sassnet_model, tmp_path, capsys):
    results = tmp_path / "results"
    plain_model = results / sassnet_model["name"] / f"nnUNetTrainer__{SMALL_PLANS}__3d_fullres"
    assert export.main(["-i", str(sassnet_model["model"]), "-o", str(plain_model)]) == 0
    assert "4 checkpoints (fold_0, fold_1)" in capsys.readouterr().out  # checkpoint_best and _final each
    for fold in ("0", "1"):
        # the exported file needs no code to load
        checkpoint = torch.load(plain_model / f"fold_{fold}" / "checkpoint_final.pth", weights_only=True)
        assert checkpoint["trainer_name"] == "nnUNetTrainer"
        assert not [k for k in checkpoint["network_weights"] if k.startswith("sdm_head.")]
        assert "sassnet" not in checkpoint and "optimizer_state" not in checkpoint

    plain = tmp_path / "plain"
    run([sys.executable, "-c", PLAIN_PREDICT,
         *predict_args(sassnet_model["images"], plain, "nnUNetTrainer", "0")],
        {**sassnet_model["env"], "nnUNet_results": str(results)})
    ours, theirs = read_segmentations(sassnet_model["predictions"]["0"]), read_segmentations(plain)
    assert sorted(ours) == sorted(theirs) == ["ts000.nii.gz", "ts001.nii.gz"]
    for case in ours:
        np.testing.assert_array_equal(theirs[case], ours[case])
        stem = case[:-len(".nii.gz")]
        np.testing.assert_array_equal(np.load(plain / f"{stem}.npz")["probabilities"],
                                      np.load(sassnet_model["predictions"]["0"] / f"{stem}.npz")["probabilities"])


def test_export_refuses_bad_input_and_writes_nothing(sassnet_model, tmp_path, capsys):
    model = sassnet_model["model"]

    def refused(args: list[str]) -> str:
        assert export.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ")
        return err

    assert "is not an nnU-Net model folder (no dataset.json or plans.json)" in \
        refused(["-i", str(model / "fold_0"), "-o", str(tmp_path / "out")])
    assert "no such folder" in refused(["-i", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    (tmp_path / "exists").mkdir()
    assert "already exists" in refused(["-i", str(model), "-o", str(tmp_path / "exists")])
    other = tmp_path / "other_model"
    (other / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        (other / name).write_bytes((model / name).read_bytes())
    assert "is not an nnU-Net model folder (no fold_*/checkpoint_*.pth)" in \
        refused(["-i", str(other), "-o", str(tmp_path / "out")])

    # a network that is not nnU-Net's U-Net plus the SDM head: refused, and no folder is left behind
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["network_weights"]["extra_head.weight"] = torch.zeros(1)
    torch.save(checkpoint, other / "fold_0" / "checkpoint_final.pth")
    out = tmp_path / "new" / "deeper" / "out"
    assert "unexpected extra_head.weight" in refused(["-i", str(other), "-o", str(out)])
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "other_model"]
