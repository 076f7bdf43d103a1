"""Real training steps of the trainers, in-process, on the tiny dataset."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SMALL_PLANS
from nnunet_sassnet.sdm import signed_distance_map
from nnunet_sassnet.trainers import gaussian_rampup
from nnunet_sassnet.unlabeled.cases import STAMP_FILE
from nnunet_sassnet.unlabeled.integrity import case_records


def make_trainer(name: str = "nnUNetTrainerSASSNet_smoke", fold="all"):
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args("990", "3d_fullres", fold, name, SMALL_PLANS, device=torch.device("cpu"))
    trainer.discriminator_features = 16  # a narrower D keeps the CPU steps quick; the code path is the same
    return trainer


class RecordingLoader:
    """Passes the real loader's batches through and keeps the last one."""

    def __init__(self, loader):
        self.loader = loader
        self.last = None

    def __next__(self):
        self.last = next(self.loader)
        return self.last


@pytest.fixture()
def started_trainer(nnunet_paths):
    torch.manual_seed(0)
    trainer = make_trainer()
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer  # augmentation runs in-process in the tests: no workers to shut down


def test_unlabeled_batch_reaches_discriminator_and_generator_but_no_supervised_loss(started_trainer):
    trainer = started_trainer
    trainer.dataloader_unlabeled = RecordingLoader(trainer.dataloader_unlabeled)
    d_inputs, loss_targets = [], []
    d = trainer.discriminator
    hook = d.register_forward_hook(lambda m, args, out: d_inputs.append((args[0].detach(), args[1].detach())))
    loss_fn = trainer.loss

    def recording_loss(output, target):
        loss_targets.append([t.shape[0] for t in target])
        return loss_fn(output, target)

    trainer.loss = recording_loss
    batch = next(trainer.dataloader_train)
    num_labeled = batch["data"].shape[0]
    out = trainer.train_step(batch)
    hook.remove()
    unlabeled = trainer.dataloader_unlabeled.last
    num_unlabeled = unlabeled["data"].shape[0]
    assert num_unlabeled == num_labeled == 2

    # the generator pass sees exactly the unlabeled images; the discriminator update the labeled patch that
    # nnU-Net cropped at random (batch 2, 33 % oversampling: the first) + the unlabeled ones
    (gen_sdm, gen_images), (disc_sdm, disc_images) = d_inputs
    assert trainer.discriminator_labeled_indices == slice(0, 1)
    assert torch.equal(gen_images, unlabeled["data"])
    assert torch.equal(disc_images[1:], unlabeled["data"])
    assert torch.equal(disc_images[:1], batch["data"][:1])
    assert torch.allclose(disc_sdm[1:], gen_sdm)  # the same predictions, detached (one forward)
    assert gen_sdm.shape == (num_unlabeled, 1, 16, 16, 16) and gen_sdm.abs().max() <= 1
    # the supervised loss only ever saw the labeled patches' targets
    assert loss_targets == [[num_labeled] * len(loss_targets[0])]
    for key in ("loss", "seg_loss", "sdm_loss", "unlabeled_loss", "disc_loss"):
        assert np.isfinite(out[key]), key
    assert out["unlabeled_weight"] == pytest.approx(0.015 * gaussian_rampup(0, 6))
    assert trainer.current_iteration == 1


def test_generator_term_depends_on_unlabeled_patches(started_trainer):
    trainer = started_trainer
    batch = next(trainer.dataloader_train)
    unlabeled = next(trainer.dataloader_unlabeled)
    d = trainer._plain_discriminator().eval()  # no dropout: D is a fixed function here
    with torch.no_grad():
        _, sdm = trainer.network(torch.cat((batch["data"], unlabeled["data"])), return_sdm=True)
        sdm = sdm[:, trainer.sdm_channels]
        logits_unlabeled = d(sdm[2:], unlabeled["data"])
        logits_swapped = d(sdm[2:], batch["data"])
    assert not torch.allclose(logits_unlabeled, logits_swapped)


def test_discriminator_learns_to_separate(started_trainer):
    trainer = started_trainer
    d = trainer._plain_discriminator()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    net_before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    sdm = torch.cat((torch.full((2, 1, 16, 16, 16), 0.5), torch.full((2, 1, 16, 16, 16), -0.5)))
    images = torch.zeros((4, 1, 16, 16, 16))
    losses = [float(trainer.update_discriminator(sdm, images, 2)["disc_loss"].detach()) for _ in range(15)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(before[k], v) for k, v in d.state_dict().items())
    # the discriminator update never touches the segmentation network
    assert all(torch.equal(net_before[k], v) for k, v in trainer.network.state_dict().items())


def test_sdm_targets_follow_the_augmented_patch(started_trainer):
    trainer = started_trainer
    batch = next(trainer.dataloader_train)
    full_res = batch["target"][0]
    targets = trainer.sdm_targets(full_res)
    assert targets.shape == (2, 1, 16, 16, 16)
    for i in range(2):
        expected = signed_distance_map(full_res[i, 0].numpy() == 1)
        assert torch.equal(targets[i, 0], torch.from_numpy(expected))


def test_network_returns_plain_segmentation_without_running_the_head(started_trainer):
    trainer = started_trainer
    net = trainer.network
    calls = []
    hook = net.sdm_head.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        plain = net(x)
        seg, sdm = net(x, return_sdm=True)
    hook.remove()
    assert calls == [1]  # only the call that asked for the SDM
    assert isinstance(plain, list) and all(torch.equal(a, b) for a, b in zip(plain, seg))
    trainer.set_deep_supervision_enabled(False)
    with torch.no_grad():
        single = net(x)
    trainer.set_deep_supervision_enabled(True)
    assert torch.is_tensor(single) and single.shape == (1, 2, 16, 16, 16)


def test_checkpoint_of_compiled_modules_has_plain_keys_and_loads_in_predictor(started_trainer, tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer = started_trainer
    trainer.network = torch.compile(trainer.network)
    trainer.discriminator = torch.compile(trainer.discriminator)
    fold_dir = tmp_path / "model" / "fold_all"
    fold_dir.mkdir(parents=True)
    trainer.save_checkpoint(str(fold_dir / "checkpoint_final.pth"))
    checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in k for k in checkpoint["network_weights"])
    assert not any("_orig_mod" in k for k in checkpoint["sassnet"]["discriminator_weights"])
    import shutil
    shutil.copy(f"{trainer.output_folder_base}/plans.json", tmp_path / "model")
    shutil.copy(f"{trainer.output_folder_base}/dataset.json", tmp_path / "model")
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(tmp_path / "model"), use_folds=("all",))
    assert type(predictor.network).__name__ == "SASSNetwork"


def test_gaussian_rampup():
    assert gaussian_rampup(0, 100) == pytest.approx(np.exp(-5))
    assert gaussian_rampup(50, 100) == pytest.approx(np.exp(-5 * 0.25))
    assert gaussian_rampup(100, 100) == 1.0 and gaussian_rampup(500, 100) == 1.0


def test_non_finite_losses_skip_updates_and_stop_the_run(started_trainer):
    from nnunet_sassnet.trainers import NonFiniteLossError

    trainer = started_trainer
    net_before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    d = trainer._plain_discriminator()
    d_before = {k: v.clone() for k, v in d.state_dict().items()}
    batch = next(trainer.dataloader_train)
    poisoned = {**batch, "data": batch["data"].clone()}
    poisoned["data"][0, 0, 0, 0, 0] = float("nan")  # one NaN voxel in a real batch
    out = trainer.train_step(poisoned)
    assert not np.isfinite(out["loss"]) and out["skipped_network"] == 1 and out["skipped_discriminator"] == 1
    assert all(torch.equal(net_before[k], v) for k, v in trainer.network.state_dict().items())
    assert all(torch.equal(d_before[k], v) for k, v in d.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.network.state_dict().values() if v.is_floating_point())

    out = trainer.train_step(next(trainer.dataloader_train))  # a good step resets the count
    assert out["skipped_network"] == 0 and out["consecutive_skips_network"] == 0

    trainer.max_consecutive_skipped_steps = 2
    trainer.train_step(poisoned)
    with pytest.raises(NonFiniteLossError, match="2 consecutive training steps"):
        trainer.train_step(poisoned)
    saved = torch.load(f"{trainer.output_folder}/checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in saved["network_weights"].values() if v.is_floating_point())

    outputs = [{"loss": np.float32(1), "seg_loss": np.float32(1), "sdm_loss": np.float32(1),
                "unlabeled_loss": np.float32(1), "disc_loss": np.float32(1), "disc_acc_labeled": np.float32(1),
                "disc_acc_unlabeled": np.float32(0), "unlabeled_weight": 0.001,
                "unlabeled_grad_ratio": np.float32("nan"),
                "skipped_network": np.float32(s), "skipped_discriminator": np.float32(0)} for s in (1, 0, 1)]
    trainer.on_train_epoch_end(outputs)
    assert trainer.logger.get_value("skipped_steps_network", step=-1) == 2


def test_resume_continues_the_adversarial_game(started_trainer):
    trainer = started_trainer
    for _ in range(3):
        trainer.train_step(next(trainer.dataloader_train))
    path = f"{trainer.output_folder}/checkpoint_test_resume.pth"
    trainer.save_checkpoint(path)

    resumed = make_trainer()
    resumed.load_checkpoint(path)
    assert resumed.current_iteration == trainer.current_iteration == 3
    assert resumed.adversarial_weight(resumed.current_iteration) == trainer.adversarial_weight(3) > 0
    d_old, d_new = trainer._plain_discriminator().state_dict(), resumed._plain_discriminator().state_dict()
    assert all(torch.equal(d_old[k], d_new[k]) for k in d_old)
    state_old = trainer.discriminator_optimizer.state_dict()["state"]
    state_new = resumed.discriminator_optimizer.state_dict()["state"]
    assert all(float(state_new[i]["step"]) == float(state_old[i]["step"]) == 3 for i in state_old)
    assert all(torch.equal(state_new[i]["exp_avg_sq"], state_old[i]["exp_avg_sq"]) for i in state_old)
    assert resumed.discriminator_grad_scaler.state_dict() == trainer.discriminator_grad_scaler.state_dict()

    # and training goes on from there
    resumed.on_train_start()
    resumed.on_train_epoch_start()
    out = resumed.train_step(next(resumed.dataloader_train))
    assert np.isfinite(out["loss"]) and resumed.current_iteration == 4
    assert float(resumed.discriminator_optimizer.state_dict()["state"][0]["step"]) == 4


def test_one_unet_forward_per_step(started_trainer):
    trainer = started_trainer
    calls = []
    hook = trainer.network.encoder.register_forward_hook(lambda *args: calls.append(1))
    trainer.train_step(next(trainer.dataloader_train))
    hook.remove()
    assert len(calls) == 1  # the discriminator's update reuses the step's detached predictions


def test_discriminator_is_in_eval_mode_for_the_generator_term_and_in_train_mode_for_its_update(started_trainer):
    trainer = started_trainer
    modes = []
    d = trainer._plain_discriminator()
    hook = d.register_forward_hook(lambda module, args, out: modes.append(module.training))
    trainer.train_step(next(trainer.dataloader_train))
    hook.remove()
    assert modes == [False, True]  # published code: D.eval() for the generator term, D.train() for D's step
    assert d.training and all(p.requires_grad for p in d.parameters())


def test_generator_term_reaches_the_network_and_its_gradient_ratio_is_logged(started_trainer):
    trainer = started_trainer
    assert trainer._probe_this_step()  # the first steps of an epoch are probed
    out = trainer.train_step(next(trainer.dataloader_train))
    assert np.isfinite(out["unlabeled_grad_ratio"]) and out["unlabeled_grad_ratio"] > 0

    # the ratio is the weighted generator gradient over the supervised one: linear in the weight
    batch, unlabeled = next(trainer.dataloader_train), next(trainer.dataloader_unlabeled)
    data = torch.cat((batch["data"], unlabeled["data"]))
    with trainer.unlabeled_term_context():
        seg, sdm = trainer.network(data, return_sdm=True)
        supervised = trainer.supervised_loss(trainer.supervised_losses(seg, sdm, batch["target"], 2))
        gen, _ = trainer.unlabeled_loss(seg, sdm, data, 2)
        small, large = trainer.gradient_ratio(supervised, 0.001 * gen), trainer.gradient_ratio(supervised, 0.015 * gen)
    assert float(small) > 0 and float(large) == pytest.approx(15 * float(small), rel=1e-4)

    trainer.current_iteration = trainer.gradient_probe_steps_per_epoch  # later steps of the epoch: not probed
    assert np.isnan(trainer.train_step(next(trainer.dataloader_train))["unlabeled_grad_ratio"])


def test_discriminator_sees_labeled_and_unlabeled_patches_drawn_alike(started_trainer, tmp_path):
    """On the real loaders: the labeled patches D sees are centred on foreground as often as unlabeled ones."""
    import shutil

    trainer = started_trainer
    # unlabeled cases whose labels are known: the labeled cases themselves, through the unlabeled loader
    labeled_folder = trainer.preprocessed_dataset_folder
    for name in __import__("os").listdir(labeled_folder):
        shutil.copy(f"{labeled_folder}/{name}", tmp_path / name)
    # with the records that nnunet_sassnet_preprocess_unlabeled stamps its folders with (the loader checks them)
    cases = [p.name[:-len(".pkl")] for p in tmp_path.glob("*.pkl")]
    (tmp_path / STAMP_FILE).write_text(json.dumps({"files": case_records(str(tmp_path), cases)}))
    trainer.unlabeled_preprocessed_folder = str(tmp_path)
    unlabeled_loader = trainer._unlabeled_dataloader()

    def centre_is_foreground(target) -> np.ndarray:
        full_res = target[0] if isinstance(target, list) else target
        centre = tuple(s // 2 for s in full_res.shape[2:])
        return (full_res[(slice(None), 0, *centre)] > 0).numpy()

    np.random.seed(0)  # nnU-Net's loader and augmentation draw from numpy (in-process here): a fixed draw
    seen_by_d, oversampled, unlabeled = [], [], []
    d_patches = trainer.discriminator_labeled_indices
    for _ in range(120):
        labeled = centre_is_foreground(next(trainer.dataloader_train)["target"])
        seen_by_d.extend(labeled[d_patches])
        oversampled.extend(np.delete(labeled, np.arange(labeled.size)[d_patches]))
        unlabeled.extend(centre_is_foreground(next(unlabeled_loader)["target"]))
    seen_by_d, oversampled, unlabeled = (np.mean(v) for v in (seen_by_d, oversampled, unlabeled))
    # binomial standard errors at 120-240 draws are below 0.05
    assert abs(seen_by_d - unlabeled) < 0.15, (seen_by_d, unlabeled)
    # the check is sensitive: nnU-Net's foreground-centred patches (what D also saw before) differ clearly
    assert oversampled > 0.75 and oversampled - unlabeled > 0.25, (oversampled, unlabeled)


def test_random_patch_indices_follow_nnunets_loader():
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    from nnunet_sassnet.trainers import random_patch_indices

    for batch_size in (1, 2, 3, 4, 5, 8):
        for percent in (0.0, 0.33, 0.5, 1.0):
            rule = nnUNetDataLoader._oversample_last_XX_percent
            state = type("Loader", (), {"batch_size": batch_size, "oversample_foreground_percent": percent})()
            expected = [i for i in range(batch_size) if not rule(state, i)]
            assert random_patch_indices(batch_size, percent) == expected


def test_compiled_discriminator_trains_and_matches_the_eager_one(nnunet_paths):
    """torch.compile on D (the CUDA default; here aot_eager, which needs no C++ compiler on the CPU)."""
    torch.manual_seed(0)
    trainer = make_trainer()
    trainer.compile_discriminator, trainer.discriminator_compile_backend = True, "aot_eager"
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    plain = trainer._plain_discriminator()
    assert hasattr(trainer._generator_discriminator, "_orig_mod") and trainer._generator_discriminator._orig_mod is plain
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    for _ in range(2):  # the generator pass (eval, frozen) and D's update (train) each trace their own graph
        out = trainer.train_step(next(trainer.dataloader_train))
        assert all(np.isfinite(out[k]) for k in ("unlabeled_loss", "disc_loss"))
    assert any(not torch.equal(before[k], v) for k, v in plain.state_dict().items())  # D was updated
    assert set(trainer.extra_checkpoint_state()["discriminator_weights"]) == set(before)  # plain keys

    batch = next(trainer.dataloader_unlabeled)["data"]
    sdm = torch.rand((batch.shape[0], 1, *batch.shape[2:])) * 2 - 1
    with trainer.unlabeled_term_context(), torch.no_grad():
        assert torch.allclose(trainer._generator_discriminator(sdm, batch), plain(sdm, batch), atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's inductor backend needs a C++ compiler on the CPU")
def test_gradient_probe_runs_through_the_compiled_unet_and_discriminator(nnunet_paths, monkeypatch):
    """nnU-Net's CUDA default, on the CPU: the U-Net and D compiled with inductor, then a probe step.

    The probe backpropagates twice through the same graph; inductor's donated buffers refuse that unless
    the trainer turns them off before the first compiled forward (a GPU run crashed here at its first step).
    """
    import torch._functorch.config as functorch_config

    monkeypatch.setattr(functorch_config, "donated_buffer", True)  # torch's default, whatever ran before
    torch.manual_seed(0)
    trainer = make_trainer()
    trainer._do_i_compile = lambda: True  # nnU-Net's rule says no on the CPU; its compile path is the same
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    assert hasattr(trainer.network, "_orig_mod") and hasattr(trainer._generator_discriminator, "_orig_mod")
    assert trainer._probe_this_step()
    out = trainer.train_step(next(trainer.dataloader_train))
    assert np.isfinite(out["unlabeled_grad_ratio"]) and out["unlabeled_grad_ratio"] > 0
    assert functorch_config.donated_buffer is False


def test_discriminator_follows_nnunets_compile_rule_by_default(started_trainer):
    # nnU-Net compiles nothing on the CPU; D follows the U-Net
    assert not hasattr(started_trainer._generator_discriminator, "_orig_mod")
    assert not hasattr(started_trainer.network, "_orig_mod")


def test_half_resolution_discriminator_sees_pooled_patches_and_learns(nnunet_paths):
    """``discriminator_downsampled``: both of D's passes see SDM and image pooled like the U-Net's first
    downsampling (plan pooling 2 on the tiny 16^3 patch: 8^3), the step trains D, and D's weights are those
    of a full-resolution D with the first pooling taken out (checkpoints keep their keys)."""
    from nnunet_sassnet.networks import unwrap_module

    torch.manual_seed(0)
    trainer = make_trainer()
    trainer.discriminator_downsampled = True
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    d = unwrap_module(trainer.discriminator)
    seen = []
    hooks = [conv.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[2:])))
             for conv in (d.sdm_conv, d.image_conv)]
    before = {k: v.clone() for k, v in d.state_dict().items()}
    out = trainer.train_step(next(trainer.dataloader_train))
    for hook in hooks:
        hook.remove()
    first_pool = trainer.configuration_manager.pool_op_kernel_sizes[1]
    pooled = tuple(p // min(2, k) for p, k in zip(trainer.configuration_manager.patch_size, first_pool))
    assert pooled == (8, 8, 8) and seen == [pooled] * 4  # generator pass and D's update, SDM and image each
    assert np.isfinite(out["disc_loss"]) and np.isfinite(out["unlabeled_loss"])
    assert any(not torch.equal(before[k], v) for k, v in d.state_dict().items())
    full = make_trainer()
    full.on_train_start()
    assert d.state_dict().keys() == unwrap_module(full.discriminator).state_dict().keys()


@pytest.mark.parametrize("name", ["nnUNetTrainerSASSNet_smoke", "nnUNetTrainerSDM"])
def test_a_kill_inside_a_checkpoint_write_leaves_the_old_checkpoint(nnunet_paths, name, tmp_path):
    """The process is SIGKILLed after torch.save has written half of the new checkpoint (this package's trainers
    write their own dictionary; nnUNetTrainerSDM nnU-Net's): the file keeps the old checkpoint, whole."""
    import os
    import signal

    trainer = make_trainer(name)
    trainer.on_train_start()
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    old = open(path, "rb").read()
    trainer.current_epoch = 7
    pid = os.fork()
    if pid == 0:  # the child: torch.save writes half of the checkpoint, then the process is killed
        try:
            real_save = torch.save

            def save_and_die(value, target, *args, **kwargs):
                real_save(value, target, *args, **kwargs)
                size = os.path.getsize(target)
                os.truncate(target, size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = save_and_die
            trainer.save_checkpoint(path)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert open(path, "rb").read() == old
    assert torch.load(path, map_location="cpu", weights_only=False)["current_epoch"] == 1  # epoch 0, saved as 1
