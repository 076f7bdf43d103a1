"""Beyond the paper: several classes, several input channels, the 2d configuration, the SDM-only trainer."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SMALL_PLANS, EarlyStart, early_start, plan_tiny_dataset, run, training_environment


@early_start("multi_dataset")
def start_multi_dataset(context: dict, early: EarlyStart) -> dict:
    """2 foreground classes, 2 input channels; small plans for 3d_fullres and 2d (planned by the background
    lane: see ``started_early``)."""
    return plan_tiny_dataset(context["tmp_path_factory"].mktemp("multi"), 991, configuration="3d_fullres",
                             patch_size_2d=(16, 16), base_env=context["environ"], on_start=early.track,
                             n_labeled=5, n_unlabeled=3, n_test=1, num_classes=2, num_channels=2, seed=1)


@pytest.fixture(scope="module")
def multi_dataset(started_early) -> dict:
    return started_early["multi_dataset"].result()


@pytest.mark.slow
def test_train_and_predict_multiclass_multichannel_through_the_cli(multi_dataset, tmp_path):
    # SASSNet runs every part of the SDM trainer (head, SDM targets, loss) plus its own
    trainer = "nnUNetTrainerSASSNet_smoke"
    env = training_environment(multi_dataset["env"])
    root, name = multi_dataset["root"], multi_dataset["dataset_name"]
    # fold 0: nnU-Net's final validation predicts 1 case instead of all 5 (fold "all")
    run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", trainer, "-p", SMALL_PLANS, "-device", "cpu"], env)
    fold = root / "results" / name / f"{trainer}__{SMALL_PLANS}__3d_fullres" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    head = checkpoint["network_weights"]["sdm_head.seg_layers.0.weight"]
    assert head.shape[:2] == (3, 8) and head.ndim == 5  # one SDM channel per output, 8 decoder features
    d = checkpoint["sassnet"]["discriminator_weights"]
    assert d["sdm_conv.weight"].shape[1] == 2  # one SDM channel per foreground class
    assert d["image_conv.weight"].shape[1] == 2  # every input channel
    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / name / "imagesTs"), "-o", str(pred), "-d", "991", "-c",
         "3d_fullres", "-tr", trainer, "-p", SMALL_PLANS, "-f", "0", "-device", "cpu",
         "--disable_progress_bar", "--disable_tta", "-npp", "0", "-nps", "0"], env)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "ts000.nii.gz")))
    assert seg.shape == (24, 24, 24) and set(np.unique(seg)) <= {0, 1, 2}


def test_2d_configuration_trains_and_predicts(multi_dataset, monkeypatch):
    """The 2d configuration: 2D SDM head and discriminator, a training step, nnU-Net's predictor on a case.

    In-process (the 3d test above goes through the command-line tools; the trainer code is the same).
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.run.run_training import get_trainer_from_args

    env = training_environment(multi_dataset["env"])
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(key, env[key])
    torch.manual_seed(0)
    trainer = get_trainer_from_args("991", "2d", "all", "nnUNetTrainerSASSNet_smoke", SMALL_PLANS,
                                    device=torch.device("cpu"))
    trainer.discriminator_features = 16
    trainer.on_train_start()
    out = trainer.train_step(next(trainer.dataloader_train))
    assert np.isfinite(out["loss"]) and np.isfinite(out["unlabeled_loss"]) and np.isfinite(out["disc_loss"])
    head = trainer.network.sdm_head.seg_layers[0].weight
    assert head.shape[:2] == (3, 8) and head.ndim == 4
    d = trainer._plain_discriminator()
    assert d.sdm_conv.weight.shape[1] == 2 and d.image_conv.weight.shape[1] == 2 and d.sdm_conv.weight.ndim == 4

    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                                device=torch.device("cpu"), allow_tqdm=False)
    network = trainer.network.eval()
    network.decoder.deep_supervision = False
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [network.state_dict()], trainer.dataset_json, type(trainer).__name__, ())
    images = sorted((multi_dataset["root"] / "raw" / multi_dataset["dataset_name"] / "imagesTs").glob("ts000_*"))
    image, properties = SimpleITKIO().read_images([str(p) for p in images])
    seg = predictor.predict_single_npy_array(image, properties)
    assert seg.shape == (24, 24, 24) and set(np.unique(seg)) <= {0, 1, 2}


def test_region_based_dataset_gets_one_sdm_per_region(multi_dataset, tmp_path, monkeypatch):
    """nnU-Net's regions (here: 'whole' = labels 1+2, 'core' = label 2): SDM targets of the region masks."""
    import json
    import shutil

    from nnunet_sassnet.sdm import signed_distance_map

    root = tmp_path / "regions"
    for key in ("raw", "preprocessed"):
        shutil.copytree(multi_dataset["root"] / key, root / key)
    (root / "results").mkdir()
    name = multi_dataset["dataset_name"]
    for folder in (root / "raw" / name, root / "preprocessed" / name):
        dataset_json = json.loads((folder / "dataset.json").read_text())
        dataset_json["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
        dataset_json["regions_class_order"] = [1, 2]
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    env = training_environment(multi_dataset["env"])
    env.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                "nnUNet_results": str(root / "results")})
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(key, env[key])
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args("991", "3d_fullres", "all", "nnUNetTrainerSASSNet_smoke", SMALL_PLANS,
                                    device=torch.device("cpu"))
    trainer.discriminator_features = 16
    trainer.on_train_start()
    assert trainer.label_manager.has_regions and trainer.num_sdm_channels == 2
    batch = next(trainer.dataloader_train)
    regions = batch["target"][0]  # (N, 2, ...) binary region masks after nnU-Net's region conversion
    assert regions.shape[1] == 2
    targets = trainer.sdm_targets(regions)
    for i in range(regions.shape[0]):
        for r in range(2):
            expected = signed_distance_map(regions[i, r].numpy() > 0)
            assert torch.equal(targets[i, r], torch.from_numpy(expected))
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"]) and np.isfinite(out["unlabeled_loss"])
    assert trainer._plain_discriminator().sdm_conv.weight.shape[1] == 2
