"""Wall time of training iterations with nnU-Net's real loaders: what a user waits for, data loading included.

A SASSNet step draws twice as many patches through nnU-Net's CPU augmentation as nnUNetTrainer's (2 labeled
+ 2 unlabeled against 2), so at a given ``nnUNet_n_proc_DA`` the GPU may wait for batches. For each trainer
this times ``iterations`` steps exactly as nnU-Net's loop runs them (``train_step(next(dataloader_train))``)
and splits the wall time into waiting for batches (the GPU idles: each step ends with nnU-Net's loss copy to
the host, so the GPU has finished when the next batch is requested) and the steps themselves.

Where the GPU waits, :func:`augmentation_profile` says which part of nnU-Net's augmentation costs most: it
makes batches with nnU-Net's own data loader in this process and times its loading and cropping and each
transform of its pipeline (a transform applied with a probability counts as often as it was drawn).

Used by ``benchmarks/train_speed.py --epoch-iterations N``; the functions take a trainer factory so that both
trainers run in one process at the same worker count.
"""
from __future__ import annotations

import os
import time
from typing import Callable


class TimedLoader:
    """Forwards ``next()`` to nnU-Net's loader and adds up the seconds spent waiting for it."""

    def __init__(self, loader):
        self.loader = loader
        self.wait_s = 0.0

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.loader)
        self.wait_s += time.perf_counter() - t0
        return batch

    def __getattr__(self, name):  # _finish() and the rest of the augmenter's interface
        return getattr(self.loader, name)


def augmentation_processes(trainer) -> int:
    """Augmentation worker processes of the trainer's training loaders (0: augmentation in-process)."""
    # TimedLoader forwards attribute reads to the augmenter it wraps
    return sum(int(getattr(getattr(trainer, name, None), "num_processes", 0) or 0)
               for name in ("dataloader_train", "dataloader_unlabeled"))


def time_iterations(trainer, iterations: int, warmup: int, synchronize: Callable[[], None]) -> dict:
    """Seconds for ``iterations`` training iterations with the trainer's own loaders (after ``warmup``)."""
    loaders = []
    for name in ("dataloader_train", "dataloader_unlabeled"):
        if getattr(trainer, name, None) is not None:
            loaders.append(TimedLoader(getattr(trainer, name)))
            setattr(trainer, name, loaders[-1])
    for _ in range(warmup):
        trainer.train_step(next(trainer.dataloader_train))
    synchronize()
    for loader in loaders:
        loader.wait_s = 0.0
    t0 = time.perf_counter()
    for _ in range(iterations):
        trainer.train_step(next(trainer.dataloader_train))
    synchronize()
    wall = time.perf_counter() - t0
    wait = sum(loader.wait_s for loader in loaders)
    return {"iterations": iterations, "wall_s": wall, "loader_wait_s": wait, "idle_fraction": wait / wall,
            "augmentation_processes": augmentation_processes(trainer)}


def compare_epochs(make_trainer: Callable[[str], object], trainers: tuple[str, str], worker_counts: list[int | None],
                   iterations: int, warmup: int, synchronize: Callable[[], None],
                   stop: Callable[[object], None]) -> list[dict]:
    """Both trainers at each ``nnUNet_n_proc_DA`` (None: unset, nnU-Net's own default for the machine).

    Returns one record per worker count: the two trainers' figures and the wall-time ratio second/first.
    """
    records = []
    previous = os.environ.get("nnUNet_n_proc_DA")
    try:
        for workers in worker_counts:
            if workers is None:
                os.environ.pop("nnUNet_n_proc_DA", None)
            else:
                os.environ["nnUNet_n_proc_DA"] = str(workers)
            record = {"nnUNet_n_proc_DA": workers}
            for name in trainers:
                trainer = make_trainer(name)
                try:
                    record[name] = time_iterations(trainer, iterations, warmup, synchronize)
                finally:
                    stop(trainer)
                del trainer
            record["wall_ratio"] = record[trainers[1]]["wall_s"] / record[trainers[0]]["wall_s"]
            records.append(record)
    finally:
        if previous is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = previous
    return records


class TimedPart:
    """One transform of nnU-Net's augmentation pipeline, adding up the seconds spent in it."""

    def __init__(self, transform):
        self.transform = transform
        self.seconds = 0.0

    def __call__(self, **data_dict):
        t0 = time.perf_counter()
        result = self.transform(**data_dict)
        self.seconds += time.perf_counter() - t0
        return result


def part_name(transform) -> str:
    """A transform's class name; for one applied with a probability, the inner transform's with that probability."""
    inner = getattr(transform, "transform", None)
    if inner is not None and hasattr(transform, "apply_probability"):
        return f"{type(inner).__name__} (p {transform.apply_probability:g})"
    return type(transform).__name__


def augmentation_profile(data_loader, batches: int) -> dict:
    """Seconds per batch of each part of nnU-Net's training augmentation, made in this process by its data
    loader (``nnUNetDataLoader``, whose ``transforms`` is the composed pipeline): loading and cropping the
    patches, then each transform, costliest first."""
    compose = data_loader.transforms
    original = compose.transforms
    parts = [TimedPart(t) for t in original]
    compose.transforms = parts
    try:
        t0 = time.perf_counter()
        for _ in range(batches):
            data_loader.generate_train_batch()
        total = time.perf_counter() - t0
    finally:
        compose.transforms = original
    rows = [{"part": "loading and cropping (nnUNetDataLoader)", "s_per_batch": (total - sum(p.seconds for p in parts))
             / batches}] + [{"part": part_name(p.transform), "s_per_batch": p.seconds / batches} for p in parts]
    rows.sort(key=lambda row: -row["s_per_batch"])
    for row in rows:
        row["share"] = row["s_per_batch"] * batches / total
    return {"batches": batches, "batch_size": data_loader.batch_size, "s_per_batch": total / batches,
            "parts": rows, "costliest": rows[0]["part"]}


def workers_to_keep_up(record: dict, batch_s: float, streams: int) -> float:
    """Augmentation processes that would make batches as fast as the GPU steps: the seconds one process needs
    for a step's batches (``streams``: loaders per step) over the seconds of a step without waiting."""
    step_s = (record["wall_s"] - record["loader_wait_s"]) / record["iterations"]
    return batch_s * streams / step_s
