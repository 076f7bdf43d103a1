"""A user's supervised nnU-Net model fine-tuned with ``-pretrained_weights``, and nnU-Net's Residual Encoder
(ResEnc) U-Net, through nnU-Net's own command-line tools on the tiny dataset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import SMALL_PLANS, run, training_environment
from nnunet_sassnet.trainers import CHECKPOINT_KEY

#: the user's own trainers, in a folder of their own on nnUNet_extTrainer: tiny schedules
USER_TRAINERS = '''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_sassnet import nnUNetTrainerSASSNet, nnUNetTrainerSDM, trainer_variant

_TINY = dict(num_epochs=2, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1,
             save_every=1)  # checkpoint_latest after every epoch: a run stopped after epoch 0 can resume
nnUNetTrainer_tiny = trainer_variant(nnUNetTrainer, "nnUNetTrainer_tiny", __name__, **_TINY)
nnUNetTrainerSDM_tiny = trainer_variant(nnUNetTrainerSDM, "nnUNetTrainerSDM_tiny", __name__, **_TINY)
nnUNetTrainerSASSNet_tiny = trainer_variant(nnUNetTrainerSASSNet, "nnUNetTrainerSASSNet_tiny", __name__,
                                            discriminator_features=16, **_TINY)
'''
RESENC_PLANS = "nnUNetResEncUNetMPlansSmall"


@pytest.fixture(scope="module")
def user_env(tiny_dataset, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("user_trainers")
    (folder / "user_tiny_trainers.py").write_text(USER_TRAINERS)
    env = training_environment(tiny_dataset["env"])
    env["nnUNet_extTrainer"] = os.pathsep.join([str(folder), env["nnUNet_extTrainer"]])
    return env


def fold_folder(dataset: dict, trainer: str, plans: str) -> Path:
    return dataset["root"] / "results" / dataset["dataset_name"] / f"{trainer}__{plans}__3d_fullres" / "fold_0"


def train(env: dict, trainer: str, plans: str, *extra: str) -> str:
    return run(["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", trainer, "-p", plans, "-device", "cpu",
                *extra], env).stdout


@pytest.fixture(scope="module")
def supervised_checkpoint(tiny_dataset, user_env) -> Path:
    """The user's model: nnU-Net's own nnUNetTrainer, trained through nnUNetv2_train."""
    train(user_env, "nnUNetTrainer_tiny", SMALL_PLANS)
    checkpoint = fold_folder(tiny_dataset, "nnUNetTrainer_tiny", SMALL_PLANS) / "checkpoint_final.pth"
    assert checkpoint.is_file()
    return checkpoint


def network_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerSDM_tiny", "nnUNetTrainerSASSNet_tiny"])
def test_nnunet_loader_transfers_the_unet_and_starts_the_sdm_head_fresh(trainer_name, supervised_checkpoint,
                                                                        nnunet_paths, user_env, monkeypatch,
                                                                        capsys):
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    from nnunet_sassnet.networks import unwrap_module

    monkeypatch.setenv("nnUNet_extTrainer", user_env["nnUNet_extTrainer"])
    trainer = get_trainer_from_args("990", "3d_fullres", 0, trainer_name, SMALL_PLANS, device=torch.device("cpu"))
    trainer.initialize()
    network = unwrap_module(trainer.network)
    head_before = {k: v.clone() for k, v in network.sdm_head.state_dict().items()}
    # exactly what nnUNetv2_train -pretrained_weights does
    maybe_load_checkpoint(trainer, False, False, str(supervised_checkpoint))

    pretrained = network_weights(supervised_checkpoint)
    loaded = network.state_dict()
    unet_keys = [k for k in loaded if not k.startswith("sdm_head.") and ".seg_layers." not in k]
    assert len(unet_keys) > 20 and not any(k.startswith("sdm_head.") for k in pretrained)
    for key in unet_keys:
        assert torch.equal(loaded[key], pretrained[key]), key
    assert [k for k in loaded if k.startswith("sdm_head.")] == ["sdm_head.seg_layers.0.weight",
                                                                 "sdm_head.seg_layers.0.bias"]
    for key, value in network.sdm_head.state_dict().items():
        assert torch.equal(value, head_before[key]), key
    assert network.sdm_head.loaded_from_weights is False
    assert "hold no SDM head" in capsys.readouterr().out


@pytest.mark.slow
def test_sassnet_fine_tunes_a_supervised_model_through_the_cli(tiny_dataset, user_env, supervised_checkpoint):
    out = train(user_env, "nnUNetTrainerSASSNet_tiny", SMALL_PLANS, "-pretrained_weights",
                str(supervised_checkpoint))
    assert "Loading pretrained weights" in out and "hold no SDM head" in out
    assert "Training done." in out
    checkpoint = torch.load(fold_folder(tiny_dataset, "nnUNetTrainerSASSNet_tiny", SMALL_PLANS) /
                            "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("sdm_head.seg_layers.") for k in checkpoint["network_weights"])
    assert checkpoint[CHECKPOINT_KEY]["current_iteration"] == 4


def test_old_checkpoint_head_names_still_load():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_sassnet.networks import SASSNetwork

    def network() -> SASSNetwork:
        unet = PlainConvUNet(1, 2, (4, 8), torch.nn.Conv3d, 3, (1, 2), 1, 2, 1, norm_op=torch.nn.InstanceNorm3d)
        return SASSNetwork(unet, 2)

    torch.manual_seed(0)
    source = network()
    old_state = {k.replace("sdm_head.seg_layers.0.", "sdm_head.0."): v for k, v in source.state_dict().items()}
    assert "sdm_head.0.weight" in old_state  # how checkpoints named the head before
    target = network()
    target.load_state_dict(old_state)
    assert torch.equal(target.sdm_head.seg_layers[0].weight, source.sdm_head.seg_layers[0].weight)
    assert target.sdm_head.loaded_from_weights is True
    x = torch.rand(1, 1, 8, 8, 8)
    assert torch.equal(target(x, return_sdm=True)[1], source(x, return_sdm=True)[1])


# ---------------------------------------------------------------------------------------------- ResEnc

@pytest.fixture(scope="module")
def resenc_plans(tiny_dataset, user_env) -> str:
    """Small plans with the U-Net that nnU-Net's ResEnc presets (nnUNetPlannerResEncM/L/XL) write.

    nnUNetPlannerResEncM itself plans this dataset as a ResidualEncoderUNet with ``n_blocks_per_stage`` (1, 3, 4)
    and one convolution per decoder stage; its GPU-sized search takes minutes on a CPU, so the tiny plans take
    that architecture over into the small plans' network width.
    """
    folder = tiny_dataset["root"] / "preprocessed" / tiny_dataset["dataset_name"]
    plans = json.loads((folder / f"{SMALL_PLANS}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    arch = config["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = arch["arch_kwargs"]
    n_stages = kwargs["n_stages"]
    del kwargs["n_conv_per_stage"]
    kwargs["n_blocks_per_stage"] = [1, 3, 4][:n_stages]
    kwargs["n_conv_per_stage_decoder"] = [1] * (n_stages - 1)
    config["data_identifier"] = f"{RESENC_PLANS}_3d_fullres"
    plans["plans_name"] = RESENC_PLANS
    (folder / f"{RESENC_PLANS}.json").write_text(json.dumps(plans, indent=2))
    run(["nnUNetv2_preprocess", "-d", "990", "-plans_name", RESENC_PLANS, "-c", "3d_fullres", "-np", "1"], user_env)
    return RESENC_PLANS


def train_until_epoch_1(env: dict, trainer: str, plans: str, *extra: str) -> str:
    """Start a training and stop it (like Ctrl-C) once epoch 0 is done and its checkpoint written."""
    cmd = ["nnUNetv2_train", "990", "3d_fullres", "0", "-tr", trainer, "-p", plans, "-device", "cpu", *extra]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.rstrip().endswith("Epoch 1"):  # nnU-Net starts epoch 1 after saving epoch 0's checkpoint
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    output = "".join(lines)
    assert output.rstrip().endswith("Epoch 1"), output[-3000:]
    return output


@pytest.mark.slow
def test_resenc_unet_trains_resumes_and_predicts_through_the_cli(tiny_dataset, user_env, resenc_plans, tmp_path):
    # SASSNet runs every part of the SDM trainer (head, targets, loss, checkpoint) plus its own state
    trainer = "nnUNetTrainerSASSNet_tiny"
    fold = fold_folder(tiny_dataset, trainer, resenc_plans)
    train_until_epoch_1(user_env, trainer, resenc_plans)
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / "checkpoint_final.pth").exists()

    resumed = train(user_env, trainer, resenc_plans, "--c")
    assert "Epoch 1" in resumed and "Epoch 0\n" not in resumed and "Training done." in resumed
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2
    weights = checkpoint["network_weights"]
    assert any(".blocks." in k for k in weights)  # residual blocks: the ResEnc encoder
    assert any(k.startswith("sdm_head.seg_layers.") for k in weights)
    # 2 iterations before the stop + 2 after resuming: beta(t) goes on where it stopped
    assert checkpoint[CHECKPOINT_KEY]["current_iteration"] == 4

    pred = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(tiny_dataset["root"] / "raw" / tiny_dataset["dataset_name"] / "imagesTs"),
         "-o", str(pred), "-d", "990", "-c", "3d_fullres", "-tr", trainer, "-p", resenc_plans, "-f", "0",
         "-device", "cpu", "--disable_progress_bar", "--disable_tta", "-npp", "0", "-nps", "0"], user_env)
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["ts000.nii.gz", "ts001.nii.gz"]

    # the network nnU-Net builds from these plans: the ResEnc U-Net inside SASSNet's wrapper
    from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sassnet.networks import SASSNetwork
    from nnunet_sassnet.trainers import nnUNetTrainerSDM

    folder = tiny_dataset["root"] / "preprocessed" / tiny_dataset["dataset_name"]
    manager = PlansManager(json.loads((folder / f"{resenc_plans}.json").read_text()))
    network = nnUNetTrainerSDM.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 2)
    assert isinstance(network, SASSNetwork) and type(network.encoder) is ResidualEncoder
    assert set(network.state_dict()) == set(weights)
