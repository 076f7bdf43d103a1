"""The trainer's DDP branch with two CPU (gloo) processes: real steps, a shared discriminator, one writer."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import SMALL_PLANS, training_environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, env: dict, out_dir: str, results, augment_on_device) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        from nnunetv2.run.run_training import get_trainer_from_args

        trainer = get_trainer_from_args("990", "3d_fullres", "all", "nnUNetTrainerSASSNet_smoke", SMALL_PLANS,
                                        device=torch.device("cpu"))
        trainer.discriminator_features = 16
        trainer.augment_on_device = augment_on_device
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        unlabeled_seen = []
        loader = trainer.dataloader_unlabeled

        class Recorder:
            def __next__(self):
                batch = next(loader)
                unlabeled_seen.append(batch["data"].clone())
                return batch

        trainer.dataloader_unlabeled = Recorder()
        for _ in range(2):
            out = trainer.train_step(next(trainer.dataloader_train))
        trainer.save_checkpoint(os.path.join(out_dir, f"checkpoint_rank{rank}.pth"))
        d_state = {k: v.clone() for k, v in trainer._plain_discriminator().state_dict().items()}
        results[rank] = {"d_state": d_state, "unlabeled": unlabeled_seen, "batch_size": trainer.batch_size,
                         "loss": float(out["loss"]), "is_ddp": trainer.is_ddp,
                         "d_wrapped": isinstance(trainer.discriminator, torch.nn.parallel.DistributedDataParallel)}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("augment_on_device", [None, True], ids=["workers", "on_device"])
def test_two_cpu_ranks_share_the_discriminator_and_only_rank0_writes(nnunet_paths, tmp_path, augment_on_device):
    env = {k: v for k, v in training_environment(nnunet_paths["env"]).items() if k.startswith("nnUNet")}
    env["OMP_NUM_THREADS"] = "1"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), env, str(tmp_path), results, augment_on_device), nprocs=2,
                 join=True)
        results = dict(results)
    r0, r1 = results[0], results[1]
    assert r0["is_ddp"] and r1["is_ddp"] and r0["d_wrapped"] and r1["d_wrapped"]
    assert r0["batch_size"] == r1["batch_size"] == 1  # nnU-Net's batch of 2 split over 2 ranks
    # the discriminator's weights stay identical across ranks (its gradients are all-reduced)
    assert all(torch.equal(r0["d_state"][k], r1["d_state"][k]) for k in r0["d_state"])
    # each rank draws its own unlabeled patches (and, on the device, its own augmentation)
    assert not any(torch.equal(a, b) for a, b in zip(r0["unlabeled"], r1["unlabeled"]))
    assert os.path.isfile(tmp_path / "checkpoint_rank0.pth")
    assert not os.path.exists(tmp_path / "checkpoint_rank1.pth")
