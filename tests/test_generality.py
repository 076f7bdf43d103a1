"""Beyond the paper: several classes, several input channels, the 2d configuration, the SDM-only trainer."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SMALL_PLANS, plan_tiny_dataset, run, training_environment


@pytest.fixture(scope="module")
def multi_dataset(tmp_path_factory):
    """2 foreground classes, 2 input channels; planned for 3d_fullres and 2d."""
    root = tmp_path_factory.mktemp("multi")
    info = plan_tiny_dataset(root, 991, configuration="3d_fullres", n_labeled=5, n_unlabeled=3, n_test=1,
                             num_classes=2, num_channels=2, seed=1)
    env = info["env"]
    run(["nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "2d", "-np", "1", "--no_pp"], env)
    from nnunet_sassnet.plans import derive_small_plans

    # one plans file with both configurations: derive 2d into a second file, then merge
    base = root / "preprocessed" / info["dataset_name"]
    derive_small_plans(str(base), (16, 16), configuration="2d", target_plans="nnUNetPlansSmall2d")
    import json

    small = json.loads((base / f"{SMALL_PLANS}.json").read_text())
    small2d = json.loads((base / "nnUNetPlansSmall2d.json").read_text())
    small2d["configurations"]["2d"]["data_identifier"] = f"{SMALL_PLANS}_2d"
    small["configurations"]["2d"] = small2d["configurations"]["2d"]
    (base / f"{SMALL_PLANS}.json").write_text(json.dumps(small, indent=2))
    run(["nnUNetv2_preprocess", "-d", "991", "-plans_name", SMALL_PLANS, "-c", "2d", "-np", "1"], env)
    return info


@pytest.mark.parametrize("configuration,trainer", [("3d_fullres", "nnUNetTrainerSASSNet_smoke"),
                                                   ("2d", "nnUNetTrainerSASSNet_smoke"),
                                                   ("3d_fullres", "nnUNetTrainerSDM_smoke")])
def test_train_and_predict_multiclass_multichannel(multi_dataset, configuration, trainer, tmp_path):
    env = training_environment(multi_dataset["env"])
    root, name = multi_dataset["root"], multi_dataset["dataset_name"]
    # fold 0: nnU-Net's final validation predicts 1 case instead of all 5 (fold "all")
    run(["nnUNetv2_train", "991", configuration, "0", "-tr", trainer, "-p", SMALL_PLANS, "-device", "cpu"], env)
    fold = root / "results" / name / f"{trainer}__{SMALL_PLANS}__{configuration}" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    head = checkpoint["network_weights"]["sdm_head.0.weight"]
    assert head.shape[:2] == (3, 8)  # one SDM channel per output (background unused), 8 decoder features
    assert head.ndim == (4 if configuration == "2d" else 5)
    if trainer.startswith("nnUNetTrainerSASSNet"):
        d = checkpoint["sassnet"]["discriminator_weights"]
        assert d["sdm_conv.weight"].shape[1] == 2  # one SDM channel per foreground class
        assert d["image_conv.weight"].shape[1] == 2  # every input channel
        assert d["sdm_conv.weight"].ndim == (4 if configuration == "2d" else 5)
    else:
        assert "sassnet" not in checkpoint
    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / name / "imagesTs"), "-o", str(pred), "-d", "991", "-c",
         configuration, "-tr", trainer, "-p", SMALL_PLANS, "-f", "0", "-device", "cpu",
         "--disable_progress_bar", "--disable_tta"], env)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "ts000.nii.gz")))
    assert seg.shape == (24, 24, 24) and set(np.unique(seg)) <= {0, 1, 2}
