"""Speed and memory of nnUNetTrainerSASSNet against nnUNetTrainer, measured in one process on real LA scans.

Targets (issue "Speed"), each printed as one line with the measured ratio and the pass mark:

1. a SASSNet training step with 2 labeled + 2 unlabeled patches <= 1.15 x nnUNetTrainer's step with batch 4;
2. the SDM targets of the step's labeled patches <= 5 % of that step (exact, on the GPU);
3. one forward pass of the U-Net per step (counted with a forward hook);
4. peak GPU memory <= 1.2 x nnUNetTrainer with batch 4;
5. sliding-window inference with the SASSNet network <= 1.02 x nnU-Net's network of the same plan;
6. with ``--epoch-iterations N``: the wall time of N iterations with nnU-Net's real loaders, SASSNet (plan
   batch, labeled + unlabeled) vs nnUNetTrainer (plan batch), at each ``--epoch-workers`` value of
   ``nnUNet_n_proc_DA`` <= 1.25 x, with the share of it the GPU waited for batches (``epoch_timing.py``), and
   what each part of nnU-Net's augmentation costs per batch in one process (which part to blame where the GPU
   waits) and how many augmentation processes would keep up with each trainer's step;
plus the host-device synchronisations per step of each trainer (CUDA only);
0. with ``--device-augmentation-iterations N``, first: the wall time of N iterations with nnU-Net's real loaders,
   SASSNet with ``augment_on_device`` (nnU-Net's augmentation batched on the GPU, the workers load and crop)
   vs stock nnUNetTrainer (augmentation in its workers), at each ``--device-augmentation-workers`` value of
   ``nnUNet_n_proc_DA`` <= 1.0 x.

For 1-5 both trainers get the same pre-fetched, augmented batches (data loading is excluded: the workers run
in the background in real training), the same patch and the same plan; 6 puts the loading back. Absolute
times count only from a GPU.

    python benchmarks/train_speed.py --device cuda --workdir /tmp/speed          # GPU figures, 1.25 mm plan
    python benchmarks/train_speed.py --device cuda --workdir /tmp/full --spacing 0.625 \
        --data ../shared/data/la2018_uamt_h5 --step-mark 1.15 --epoch-iterations 250   # native 0.625 mm plan
    python benchmarks/train_speed.py --device cuda --workdir /tmp/full --spacing 0.625 \
        --data ../shared/data/la2018_uamt_h5 --device-augmentation-iterations 250 --device-augmentation-only
    python benchmarks/train_speed.py --device cpu --cpu-smoke --workdir /tmp/s   # CI smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "la2018_uamt_lite_1.25mm"

# the script's own folder (on sys.path when run as a script)
from bench_common import augmentation_processes, exit_without_native_teardown, prepare_la_dataset
from epoch_timing import augmentation_profile, compare_epochs, workers_to_keep_up


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def count_syncs(fn) -> int:
    """Host-device synchronisations inside ``fn`` (CUDA's sync debug mode warns on each)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


class Cycle:
    """Cycles through pre-fetched batches (moved to pinned memory like nnU-Net's loader does)."""

    def __init__(self, batches):
        self.batches = batches
        self.i = 0

    def __next__(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def _pin(batch, device):
    import torch

    if device.type != "cuda":
        return batch
    pin = (lambda t: t.pin_memory()) if torch.is_tensor(batch["data"]) else None
    return {"data": pin(batch["data"]),
            "target": [pin(t) for t in batch["target"]] if isinstance(batch["target"], list) else pin(batch["target"])}


#: a trainer name with this suffix is that trainer with ``augment_on_device = True``
ON_DEVICE = "+augment_on_device"


def build_trainer(trainer_name: str, dataset_id: int, plans: str, batch_size: int | None, device):
    """A started trainer (loaders running); ``batch_size`` None keeps the plan's; ``trainer_name`` may end in
    :data:`ON_DEVICE`."""
    from nnunetv2.run.run_training import get_trainer_from_args

    name, on_device = (trainer_name[:-len(ON_DEVICE)], True) if trainer_name.endswith(ON_DEVICE) \
        else (trainer_name, False)
    trainer = get_trainer_from_args(str(dataset_id), "3d_fullres", "all", name, plans, device=device)
    if on_device:
        trainer.augment_on_device = True
    if batch_size is not None:
        trainer.configuration_manager.configuration["batch_size"] = batch_size
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def stop_loaders(trainer) -> None:
    for name in ("dataloader_train", "dataloader_val", "dataloader_unlabeled"):
        loader = getattr(trainer, name, None)
        if hasattr(loader, "_finish"):
            loader._finish()


def time_steps(trainer, batches, warmup: int, steps: int, device) -> dict:
    """Seconds per train_step, peak memory, forward passes of the U-Net per step."""
    import torch

    for _ in range(warmup):
        trainer.train_step(next(batches))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(next(batches))
        synchronize(device)
        times.append(time.perf_counter() - t0)
    result = {"step_s_median": statistics.median(times), "step_s_mean": float(np.mean(times)),
              "forward_passes_per_step": count_unet_forwards(trainer, batches)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        result["syncs_per_step"] = count_syncs(lambda: trainer.train_step(next(batches)))
    return result


def count_unet_forwards(trainer, batches) -> int:
    """U-Net forward passes in one training step, counted on the uncompiled network.

    A hook on a submodule of a compiled network does not fire, so the step runs once on the plain module.
    """
    from nnunet_sassnet.networks import unwrap_module

    network = trainer.network
    plain = unwrap_module(network)
    calls = []
    hook = plain.encoder.register_forward_hook(lambda *args: calls.append(1))
    trainer.network = plain
    try:
        trainer.train_step(next(batches))
    finally:
        trainer.network = network
        hook.remove()
    return len(calls)


def time_sdm_targets(trainer, batch, reps: int, device) -> float:
    target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    target = target.to(device)
    for _ in range(3):
        trainer.sdm_targets(target)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        trainer.sdm_targets(target)
    synchronize(device)
    return (time.perf_counter() - t0) / reps


def time_inference(dataset_id: int, plans: str, device, runs: int, num_volumes: int, smoke: bool = False) -> dict:
    """Sliding-window prediction of preloaded volumes: SASSNet's network vs nnU-Net's, interleaved.

    ``smoke``: one patch of each volume and no mirroring (a 3D convolution is slow on a 2-core CPU).
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sassnet.trainers import nnUNetTrainerSASSNet

    name = maybe_convert_to_dataset_name(dataset_id)
    base = os.path.join(str(nnUNet_preprocessed), name)
    pm = PlansManager(os.path.join(base, plans + ".json"))
    cm = pm.get_configuration("3d_fullres")
    dataset_json = load_json(os.path.join(base, "dataset.json"))
    folder = os.path.join(base, cm.data_identifier)
    ds = infer_dataset_class(folder)(folder)
    volumes = [torch.from_numpy(np.asarray(ds.load_case(k)[0][:])) for k in ds.identifiers[:num_volumes]]
    if smoke:
        volumes = [v[(slice(None), *(slice(0, p) for p in cm.patch_size))].contiguous() for v in volumes]
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    predictors = {}
    for label, cls in (("nnUNetTrainer", nnUNetTrainer), ("nnUNetTrainerSASSNet", nnUNetTrainerSASSNet)):
        torch.manual_seed(0)
        net = cls.build_network_architecture(pm, cm, volumes[0].shape[0], n_out, enable_deep_supervision=False)
        p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not smoke,
                            perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                            allow_tqdm=False)
        p.manual_initialization(net.to(device), pm, cm, None, dataset_json, cls.__name__, (0, 1, 2))
        predictors[label] = p

    def run_all(p):
        t0 = time.perf_counter()
        for v in volumes:
            p.predict_sliding_window_return_logits(v)
        synchronize(device)
        return time.perf_counter() - t0

    for p in predictors.values():  # warm-up (cudnn autotuning)
        run_all(p)
    times = {k: [] for k in predictors}
    for _ in range(runs):
        for k, p in predictors.items():
            times[k].append(run_all(p))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"runs": runs, "volumes": len(volumes), "median_s": medians,
            "ratio": medians["nnUNetTrainerSASSNet"] / medians["nnUNetTrainer"]}


def profile_augmentation(dataset_id: int, plans: str, device, batches: int) -> dict:
    """:func:`epoch_timing.augmentation_profile` of nnUNetTrainer's training loader, built without worker
    processes (the pipeline is the same for SASSNet's labeled and unlabeled streams)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    with augmentation_processes(0):  # nnU-Net's SingleThreadedAugmenter: its data loader in this process
        trainer = get_trainer_from_args(str(dataset_id), "3d_fullres", "all", "nnUNetTrainer", plans, device=device)
        trainer.initialize()  # the batch size and foreground oversampling the loader takes
        augmenter, _ = trainer.get_dataloaders()
    return augmentation_profile(augmenter.data_loader, batches)


def step_target_lines(results: dict, step_mark: float, device) -> list[tuple[str, float, float]]:
    """Targets 1-5 as (label, value, pass mark) from the figures of one run."""
    base, ours = results["nnUNetTrainer_batch4"], results["nnUNetTrainerSASSNet_2plus2"]
    lines = [
        ("1 step 2L+2U vs nnUNetTrainer batch 4", ours["step_s_median"] / base["step_s_median"], step_mark),
        ("2 SDM targets share of the SASSNet step", results["sdm_targets_s"] / ours["step_s_median"], 0.05),
        ("3 U-Net forward passes per step", ours["forward_passes_per_step"], 1.0),
    ]
    if device.type == "cuda":
        lines.append(("4 peak GPU memory vs nnUNetTrainer batch 4",
                      ours["peak_memory_gib"] / base["peak_memory_gib"], 1.2))
    lines.append(("5 sliding-window inference vs nnU-Net's network", results["inference"]["ratio"], 1.02))
    for name, variant in results.get("variants", {}).items():
        lines.append((f"1 {name}: step 2L+2U vs nnUNetTrainer batch 4",
                      variant["step_s_median"] / base["step_s_median"], step_mark))
        if device.type == "cuda":
            lines.append((f"4 {name}: peak GPU memory vs nnUNetTrainer batch 4",
                          variant["peak_memory_gib"] / base["peak_memory_gib"], 1.2))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="UA-MT-layout LA scans (default: the 1.25 mm copy)")
    parser.add_argument("--spacing", type=float, default=1.25)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--labeled", type=int, default=6, help="labeled scans in the dataset")
    parser.add_argument("--unlabeled", type=int, default=6, help="unlabeled scans")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps (compilation, cudnn autotuning)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per trainer")
    parser.add_argument("--inference-runs", type=int, default=5)
    parser.add_argument("--step-mark", type=float, default=1.15,
                        help="pass mark of target 1 (the issue: 1.15 at the 0.625 mm plan, 1.3 at 1.25 mm)")
    parser.add_argument("--epoch-iterations", type=int, default=0,
                        help="target 6: iterations timed with the real loaders per trainer (0: skip)")
    parser.add_argument("--epoch-warmup", type=int, default=10)
    parser.add_argument("--epoch-workers", default="default,8",
                        help="nnUNet_n_proc_DA values for target 6, comma-separated ('default': unset, nnU-Net's "
                             "own choice for the machine)")
    parser.add_argument("--device-augmentation-iterations", type=int, default=0,
                        help="target 0, measured first: iterations timed with the real loaders, SASSNet with "
                             "augment_on_device vs nnUNetTrainer (0: skip)")
    parser.add_argument("--device-augmentation-workers", default="8",
                        help="nnUNet_n_proc_DA values for target 0, comma-separated ('default' as above)")
    parser.add_argument("--device-augmentation-only", action="store_true", help="target 0 alone")
    parser.add_argument("--epochs-only", action="store_true",
                        help="target 6 alone (a call that has targets 1-5 already, e.g. one cut short)")
    parser.add_argument("--variants", nargs="*", default=[], metavar="TRAINER",
                        help="SASSNet variants (e.g. nnUNetTrainerSASSNetHalfResD) timed on the same 2+2 batches "
                             "as nnUNetTrainerSASSNet; each gets its own target-1 line")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny plans and few steps (CI)")
    parser.add_argument("--output", help="JSON file for the figures (default: <workdir>/train_speed.json)")
    args = parser.parse_args(argv)
    if args.epochs_only and not (args.epoch_iterations or args.cpu_smoke):
        parser.error("--epochs-only measures target 6 alone: give --epoch-iterations N too")

    workdir = Path(args.workdir).resolve()
    env = prepare_la_dataset(workdir, Path(args.data), dataset_id=701, labeled=args.labeled,
                             unlabeled=args.unlabeled, test=0, spacing=args.spacing, small_plans=args.cpu_smoke)
    os.environ.update(env)
    if args.device == "cpu":
        # nnU-Net's trainers compile nothing on the CPU, but its predictor would (slowly): like with like
        os.environ["nnUNet_compile"] = "f"
    plans = env["BENCH_PLANS"]

    import torch

    device = torch.device(args.device)
    if args.cpu_smoke:
        args.warmup, args.steps, args.inference_runs = 1, 2, 1
        args.epoch_iterations, args.epoch_warmup, args.epoch_workers = 2, 1, "1"
    if args.cpu_smoke and args.device_augmentation_iterations:
        args.device_augmentation_iterations, args.device_augmentation_workers = 2, "1"

    def worker_counts(text: str) -> list[int | None]:
        return [None if w.strip() == "default" else int(w) for w in text.split(",")]

    epoch_workers = worker_counts(args.epoch_workers)
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "compile": os.environ.get("nnUNet_compile"), "steps": args.steps, "warmup": args.warmup,
               "variants": {}, "complete": False}
    output = Path(args.output) if args.output else workdir / "train_speed.json"

    def save() -> None:
        # after every stage: a run stopped by the machine's time limit keeps what it measured
        output.write_text(json.dumps(results, indent=2, default=float))

    sass_on_device = "nnUNetTrainerSASSNet" + ON_DEVICE
    if args.device_augmentation_iterations:
        # first: the figure the GPU call exists for, kept even if the rest is cut short
        results["device_augmentation_epochs"] = compare_epochs(
            lambda name: build_trainer(name, 701, plans, None, device), ("nnUNetTrainer", sass_on_device),
            worker_counts(args.device_augmentation_workers), args.device_augmentation_iterations,
            args.epoch_warmup, lambda: synchronize(device), stop_loaders)
        save()
    if not (args.epochs_only or args.device_augmentation_only):
        stock = build_trainer("nnUNetTrainer", 701, plans, 4, device)
        batches = [_pin(next(stock.dataloader_train), device) for _ in range(8)]
        results["patch_size"] = list(stock.configuration_manager.patch_size)
        stop_loaders(stock)
        results["nnUNetTrainer_batch4"] = time_steps(stock, Cycle(batches), args.warmup, args.steps, device)
        save()
        del stock
        torch.cuda.empty_cache() if device.type == "cuda" else None

        sass = build_trainer("nnUNetTrainerSASSNet", 701, plans, 2, device)
        labeled = [_pin(next(sass.dataloader_train), device) for _ in range(8)]
        unlabeled = [_pin(next(sass.dataloader_unlabeled), device) for _ in range(8)]
        stop_loaders(sass)
        sass.dataloader_unlabeled = Cycle(unlabeled)
        results["nnUNetTrainerSASSNet_2plus2"] = time_steps(sass, Cycle(labeled), args.warmup, args.steps, device)
        results["sdm_targets_s"] = time_sdm_targets(sass, labeled[0], 20 if not args.cpu_smoke else 2, device)
        save()
        step_ratio = (results["nnUNetTrainerSASSNet_2plus2"]["step_s_median"]
                      / results["nnUNetTrainer_batch4"]["step_s_median"])
        print(f"step ratio (target 1): {step_ratio:.3f}", flush=True)
        del sass
        for name in args.variants:
            variant = build_trainer(name, 701, plans, 2, device)
            stop_loaders(variant)
            variant.dataloader_unlabeled = Cycle(unlabeled)
            results["variants"][name] = time_steps(variant, Cycle(labeled), args.warmup, args.steps, device)
            save()
            del variant
            torch.cuda.empty_cache() if device.type == "cuda" else None
        results["inference"] = time_inference(701, plans, device, args.inference_runs,
                                              5 if not args.cpu_smoke else 1, smoke=args.cpu_smoke)
        save()
    if args.epoch_iterations and not args.device_augmentation_only:
        # the augmentation's parts first: seconds of CPU, kept even if the epochs are cut short
        profile = profile_augmentation(701, plans, device, 8 if not args.cpu_smoke else 1)
        results["augmentation"] = profile
        save()
        results["epochs"] = compare_epochs(
            lambda name: build_trainer(name, 701, plans, None, device), ("nnUNetTrainer", "nnUNetTrainerSASSNet"),
            epoch_workers, args.epoch_iterations, args.epoch_warmup, lambda: synchronize(device), stop_loaders)
        for record in results["epochs"]:  # SASSNet's step takes a labeled and an unlabeled batch
            for name, streams in (("nnUNetTrainer", 1), ("nnUNetTrainerSASSNet", 2)):
                record[name]["workers_to_keep_up"] = workers_to_keep_up(record[name], profile["s_per_batch"], streams)
        save()

    lines = []
    for record in results.get("device_augmentation_epochs", []):
        workers = record["nnUNet_n_proc_DA"]
        lines.append((f"0 wall time of {args.device_augmentation_iterations} iterations with loaders, SASSNet with "
                      f"augment_on_device vs nnUNetTrainer, nnUNet_n_proc_DA={'default' if workers is None else workers}",
                      record["wall_ratio"], 1.0))
    if not (args.epochs_only or args.device_augmentation_only):
        lines += step_target_lines(results, args.step_mark, device)
    for record in results.get("epochs", []):
        workers = record["nnUNet_n_proc_DA"]
        lines.append((f"6 wall time of {args.epoch_iterations} iterations with loaders, nnUNet_n_proc_DA="
                      f"{'default' if workers is None else workers}", record["wall_ratio"], 1.25))
    results["targets"] = {}
    print(f"\n{results['device']}, {results['date']}, torch {results['torch']}, nnUNet_compile="
          f"{results['compile']}, patch {results.get('patch_size', 'not recorded (--epochs-only)')}")
    for record in results.get("device_augmentation_epochs", []):
        for name in ("nnUNetTrainer", sass_on_device):
            r = record[name]
            workers = "default" if record["nnUNet_n_proc_DA"] is None else record["nnUNet_n_proc_DA"]
            print(f"epoch {name} nnUNet_n_proc_DA={workers}: {r['wall_s']:.1f} s for {r['iterations']} iterations, "
                  f"{r['augmentation_processes']} augmentation processes, waiting for batches "
                  f"{100 * r['idle_fraction']:.0f} %")
    if not (args.epochs_only or args.device_augmentation_only):
        base, ours = results["nnUNetTrainer_batch4"], results["nnUNetTrainerSASSNet_2plus2"]
        print(f"nnUNetTrainer batch 4: {base['step_s_median'] * 1000:.1f} ms/step; "
              f"SASSNet 2+2: {ours['step_s_median'] * 1000:.1f} ms/step; "
              f"SDM targets: {results['sdm_targets_s'] * 1000:.2f} ms")
        for name, variant in results["variants"].items():
            print(f"{name} 2+2: {variant['step_s_median'] * 1000:.1f} ms/step")
        if device.type == "cuda":
            print(f"synchronisations per step: nnUNetTrainer {base['syncs_per_step']}, "
                  f"SASSNet {ours['syncs_per_step']}")
    for record in results.get("epochs", []):
        for name in ("nnUNetTrainer", "nnUNetTrainerSASSNet"):
            r = record[name]
            workers = "default" if record["nnUNet_n_proc_DA"] is None else record["nnUNet_n_proc_DA"]
            print(f"epoch {name} nnUNet_n_proc_DA={workers}: {r['wall_s']:.1f} s for "
                  f"{r['iterations']} iterations, {r['augmentation_processes']} augmentation processes, GPU "
                  f"waiting for batches {100 * r['idle_fraction']:.0f} %, processes that would keep up "
                  f"{r['workers_to_keep_up']:.1f}")
    if "augmentation" in results:
        profile = results["augmentation"]
        print(f"augmentation of one batch ({profile['batch_size']} patches) in one process: "
              f"{profile['s_per_batch'] * 1000:.0f} ms; costliest part: {profile['costliest']}")
        for row in profile["parts"]:
            print(f"augmentation part {row['part']}: {row['s_per_batch'] * 1000:.1f} ms per batch "
                  f"({100 * row['share']:.0f} %)")
    for label, value, mark in lines:
        ok = value <= mark + 1e-9
        results["targets"][label] = {"value": value, "mark": mark, "pass": ok}
        print(f"target {label}: {value:.3f} (pass mark <= {mark}) {'PASS' if ok else 'MISS'}")
    results["complete"] = True
    save()
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    exit_without_native_teardown(main())
