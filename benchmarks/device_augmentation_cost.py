"""CPU seconds the loader workers spend per training step: nnUNetTrainerSASSNet with ``augment_on_device``
against stock nnUNetTrainer, measured in one process on real LA scans (target: <= 0.25 x).

A stock step takes one batch through nnU-Net's loader and its per-sample augmentation; a SASSNet step with device
augmentation takes a labeled and an unlabeled batch through the same loaders with no transforms (load and crop
the enlarged patches only), and augments both on the training device. The three loaders are nnU-Net's own, built
by the trainers' ``get_dataloaders`` in this process (``nnUNet_n_proc_DA=0``), and are called in turn batch by
batch, so that a busy machine slows all of them alike. Worker CPU is the process CPU time of
``generate_train_batch`` with one thread (nnU-Net's workers run it under ``threadpool_limits(1)``).
Also recorded: the device augmentation's own cost per batch where the device is this CPU.

    python benchmarks/device_augmentation_cost.py --workdir /tmp/devaug --steps 40  # 0.625 mm plan, 12 scans
    python benchmarks/device_augmentation_cost.py --workdir /tmp/s --cpu-smoke     # tiny plans (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "la2018_uamt_h5"

from bench_common import (augmentation_processes, exit_without_native_teardown,  # the script's own folder
                          prepare_la_dataset)


def stock_and_sassnet_loaders(dataset_id: int, plans: str) -> tuple:
    """Stock nnUNetTrainer's loaders (with its augmentation) and SASSNet's with augment_on_device (load and crop
    only), built as the trainers build them; ``nnUNet_n_proc_DA`` decides in or beside this process."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    cpu = torch.device("cpu")
    stock = get_trainer_from_args(str(dataset_id), "3d_fullres", "all", "nnUNetTrainer", plans, device=cpu)
    stock.initialize()
    stock_loaders = stock.get_dataloaders()
    sass = get_trainer_from_args(str(dataset_id), "3d_fullres", "all", "nnUNetTrainerSASSNet", plans, device=cpu)
    sass.augment_on_device = True
    sass.initialize()
    return stock, stock_loaders, sass, sass.get_dataloaders()


def build_loaders(dataset_id: int, plans: str) -> dict:
    """The loaders nnU-Net's workers would run, in this process: stock nnUNetTrainer's training loader (with its
    augmentation), SASSNet's labeled and unlabeled loaders with augment_on_device (load and crop only); and
    SASSNet's device pipelines."""
    with augmentation_processes(0):  # nnU-Net's SingleThreadedAugmenter: its data loader in this process
        stock, (stock_loader, _), sass, (labeled, _) = stock_and_sassnet_loaders(dataset_id, plans)
    return {"stock": stock_loader.data_loader, "labeled": labeled.loader.data_loader,
            "unlabeled": sass.dataloader_unlabeled.loader.data_loader,
            "labeled_augmentation": labeled.augmentation,
            "unlabeled_augmentation": sass.dataloader_unlabeled.augmentation,
            "patch_size": [int(s) for s in stock.configuration_manager.patch_size],
            "batch_size": int(stock.batch_size), "unlabeled_batch_size": int(sass.dataloader_unlabeled.loader.data_loader.batch_size)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers_cpu(augmenter) -> float:
    return sum(process_cpu_seconds(p.pid) for p in augmenter._processes)


def wait_until_idle(augmenter, poll_s: float = 0.25, quiet_polls: int = 3, limit_s: float = 120.0) -> None:
    """Until the augmenter's workers stop using CPU (their queue is full again)."""
    last, quiet, t0 = workers_cpu(augmenter), 0, time.perf_counter()
    while quiet < quiet_polls and time.perf_counter() - t0 < limit_s:
        time.sleep(poll_s)
        now = workers_cpu(augmenter)
        quiet = quiet + 1 if now - last < 0.005 else 0
        last = now


def worker_process_cpu(dataset_id: int, plans: str, rounds: int) -> dict:
    """CPU seconds per batch of the real worker processes (nnUNet_n_proc_DA=1: one process per loader): each round
    takes one batch from each loader in turn and waits until its workers have refilled their queue, so the CPU
    they used between two idle moments is exactly one batch's (loading, augmentation, handing it over)."""
    trainers = []
    try:
        with augmentation_processes(1):
            _, (stock_loader, stock_val), sass, (labeled, sass_val) = stock_and_sassnet_loaders(dataset_id, plans)
        trainers = [stock_loader, stock_val, labeled.loader, sass_val, sass.dataloader_unlabeled.loader]
        augmenters = {"stock": stock_loader, "labeled": labeled.loader, "unlabeled": sass.dataloader_unlabeled.loader}
        for augmenter in (stock_val, sass_val):
            wait_until_idle(augmenter)
        seconds = {name: [] for name in augmenters}
        for _ in range(rounds):
            for name, augmenter in augmenters.items():
                wait_until_idle(augmenter)
                before = workers_cpu(augmenter)
                next(augmenter)
                wait_until_idle(augmenter)
                seconds[name].append(workers_cpu(augmenter) - before)
    finally:
        for augmenter in trainers:
            augmenter._finish()
    stock_step = statistics.mean(seconds["stock"])
    sass_step = statistics.mean(seconds["labeled"]) + statistics.mean(seconds["unlabeled"])
    return {"rounds": rounds, "worker_cpu_s_per_step": {
        "nnUNetTrainer": stock_step, "nnUNetTrainerSASSNet_augment_on_device": sass_step,
        "labeled_load_and_crop": statistics.mean(seconds["labeled"]),
        "unlabeled_load_and_crop": statistics.mean(seconds["unlabeled"])},
        "worker_cpu_s_per_batch_sd": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in seconds.items()},
        "worker_cpu_ratio": sass_step / stock_step}


def cpu_seconds(fn):
    """(result, process CPU seconds, wall seconds) of ``fn()``."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - c0, time.perf_counter() - w0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="UA-MT-layout LA scans (default: 0.625 mm h5)")
    parser.add_argument("--spacing", type=float, default=0.625)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--labeled", type=int, default=6)
    parser.add_argument("--unlabeled", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="training steps' batches per loader")
    parser.add_argument("--worker-rounds", type=int, default=30,
                        help="batches per loader measured in the real worker processes (0: skip)")
    parser.add_argument("--device-steps", type=int, default=6,
                        help="of these, the steps whose batches are also augmented here (the device-side cost)")
    parser.add_argument("--mark", type=float, default=0.25, help="pass mark of the worker CPU ratio")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny plans, two steps (CI)")
    parser.add_argument("--output", help="JSON file (default: <workdir>/device_augmentation_cost.json)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    env = prepare_la_dataset(workdir, Path(args.data), dataset_id=702, labeled=args.labeled,
                             unlabeled=args.unlabeled, test=0, spacing=args.spacing, small_plans=args.cpu_smoke,
                             processes=2)
    os.environ.update(env)
    os.environ["nnUNet_compile"] = "f"
    steps = 2 if args.cpu_smoke else args.steps

    import torch

    torch.set_num_threads(1)  # a worker's share: nnU-Net's workers augment under threadpool_limits(1)
    loaders = build_loaders(702, env["BENCH_PLANS"])
    for name in ("stock", "labeled", "unlabeled"):
        loaders[name].generate_train_batch()  # first reads (file cache, blosc2 set-up) untimed
    worker = {"stock": [], "labeled": [], "unlabeled": []}
    device_side = {"labeled": [], "unlabeled": []}
    for step in range(steps):
        for name in ("stock", "labeled", "unlabeled"):
            batch, cpu_s, _ = cpu_seconds(loaders[name].generate_train_batch)
            worker[name].append(cpu_s)
            if name != "stock" and step < args.device_steps:
                augmentation = loaders[f"{name}_augmentation"]
                seg = batch["target"] if isinstance(batch["target"], torch.Tensor) else None
                _, _, wall = cpu_seconds(lambda: augmentation(batch["data"], seg))
                device_side[name].append(wall)
    processes = worker_process_cpu(702, env["BENCH_PLANS"], 2 if args.cpu_smoke else args.worker_rounds) \
        if args.worker_rounds else None
    stock_step = statistics.mean(worker["stock"])
    sass_step = statistics.mean(worker["labeled"]) + statistics.mean(worker["unlabeled"])
    in_process_ratio = sass_step / stock_step
    # the target's figure: the real worker processes where measured, else the loaders in this process
    ratio = processes["worker_cpu_ratio"] if processes else in_process_ratio
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "device": "cpu",
        "machine": f"{os.cpu_count()}-core {platform.machine()} VM", "command": " ".join(
            [Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "commit": commit, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "spacing_mm": args.spacing, "scans": args.labeled + args.unlabeled, "plans": env["BENCH_PLANS"],
        "patch_size": loaders["patch_size"], "batch_size": loaders["batch_size"],
        "unlabeled_batch_size": loaders["unlabeled_batch_size"], "steps": steps,
        "worker_cpu_ratio": ratio, "mark": args.mark, "pass": ratio <= args.mark,
        "worker_processes": processes,
        "in_process": {"note": "the three loaders called in this process, in turn (the method of train_speed.py's "
                               "profile_augmentation); no hand-over of the batches to another process",
                       "worker_cpu_ratio": in_process_ratio},
        "in_process_cpu_s_per_step": {"nnUNetTrainer": stock_step, "nnUNetTrainerSASSNet_augment_on_device": sass_step,
                                  "labeled_load_and_crop": statistics.mean(worker["labeled"]),
                                  "unlabeled_load_and_crop": statistics.mean(worker["unlabeled"])},
        "in_process_cpu_s_per_batch_sd": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in worker.items()},
        "device_augmentation_s_per_batch_on_cpu": {k: statistics.median(v) for k, v in device_side.items()},
        "device_steps": min(steps, args.device_steps),
        "device_augmentation_note": "wall seconds of DeviceAugmentation per batch on this CPU with one torch "
                                    "thread (the work a GPU does inside the step)",
    }
    output = Path(args.output) if args.output else workdir / "device_augmentation_cost.json"
    output.write_text(json.dumps(results, indent=2))
    print(f"in this process, worker CPU per step: nnUNetTrainer {stock_step:.3f} s, SASSNet with augment_on_device "
          f"{sass_step:.3f} s (labeled + unlabeled load and crop), ratio {in_process_ratio:.3f}")
    if processes:
        figures = processes["worker_cpu_s_per_step"]
        print(f"worker processes, CPU per step: nnUNetTrainer {figures['nnUNetTrainer']:.3f} s, SASSNet with "
              f"augment_on_device {figures['nnUNetTrainerSASSNet_augment_on_device']:.3f} s")
    print(f"device augmentation on this CPU: {results['device_augmentation_s_per_batch_on_cpu']}")
    print(f"target worker CPU ratio: {ratio:.3f} (pass mark <= {args.mark}) {'PASS' if ratio <= args.mark else 'MISS'}")
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    exit_without_native_teardown(main())
