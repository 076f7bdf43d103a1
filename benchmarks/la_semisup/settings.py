"""The benchmark's settings: profiles (GPU and CPU smoke), the runs, the command line and its checks."""
from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnunet_sassnet.errors import UserInputError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "la2018_uamt_lite_1.25mm"
CONFIGURATION = "3d_fullres"
BASELINE = "nnUNetTrainer"
DEFAULT_RUNS = ("nnUNetTrainer", "nnUNetTrainerSDM", "nnUNetTrainerSASSNet", "nnUNetTrainer:all")
SMALL_PLANS = "nnUNetPlansSmall"
SMOKE_PATCH = (32, 32, 32)
SMOKE_FEATURES = (8, 16, 32)
WORKDIR_MARKER = ".la_semisup_workdir"  # a work folder this benchmark made: it may reuse and replace what is in it
KINDS = ("train", "self_training")

#: Trainings at once on the GPU machine (16 CPU cores; the augmentation workers are the bottleneck). Source:
#: 4 runs at once on an NVIDIA H200, 3,000 steps each, 3-4 data workers per run (../shared/GPU_MACHINE.md,
#: 2026-11-26, docs/gpu_runs/2026-11-26_H200_la_semisup_seed0.json): 216-308 s per training. Not yet compared
#: with other concurrencies; --concurrency overrides it.
GPU_CONCURRENCY = 4

# settings that differ between the GPU benchmark and the CPU smoke run; a value given on the command line wins
PROFILES: dict[str, dict[str, Any]] = {
    # min_start_s: a training is started only while at least this much of --time-limit is left (a 3,000-step
    # training at 4 at once took 216-308 s on the H200, plus ~35 s of prediction); self-training needs twice
    "gpu": dict(num_labeled=8, num_unlabeled=52, num_eval=20, steps=4500, iterations_per_epoch=250,
                val_iterations=5, workers_per_run=3, workers_semi=4, concurrency=GPU_CONCURRENCY, device="cuda",
                tta="on", step_size=0.5, min_start_s=300.0),
    # step_size: nnU-Net's sliding-window overlap (its default 0.5); the smoke run's 1.0 predicts a full-size
    # scan with 8 times fewer windows of its tiny patch
    "cpu_smoke": dict(num_labeled=2, num_unlabeled=2, num_eval=2, steps=4, iterations_per_epoch=2,
                      val_iterations=1, workers_per_run=0, workers_semi=0, concurrency=2, device="cpu",
                      tta="off", step_size=1.0, min_start_s=0.0),
}

# safety caps per step (seconds); --time-limit bounds the whole benchmark on top of them
CAP_PLAN = 1800
CAP_TRAIN = 6 * 3600
CAP_PREDICT = 1800


@dataclass
class RunSpec:
    """One run of the benchmark: a trainer, a dataset ('semi' or 'all'), a seed, and how it is trained.

    ``kind`` "self_training": the trainer on the labeled scans, its predictions of the unlabeled scans as
    labels, the trainer again on both (two trainings), scored like every other run. ``num_labeled``: a smaller
    label budget than the protocol's (the first N of its labeled scans, the same unlabeled and evaluation scans:
    a semi-supervised dataset of its own); None: the protocol's.
    """

    trainer: str
    seed: int
    data: str = "semi"
    kind: str = "train"
    compile: bool = False
    num_labeled: int | None = None
    semi_supervised: bool = False  # reads the unlabeled scans (a subclass of nnUNetTrainerSASSNet)
    settings: dict[str, Any] = field(default_factory=dict)  # the trainer class's settings (class attributes)
    base_import: tuple[str, str, str] = ("", "", "")  # (module, class name, file) of the trainer class

    @property
    def key(self) -> str:
        prefix = "selftrain:" if self.kind == "self_training" else ""
        budget = f"@{self.num_labeled}labeled" if self.num_labeled is not None else ""
        return (f"{prefix}{self.trainer}{':all' if self.data == 'all' else ''}{'+compile' if self.compile else ''}"
                f"{budget}/s{self.seed}")

    @property
    def learns_unlabeled(self) -> bool:
        """Whether the run reads the unlabeled scans (a semi-supervised trainer, or self-training)."""
        return self.semi_supervised or self.kind == "self_training"

    @property
    def semi_dataset(self) -> str:
        """The key of the semi-supervised dataset of the run's label budget (its evaluation scans live there)."""
        return semi_dataset_key(self.num_labeled)

    @property
    def dataset(self) -> str:
        """The key of the dataset the run trains on: its budget's semi-supervised one, or 'all'."""
        return "all" if self.data == "all" else self.semi_dataset

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "-", self.key)

    @property
    def bench_trainer(self) -> str:
        from benchmarks.la_semisup.nnunet_trainers.la_semisup_trainers import SUFFIX
        return self.trainer + SUFFIX

    @property
    def title(self) -> str:
        title = self.trainer
        if self.kind == "self_training":
            title = f"{title} self-training (labeled, then labeled + pseudo-labeled)"
        if self.data == "all":
            title += " (all labeled)"
        if self.compile:
            title += " (torch.compile)"
        return title


def semi_dataset_key(num_labeled: int | None) -> str:
    """'semi' for the protocol's label budget, 'semi<N>' for a budget of N labeled scans."""
    return "semi" if num_labeled is None else f"semi{num_labeled}"


def budget_dataset_id(semi_id: int, num_labeled: int) -> int:
    """nnU-Net dataset ID of a smaller label budget's semi-supervised dataset: SEMI + 10 + N (915 for 4)."""
    return semi_id + 10 + num_labeled


def unlabeled_key(dataset_key: str) -> str:
    """The readiness key of a semi-supervised dataset's preprocessed unlabeled scans."""
    return "unlabeled" + dataset_key[len("semi"):]


def parse_run(text: str, seed: int) -> RunSpec:
    """``TRAINER`` (semi-supervised dataset) or ``TRAINER:all`` (every non-evaluation scan labeled)."""
    trainer, _, data = text.partition(":")
    data = data or "semi"
    check_trainer_name(trainer, f"--trainers {text!r}")
    if data not in ("semi", "all"):
        raise UserInputError(f"--trainers {text!r}: expected TRAINER or TRAINER:all, e.g. nnUNetTrainerSASSNet "
                             f"or nnUNetTrainer:all")
    return RunSpec(trainer=trainer, seed=seed, data=data)


def check_trainer_name(trainer: str, where: str) -> None:
    """A trainer name nnU-Net can use in its result folders (TRAINER__PLANS__CONFIG)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", trainer):
        raise UserInputError(f"{where}: {trainer!r} is not a trainer class name, e.g. nnUNetTrainerSASSNet")
    if "__" in trainer:
        raise UserInputError(f"{where}: nnU-Net's result folders are named TRAINER__PLANS__CONFIG, so trainer "
                             f"names cannot contain '__'")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.la_semisup",
        description="Train trainers with the same steps and seed on LA 2018 (1.25 mm) with few labels, predict "
                    "and score the evaluation scans, print and write one table; with --queue, the runs of a "
                    "queue file not yet in the ledger. Defaults in brackets (GPU benchmark; --cpu-smoke).")
    g = p.add_argument_group("data and split")
    g.add_argument("--data", default=str(DEFAULT_DATA),
                   help="folder with <ID>/mri_norm2.h5 at any depth (UA-MT layout) and train.list (else UA-MT's "
                        "list is used) [../shared/data/la2018_uamt_lite_1.25mm beside the repository]")
    g.add_argument("--spacing", type=float, default=1.25, help="isotropic spacing of the h5 scans in mm [1.25]")
    g.add_argument("--split", default=None,
                   help="JSON {\"labeled\": [...], \"unlabeled\": [...], \"test\": [...]} (test = evaluation scans); "
                        "default: from train.list order with --num-labeled/--num-unlabeled/--num-eval")
    g.add_argument("--num-labeled", type=int, default=None, help="first N of train.list labeled [8; smoke 2]")
    g.add_argument("--num-unlabeled", type=int, default=None, help="next N unlabeled [52; smoke 2]")
    g.add_argument("--num-eval", type=int, default=None, help="last N of train.list for evaluation [20; smoke 2]")
    g.add_argument("--dataset-ids", type=int, nargs=2, default=(901, 902), metavar=("SEMI", "ALL"),
                   help="nnU-Net dataset IDs of the semi-supervised and the all-labeled dataset [901 902]")
    g = p.add_argument_group("runs")
    g.add_argument("--trainers", nargs="+", default=None, metavar="RUN",
                   help="runs: TRAINER (semi-supervised dataset) or TRAINER:all (all non-evaluation scans "
                        "labeled); any trainer nnU-Net finds (also in $nnUNet_extTrainer); nnUNetTrainer is the "
                        "baseline of the paired comparison [" + " ".join(DEFAULT_RUNS) + "]")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every trainer with each [0]")
    g.add_argument("--queue", default=None,
                   help="queue file (JSON: protocol and runs in order, e.g. benchmarks/queue_la8.json) instead of "
                        "--trainers/--seeds; runs already done in --ledger are not trained again")
    g.add_argument("--kind", choices=KINDS, default=None,
                   help="with --queue: only its runs of this kind; the others stay queued for another call (a "
                        "self-training call wants fewer trainings at once and more workers each) [all kinds]")
    g.add_argument("--ledger", default=None,
                   help="JSON-lines ledger: every finished run is appended the moment it ends, and its done runs "
                        "(same protocol) are not trained again [none; docs/semisup_ledger.jsonl with --queue]")
    g.add_argument("--results-doc", default=None,
                   help="Markdown file whose ledger tables are regenerated after every run [none; "
                        "docs/semisup_results.md with --queue]")
    g.add_argument("--prepare-only", action="store_true",
                   help="convert, plan and preprocess into --workdir and stop (the folder can be carried to a "
                        "GPU machine and given there as --workdir)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="training steps of every run [4500; smoke 4]")
    g.add_argument("--iterations-per-epoch", type=int, default=None,
                   help="steps per nnU-Net epoch; --steps must be a multiple [250; smoke 2]")
    g.add_argument("--val-iterations", type=int, default=None,
                   help="nnU-Net's validation steps per epoch (logging only; scoring uses the evaluation scans) "
                        "[5; smoke 1]")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None, help="[cuda; smoke cpu]")
    g.add_argument("--concurrency", type=int, default=None,
                   help=f"trainings at the same time [{GPU_CONCURRENCY}, measured on an H200 (see settings.py); "
                        f"smoke 2]")
    g.add_argument("--workers-per-run", type=int, default=None,
                   help="nnUNet_n_proc_DA of each training (0: augmentation in the training process); also the "
                        "predictor's -npp/-nps (0 and 0: nnU-Net's sequential predictor) [3; smoke 0]")
    g.add_argument("--workers-semi", type=int, default=None,
                   help="nnUNet_n_proc_DA of semi-supervised trainings, whose unlabeled loader gets half of it "
                        "[4; smoke 0]")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile for every run (a queue names it per run; costs about a minute per process)")
    g.add_argument("--tta", choices=("on", "off"), default=None,
                   help="nnU-Net's test-time mirroring when predicting (8 passes per window) [on; smoke off]")
    g.add_argument("--plan-processes", type=int, default=None, help="processes for planning and preprocessing "
                   "[CPU count; smoke 1]")
    g = p.add_argument_group("run")
    g.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes for a CPU smoke test: 2+2+2 scans, small derived plans, 4 steps, no "
                        "test-time mirroring")
    g.add_argument("--workdir", default=None, help="new or empty folder for everything this writes, or one that "
                   "an earlier benchmark made (its prepared datasets are reused where split and plans match) "
                   "[a fresh folder in the system's temporary folder]")
    g.add_argument("--output", default=None, help="results JSON of this call (a Markdown table is written beside "
                   "it) [WORKDIR/runs/<time>/la_semisup.json]")
    g.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds for the whole call; steps still running then are stopped and recorded as timed "
                        "out, and no training starts with less than its expected time left [0: no limit]")
    g.add_argument("--min-start", type=float, default=None,
                   help="seconds of --time-limit that must be left to start a training (twice that for "
                        "self-training) [300; smoke 0]")
    g.add_argument("--commit", default=None,
                   help="commit to record where this copy has no git history (the GPU machine) [git, or the one "
                        "that --prepare-only recorded in the work folder]")
    return p


@dataclass
class Settings:
    """The resolved command line (the protocol values come from the queue file where it sets them)."""

    data: Path
    spacing: float
    split_file: str | None
    num_labeled: int
    num_unlabeled: int
    num_eval: int
    dataset_ids: tuple[int, int]
    runs: list[RunSpec]
    steps: int
    iterations_per_epoch: int
    val_iterations: int
    device: str
    concurrency: int
    workers_per_run: int
    workers_semi: int
    tta: bool
    step_size: float
    plan_processes: int
    cpu_smoke: bool
    workdir: Path
    run_dir: Path
    output: Path
    time_limit: float
    min_start: float
    prepare_only: bool = False
    queue_file: Path | None = None
    ledger: Path | None = None
    results_doc: Path | None = None
    commit: str | None = None
    argv: list[str] = field(default_factory=list)
    seed_rules: list[Any] = field(default_factory=list)  # the queue's {"seed_of_positive": N} items (queue.SeedRule)
    only_kind: str | None = None  # --kind: the queue's runs of this kind only

    @property
    def epochs(self) -> int:
        return self.steps // self.iterations_per_epoch

    def budget_dataset_id(self, num_labeled: int) -> int:
        return budget_dataset_id(self.dataset_ids[0], num_labeled)

    @property
    def plans(self) -> str:
        return SMALL_PLANS if self.cpu_smoke else "nnUNetPlans"


def resolve_settings(args: argparse.Namespace, argv: list[str], protocol: dict[str, Any] | None = None,
                     queue_runs: list[RunSpec] | None = None, seed_rules: list[Any] | None = None) -> Settings:
    """Fill the defaults (profile, then the queue's protocol, then the command line) and check them."""
    profile = dict(PROFILES["cpu_smoke" if args.cpu_smoke else "gpu"])
    profile.update(protocol or {})
    value = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in profile.items()}
    if args.min_start is not None:
        value["min_start_s"] = args.min_start
    for name in ("num_labeled", "steps", "iterations_per_epoch", "concurrency"):
        if value[name] < 1:
            raise UserInputError(f"--{name.replace('_', '-')} {value[name]}: must be at least 1")
    for name in ("num_unlabeled", "num_eval", "val_iterations", "workers_per_run", "workers_semi", "min_start_s"):
        if value[name] < 0:
            raise UserInputError(f"--{name.replace('_s', '').replace('_', '-')} {value[name]}: must not be negative")
    if value["steps"] % value["iterations_per_epoch"]:
        raise UserInputError(f"--steps {value['steps']} is not a multiple of --iterations-per-epoch "
                             f"{value['iterations_per_epoch']}; nnU-Net trains whole epochs")
    if not math.isfinite(args.spacing) or args.spacing <= 0:
        raise UserInputError(f"--spacing {args.spacing}: must be a positive number of millimetres")
    if args.time_limit < 0:
        raise UserInputError(f"--time-limit {args.time_limit}: must be >= 0 (0: no limit)")
    semi_id, all_id = args.dataset_ids
    if semi_id == all_id or not all(1 <= i <= 999 for i in (semi_id, all_id)):
        raise UserInputError(f"--dataset-ids {semi_id} {all_id}: two different IDs from 1 to 999")
    seed_rules = seed_rules or []
    if queue_runs is not None:
        kept = [args.kind is None or r.kind == args.kind for r in queue_runs]
        runs = [r for r, keep in zip(queue_runs, kept) if keep]
        if not runs and not seed_rules:
            raise UserInputError(f"--kind {args.kind}: the queue has no run of this kind")
        for rule in seed_rules:  # a rule's place among the runs that are kept
            rule.position = sum(kept[:rule.position])
            if rule.num_labeled == value["num_labeled"]:
                rule.num_labeled = None
        _check_budgets(runs, value["num_labeled"], (semi_id, all_id))
    else:
        runs = [parse_run(t, seed) for seed in args.seeds for t in (args.trainers or DEFAULT_RUNS)]
        for run in runs:
            run.compile = args.compile
    keys = [r.key for r in runs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise UserInputError(f"the runs name {', '.join(duplicates)} twice; list each run once")
    data = Path(args.data).expanduser().resolve()
    # with a split file, a work folder prepared elsewhere (--prepare-only, carried) trains without the scans
    if not data.is_dir() and args.split is None:
        raise UserInputError(f"--data {data}: folder not found; pass the folder of the LA lite scans "
                             f"(<ID>/mri_norm2.h5), e.g. ../shared/data/la2018_uamt_lite_1.25mm")
    plan_processes = args.plan_processes if args.plan_processes is not None else (
        1 if args.cpu_smoke else max(1, os.cpu_count() or 1))
    if plan_processes < 1:
        raise UserInputError(f"--plan-processes {plan_processes}: must be at least 1")
    if args.output and Path(args.output).suffix.lower() != ".json":
        raise UserInputError(f"--output {args.output}: name a .json file (the Markdown table goes beside it as .md)")
    # the work folder last: nothing is created for a command line that is refused
    workdir = _work_folder(args.workdir)
    stem = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = workdir / "runs" / stem, 1
    while run_dir.exists():
        n += 1
        run_dir = workdir / "runs" / f"{stem}_{n}"
    run_dir.mkdir(parents=True)
    output = Path(args.output).expanduser().resolve() if args.output else run_dir / "la_semisup.json"
    optional = {name: Path(getattr(args, name)).expanduser().resolve() if getattr(args, name) else None
                for name in ("ledger", "results_doc")}
    return Settings(
        data=data, spacing=args.spacing, split_file=args.split, num_labeled=value["num_labeled"],
        num_unlabeled=value["num_unlabeled"], num_eval=value["num_eval"], dataset_ids=(semi_id, all_id),
        runs=runs, steps=value["steps"], iterations_per_epoch=value["iterations_per_epoch"],
        val_iterations=value["val_iterations"], device=value["device"], concurrency=value["concurrency"],
        workers_per_run=value["workers_per_run"], workers_semi=value["workers_semi"], tta=value["tta"] == "on",
        step_size=value["step_size"], plan_processes=plan_processes, cpu_smoke=args.cpu_smoke, workdir=workdir,
        run_dir=run_dir, output=output, time_limit=args.time_limit, min_start=value["min_start_s"],
        prepare_only=args.prepare_only, queue_file=Path(args.queue).resolve() if args.queue else None,
        commit=args.commit, argv=argv, seed_rules=list(seed_rules), only_kind=args.kind, **optional)


def _check_budgets(runs: list[RunSpec], protocol_labeled: int, dataset_ids: tuple[int, int]) -> None:
    """Runs with a smaller label budget: the protocol's own budget stated again means the protocol's dataset."""
    for run in runs:
        if run.num_labeled == protocol_labeled:
            run.num_labeled = None
        if run.num_labeled is None:
            continue
        if run.num_labeled > protocol_labeled:
            raise UserInputError(f"run {run.key}: num_labeled {run.num_labeled} is more than the protocol's "
                                 f"{protocol_labeled} labeled scans; a budget takes the first N of them")
        budget_id = budget_dataset_id(dataset_ids[0], run.num_labeled)
        if budget_id > 999 or budget_id in dataset_ids:
            raise UserInputError(f"run {run.key}: its dataset ID would be {budget_id} (SEMI + 10 + "
                                 f"{run.num_labeled}); choose other --dataset-ids")


def _work_folder(requested: str | None) -> Path:
    """The work folder: new, empty, or made by an earlier benchmark (marked)."""
    if requested is None:
        workdir = Path(tempfile.mkdtemp(prefix="la_semisup_"))
    else:
        workdir = Path(requested).expanduser().resolve()
        if workdir.exists() and (not workdir.is_dir() or (any(workdir.iterdir())
                                                          and not (workdir / WORKDIR_MARKER).is_file())):
            raise UserInputError(f"--workdir {workdir}: exists, is not empty and was not made by this benchmark; "
                                 f"choose a new or empty folder (the benchmark writes nnU-Net's datasets there)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).write_text("made by python -m benchmarks.la_semisup: its prepared datasets are reused "
                                          "and replaced by later benchmarks in this folder\n")
    return workdir
