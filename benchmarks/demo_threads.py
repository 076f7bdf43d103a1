"""How much one competing busy process slows the demo's training steps, with one and with two torch threads.

    python benchmarks/demo_threads.py [--workdir DIR] [--rounds N] [--steps N] [--passive]

Prepares the demo's data once (stages 1-5 of ``nnunet_sassnet_demo``, or reuses ``--workdir`` from an earlier
demo). Then one process does what ``nnUNetv2_train ... -device cpu`` does before training (nnU-Net's
``torch.set_num_threads(cpu_count)``, then the demo's trainer in the demo's training environment, augmentation
in the process) and times real training steps (``train_step`` on the loader's next batch) in blocks of
``--steps``, cycling through four conditions: two torch threads (nnU-Net's choice on two cores) or one, each
alone and beside one competing process that keeps one core busy (``python -c "while True: pass"``, started
and stopped by this script). The blocks of all conditions alternate ``--rounds`` times, so that a drift in the
machine's other load hits every condition alike; the first block (one-off allocations) is left out.
``--passive`` runs the same in a second process with ``OMP_WAIT_POLICY=PASSIVE`` (waiting OpenMP threads sleep
instead of spinning).

Prints one JSON line per block and a summary: per condition the median step time, and the ratios busy/alone
and to two threads alone. On a machine shared with other work the absolute times are noisy (the load average
is recorded); read the ratios.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONDITIONS = [(threads, busy) for threads in (2, 1) for busy in (False, True)]


def prepare(workdir: Path, seed: int) -> None:
    """Stages 1-5 of the demo into ``workdir`` unless an earlier demo left its preprocessed data there."""
    from nnunet_sassnet.demo import config, pipeline

    layout = pipeline.Layout(workdir)
    unlabeled = layout.preprocessed_dataset / f"{config.PLANS}_{config.CONFIGURATION}_unlabeled"
    if unlabeled.is_dir():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    pipeline.generate_data(layout, seed, config.DATA)
    pipeline.convert(layout)
    pipeline.plan(layout)
    pipeline.preprocess(layout)
    pipeline.preprocess_unlabeled(layout)


def time_blocks(rounds: int, steps: int) -> None:
    """(In the worker process.) Time blocks of training steps per condition; print one JSON line per block."""
    import multiprocessing

    import torch

    torch.set_num_threads(multiprocessing.cpu_count())  # what nnUNetv2_train -device cpu does first
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_sassnet.demo import config
    from nnunet_sassnet.demo.trainers import ThreadTrials

    trainer = get_trainer_from_args(str(config.DATASET_ID), config.CONFIGURATION, int(config.FOLD), config.TRAINER,
                                    config.PLANS, device=torch.device("cpu"))
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    blocks = [(-1, CONDITIONS[0])] + list(itertools.product(range(rounds), CONDITIONS))  # -1: warm-up block
    for round_index, (threads, busy) in blocks:
        torch.set_num_threads(threads)
        # a fixed count: the demo's trainer would otherwise choose one itself (ThreadTrials)
        trainer.thread_trials = ThreadTrials([threads], trials_per_choice=1, first_trial_step=0)
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        load = os.getloadavg()[0]
        times = []
        try:
            if spinner is not None:
                time.sleep(0.5)  # the spinner is running before the first timed step
            for _ in range(steps):
                start = time.perf_counter()
                trainer.train_step(next(trainer.dataloader_train))
                times.append(time.perf_counter() - start)
        finally:
            if spinner is not None:
                spinner.terminate()
                spinner.wait()
        print(json.dumps({"round": round_index, "torch_threads": threads, "busy_process": busy,
                          "step_times_s": [round(t, 4) for t in times], "load_average_1min": round(load, 2)}),
              flush=True)
    os._exit(0)  # skip nnU-Net's end of training (final validation): this is not a training run


def run_worker(workdir: Path, env_changes: dict[str, str], rounds: int, steps: int) -> list[dict]:
    from nnunet_sassnet.demo import pipeline

    env = {**pipeline.nnunet_environment(pipeline.Layout(workdir), 0), **env_changes}
    command = [sys.executable, __file__, "--worker", "--rounds", str(rounds), "--steps", str(steps)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    blocks = []
    for line in process.stdout:
        if line.startswith("{"):
            block = json.loads(line)
            print(json.dumps({"env": env_changes, **block}), flush=True)
            if block["round"] >= 0:
                blocks.append(block)
    stderr = process.stderr.read()
    if process.wait() != 0 or len(blocks) != rounds * len(CONDITIONS):
        raise RuntimeError(f"worker failed ({process.returncode}):\n{stderr[-3000:]}")
    return blocks


def summarise(blocks: list[dict]) -> dict:
    def median(threads: int, busy: bool) -> float:
        return statistics.median(t for b in blocks if b["torch_threads"] == threads and b["busy_process"] == busy
                                 for t in b["step_times_s"])

    reference = median(2, False)
    result = {}
    for threads, busy in CONDITIONS:
        step = median(threads, busy)
        result[f"{threads}_threads_{'busy' if busy else 'alone'}"] = {
            "median_step_s": round(step, 3), "over_2_threads_alone": round(step / reference, 2),
            "busy_over_alone": round(step / median(threads, False), 2)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="a demo work folder to reuse or fill (default: a new temporary folder)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the four conditions (default: 3)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per block (default: 4)")
    parser.add_argument("--passive", action="store_true", help="also run with OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scans (default: 0)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        time_blocks(args.rounds, args.steps)
        return 0
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="nnunet_sassnet_demo_threads_")) / "demo").absolute()
    prepare(workdir, args.seed)

    summary = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(["python", "benchmarks/demo_threads.py", *sys.argv[1:]]),
               "cpus": os.cpu_count(), "machine": platform.machine()}
    for name, env_changes in [("default", {}), ("omp_passive", {"OMP_WAIT_POLICY": "PASSIVE"})][:2 if args.passive
                                                                                                  else 1]:
        blocks = run_worker(workdir, env_changes, args.rounds, args.steps)
        summary[name] = {"env": env_changes, **summarise(blocks),
                         "load_average_1min": [b["load_average_1min"] for b in blocks]}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
