"""End to end through nnU-Net's own command-line tools on a tiny synthetic dataset."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SMALL_PLANS, run, training_environment


@pytest.mark.slow
def test_train_and_predict_through_stock_cli(tiny_dataset, sassnet_fold0, tmp_path):
    env = training_environment(tiny_dataset["env"])
    root, name = tiny_dataset["root"], tiny_dataset["dataset_name"]
    trainer = sassnet_fold0["trainer"]

    run(["nnunet_sassnet_preprocess_unlabeled", "-d", "990", "-c", "3d_fullres", "-p", SMALL_PLANS, "-np", "1"],
        env)
    unlabeled = root / "preprocessed" / name / f"{SMALL_PLANS}_3d_fullres_unlabeled"
    assert sorted(p.name for p in unlabeled.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")) == \
        [f"un{i:03d}.b2nd" for i in range(4)]
    assert (unlabeled / "sassnet_unlabeled_stamp.json").is_file()
    # nnU-Net's own folder holds only the labeled cases
    labeled = root / "preprocessed" / name / f"{SMALL_PLANS}_3d_fullres"
    assert not list(labeled.glob("un*"))

    again = run(["nnunet_sassnet_preprocess_unlabeled", "-d", "990", "-c", "3d_fullres", "-p", SMALL_PLANS],
                env)
    assert "up to date" in again.stdout

    # the training (nnUNetv2_train, fold 0) is the session's shared one: see conftest.sassnet_fold0
    assert "Training done." in sassnet_fold0["stdout"]
    fold = sassnet_fold0["model"] / "fold_0"
    log_text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    for key in ("seg_losses", "sdm_losses", "gen_losses", "disc_losses", "disc_acc_labeled",
                "adversarial_weights"):
        assert key in log_text
    assert (fold / "progress.png").is_file()
    assert (fold / "validation" / "summary.json").is_file()

    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    assert any(k.startswith("sdm_head.") for k in checkpoint["network_weights"])
    state = checkpoint["sassnet"]
    assert state["current_iteration"] == 2 * 3  # 2 epochs x 3 iterations
    assert any(k.startswith("sdm_conv.") for k in state["discriminator_weights"])
    assert state["discriminator_optimizer_state"]["state"], "the discriminator was never updated"

    pred_dir = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(root / "raw" / name / "imagesTs"), "-o", str(pred_dir), "-d", "990",
         "-c", "3d_fullres", "-tr", trainer, "-p", SMALL_PLANS, "-f", "0", "-device", "cpu",
         "--disable_progress_bar", "--disable_tta", "-npp", "1", "-nps", "1"], env, plain=True)
    predictions = sorted(pred_dir.glob("*.nii.gz"))
    assert [p.name for p in predictions] == ["ts000.nii.gz", "ts001.nii.gz"]
    for p in predictions:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        assert seg.shape == (24, 24, 24)
        assert set(np.unique(seg)) <= {0, 1}

    # the same command in this process, watched by a global forward hook: the SDM head never runs
    assert_sdm_head_idle_during_predict(env, root / "raw" / name / "imagesTs", tmp_path / "pred_hooked", trainer)


def assert_sdm_head_idle_during_predict(env: dict, images: Path, output: Path, trainer: str) -> None:
    import sys

    from torch.nn.modules.module import register_module_forward_pre_hook

    from nnunet_sassnet.networks import SASSNetwork

    networks, head_calls = [], []

    def hook(module, args):
        # a pre-hook sees the network before any of its parts run
        if isinstance(module, SASSNetwork):
            networks.append(module)
        elif any(module is net.sdm_head for net in networks):
            head_calls.append(module)

    handle = register_module_forward_pre_hook(hook)
    old_argv, old_env = sys.argv, dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet")})
    sys.argv = ["nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", "990", "-c", "3d_fullres",
                "-tr", trainer, "-p", SMALL_PLANS, "-f", "0", "-device", "cpu", "--disable_progress_bar",
                "--disable_tta", "-npp", "0", "-nps", "0"]  # no worker interpreters (the command above has them)
    try:
        from nnunetv2.inference.predict_from_raw_data import predict_entry_point

        predict_entry_point()
    finally:
        handle.remove()
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(old_env)
    assert networks, "the SASSNet network did not run"
    assert head_calls == []
    assert len(list(output.glob("*.nii.gz"))) == 2


def test_dataset_without_unlabeled_images_is_refused_before_training(tiny_dataset):
    env = training_environment(tiny_dataset["env"])
    raw = tiny_dataset["root"] / "raw" / tiny_dataset["dataset_name"]
    aside = raw.parent / "imagesUnlabeled.aside"
    shutil.move(raw / "imagesUnlabeled", aside)
    try:
        result = run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", "nnUNetTrainerSASSNet_smoke",
                      "-p", SMALL_PLANS, "-device", "cpu"], env, check=False)
        (raw / "imagesUnlabeled").mkdir()
        empty = run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", "nnUNetTrainerSASSNet_smoke",
                     "-p", SMALL_PLANS, "-device", "cpu"], env, check=False)
    finally:
        shutil.rmtree(raw / "imagesUnlabeled", ignore_errors=True)
        shutil.move(aside, raw / "imagesUnlabeled")
    for res, what in ((result, "does not exist"), (empty, "is empty")):
        assert res.returncode != 0
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error: no unlabeled images") and what in last and "imagesUnlabeled" in last
        assert "Traceback" not in res.stderr
        assert "Epoch 0" not in res.stdout


def test_trainer_dir_is_found_by_nnunet_lookup(tiny_dataset, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunet_sassnet.trainers as trainers
    import nnunet_sassnet.variants as variants

    monkeypatch.setenv("nnUNet_extTrainer", tiny_dataset["env"]["nnUNet_extTrainer"])
    assert recursive_find_trainer_class_by_name("nnUNetTrainerSASSNet") is trainers.nnUNetTrainerSASSNet
    assert recursive_find_trainer_class_by_name("nnUNetTrainerSDM") is trainers.nnUNetTrainerSDM
    found = recursive_find_trainer_class_by_name("nnUNetTrainerSASSNet_smoke")
    assert found is variants.nnUNetTrainerSASSNet_smoke and found.__name__ == "nnUNetTrainerSASSNet_smoke"


def test_user_subclass_in_another_folder_is_found(tiny_dataset, tmp_path, monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunet_sassnet.trainers as trainers

    user_dir = tmp_path / "my_trainers"
    user_dir.mkdir()
    (user_dir / "my_lab_trainers.py").write_text(
        "from nnunet_sassnet import nnUNetTrainerSASSNet\n\n\n"
        "class nnUNetTrainerSASSNetStrongerGAN(nnUNetTrainerSASSNet):\n"
        "    adversarial_weight_max = 0.01\n")
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([tiny_dataset["env"]["nnUNet_extTrainer"],
                                                             str(user_dir)]))
    cls = recursive_find_trainer_class_by_name("nnUNetTrainerSASSNetStrongerGAN")
    assert issubclass(cls, trainers.nnUNetTrainerSASSNet) and cls.adversarial_weight_max == 0.01


THREADS_PROBE = """
import os, sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
seen = []
for limit in ("1", "64"):
    os.environ["OMP_NUM_THREADS"] = limit
    torch.set_num_threads(2)  # what nnUNetv2_train and nnUNetv2_predict -device cpu do on two cores
    trainer = get_trainer_from_args("990", "3d_fullres", 0, "nnUNetTrainerSASSNet_smoke", sys.argv[1],
                                    device=torch.device("cpu"))
    seen.append(torch.get_num_threads())
    torch.set_num_threads(2)
    type(trainer).build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 2, False)
    seen.append(torch.get_num_threads())
print("threads", *seen)
"""


def test_cpu_trainings_and_predictions_keep_to_omp_num_threads(tiny_dataset):
    """nnU-Net's CPU commands set one torch thread per core; the trainer (training) and its network builder
    (the hook nnUNetv2_predict calls) bring it down to OMP_NUM_THREADS, and never raise it."""
    env = {k: v for k, v in training_environment(tiny_dataset["env"]).items() if k != "OMP_NUM_THREADS"}
    result = run([sys.executable, "-c", THREADS_PROBE, SMALL_PLANS], env)
    assert "threads 1 1 2 2" in result.stdout, result.stdout[-2000:]
