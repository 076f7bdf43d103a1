"""Does SASSNet help nnU-Net? A same-steps, same-seed benchmark on the LA 2018 lite data (1.25 mm).

From UA-MT's LA scans at 1.25 mm (``../shared/data/la2018_uamt_lite_1.25mm``) this script

1. converts two nnU-Net datasets with the project's converter: the semi-supervised one (by default the
   first 8 scans of train.list labeled, the next 52 unlabeled, the last 20 as evaluation scans) and the
   all-labeled one (the 60 non-evaluation scans labeled: the ceiling);
2. plans and preprocesses both (3d_fullres, nnU-Net's own plans; ``--cpu-smoke``: small derived plans) and
   preprocesses the unlabeled scans;
3. trains every requested run with the same number of steps and the same seed, concurrently as separate
   processes on one device (by default ``nnUNetTrainer``, ``nnUNetTrainerSDM`` and ``nnUNetTrainerSASSNet`` on
   the semi-supervised dataset and ``nnUNetTrainer`` on the all-labeled one);
4. predicts the evaluation scans with nnU-Net's predictor (default test-time mirroring), scores them with
   :func:`nnunet_sassnet.evaluation.evaluate_folders`, and prints and writes (JSON + Markdown) one table with
   Dice %, Jaccard %, 95HD, ASD (mean +- std), the paired per-scan Dice difference of each run against
   ``nnUNetTrainer`` (mean, wins) and the wall time of every stage.

Each run goes through training, prediction and scoring on its own as soon as its data is ready, so a failed
or slow run delays or spoils nothing but itself; whatever finished is scored and written. Everything is
written under ``--workdir``: the converted and preprocessed datasets at its top (a later benchmark in the same
work folder with the same data, split and plans reuses them), each benchmark's models, predictions, logs and
results in its own ``runs/seed<S>_<time>/``. nnU-Net's tools run as ``python -c`` subprocesses of this
interpreter (they need not be on PATH), each with its own log file.

GPU, one seed (the target is at most 8 minutes on one H100/H200; ``--time-limit`` stops what is still running
and writes what finished)::

    python benchmarks/la_semisup.py --data DIR --seed 0 --workdir /tmp/la_semisup --output la_seed0.json \
        --time-limit 540

CPU smoke test (a handful of scans, tiny network, a few steps)::

    python benchmarks/la_semisup.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
# the benchmark measures this checkout's package, also where it is not installed (the GPU machine)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nnunet_sassnet.errors import UserInputError, run_cli  # noqa: E402

from bench_common import python_tool  # noqa: E402  (this script's folder is on sys.path)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "la2018_uamt_lite_1.25mm"
CONFIGURATION = "3d_fullres"
BASELINE = "nnUNetTrainer"
DEFAULT_RUNS = ("nnUNetTrainer", "nnUNetTrainerSDM", "nnUNetTrainerSASSNet", "nnUNetTrainer:all")
BENCH_SUFFIX = "_LAbench"
TRAINER_MODULE = "la_semisup_bench_trainers"
SMALL_PLANS = "nnUNetPlansSmall"
MAX_TMPDIR_LENGTH = 60  # + multiprocessing's socket names (~40 characters) < the 108 of a Unix socket path
WORKDIR_MARKER = ".la_semisup_workdir"  # a work folder this script made: it may reuse and replace what is in it
REPORTED_METRICS = ("dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm")

# settings that differ between the GPU benchmark and the CPU smoke run; a value given on the command line wins
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": dict(num_labeled=8, num_unlabeled=52, num_eval=20, steps=4500, iterations_per_epoch=250,
                val_iterations=5, workers_per_run=3, workers_semi=4, concurrency=None, device="cuda", tta="on"),
    "cpu_smoke": dict(num_labeled=2, num_unlabeled=2, num_eval=2, steps=4, iterations_per_epoch=2,
                      val_iterations=1, workers_per_run=0, workers_semi=0, concurrency=2, device="cpu",
                      tta="off"),
}
SMOKE_PATCH = (32, 32, 32)
SMOKE_FEATURES = (8, 16, 32)

# safety caps per step (seconds); --time-limit bounds the whole benchmark on top of them
CAP_PLAN = 1800
CAP_UNLABELED = 1800
CAP_TRAIN = 6 * 3600
CAP_PREDICT = 1800


# ------------------------------------------------------------------------------------------------ settings

@dataclass
class RunSpec:
    """One training run: a trainer on the semi-supervised dataset ('semi') or the all-labeled one ('all')."""

    key: str
    trainer: str
    data: str  # "semi" or "all"
    semi_supervised: bool = False  # reads the unlabeled scans (a subclass of nnUNetTrainerSASSNet)
    bench_trainer: str = ""
    base_import: tuple[str, str, str] = ("", "", "")  # (module, class name, file) of the trainer class

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "-", self.key)

    @property
    def title(self) -> str:
        return f"{self.trainer} (all labeled)" if self.data == "all" else self.trainer


@dataclass
class Split:
    """Case IDs of the semi-supervised dataset; the all-labeled one labels ``labeled + unlabeled``."""

    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    source: str

    @property
    def all_labeled(self) -> list[str]:
        return self.labeled + self.unlabeled


def parse_run_spec(text: str) -> RunSpec:
    """``TRAINER`` (semi-supervised dataset) or ``TRAINER:all`` (every non-evaluation scan labeled)."""
    trainer, _, data = text.partition(":")
    data = data or "semi"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", trainer) or data not in ("semi", "all"):
        raise UserInputError(f"--trainers {text!r}: expected TRAINER or TRAINER:all, e.g. nnUNetTrainerSASSNet "
                             f"or nnUNetTrainer:all")
    if "__" in trainer:
        raise UserInputError(f"--trainers {text!r}: nnU-Net's result folders are named TRAINER__PLANS__CONFIG, "
                             f"so trainer names cannot contain '__'")
    return RunSpec(key=trainer if data == "semi" else f"{trainer}:all", trainer=trainer, data=data)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="la_semisup.py",
        description="Train nnUNetTrainer, nnUNetTrainerSDM and nnUNetTrainerSASSNet with the same steps and seed "
                    "on LA 2018 (1.25 mm) with few labels, plus nnUNetTrainer with all labels as the ceiling; "
                    "predict and score the evaluation scans; print and write one table. Defaults in brackets "
                    "(GPU benchmark; --cpu-smoke).")
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
    g = p.add_argument_group("training")
    g.add_argument("--trainers", nargs="+", default=list(DEFAULT_RUNS), metavar="RUN",
                   help="runs: TRAINER (semi-supervised dataset) or TRAINER:all (all non-evaluation scans "
                        "labeled); any trainer nnU-Net finds (also in $nnUNet_extTrainer); nnUNetTrainer is the "
                        "baseline of the paired comparison [" + " ".join(DEFAULT_RUNS) + "]")
    g.add_argument("--steps", type=int, default=None, help="training steps of every run [4500; smoke 4]")
    g.add_argument("--iterations-per-epoch", type=int, default=None,
                   help="steps per nnU-Net epoch; --steps must be a multiple [250; smoke 2]")
    g.add_argument("--val-iterations", type=int, default=None,
                   help="nnU-Net's validation steps per epoch (logging only; scoring uses the evaluation scans) "
                        "[5; smoke 1]")
    g.add_argument("--seed", type=int, default=0, help="seed of every run [0]")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None, help="[cuda; smoke cpu]")
    g.add_argument("--concurrency", type=int, default=None,
                   help="trainings at the same time [all runs; smoke 2]")
    g.add_argument("--workers-per-run", type=int, default=None,
                   help="nnUNet_n_proc_DA of each training (0: augmentation in the training process); also the "
                        "predictor's -npp/-nps [3; smoke 0]")
    g.add_argument("--workers-semi", type=int, default=None,
                   help="nnUNet_n_proc_DA of semi-supervised trainings, whose unlabeled loader gets half of it "
                        "[4; smoke 0]")
    g.add_argument("--compile", choices=("f", "t"), default="f",
                   help="nnUNet_compile (torch.compile costs about a minute per process) [f]")
    g.add_argument("--tta", choices=("on", "off"), default=None,
                   help="nnU-Net's test-time mirroring when predicting (8 passes per window) [on; smoke off]")
    g.add_argument("--plan-processes", type=int, default=None, help="processes for planning and preprocessing "
                   "[CPU count; smoke 1]")
    g = p.add_argument_group("run")
    g.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes for a CPU smoke test: 2+2+2 scans, small derived plans, 4 steps, no "
                        "test-time mirroring")
    g.add_argument("--workdir", default=None, help="new or empty folder for everything this writes, or one that "
                   "an earlier benchmark made (its prepared datasets are reused where data, split and plans match) "
                   "[a fresh folder in the system's temporary folder]")
    g.add_argument("--output", default=None, help="results JSON (a Markdown table is written beside it) "
                   "[WORKDIR/runs/seed<S>_<time>/la_semisup.json]")
    g.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds for the whole benchmark; steps still running then are stopped and reported as "
                        "timed out [0: no limit]")
    return p


@dataclass
class Settings:
    """The resolved command line."""

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
    seed: int
    device: str
    concurrency: int
    workers_per_run: int
    workers_semi: int
    compile: str
    tta: bool
    plan_processes: int
    cpu_smoke: bool
    workdir: Path
    run_dir: Path
    output: Path
    time_limit: float
    argv: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return self.steps // self.iterations_per_epoch

    @property
    def plans(self) -> str:
        return SMALL_PLANS if self.cpu_smoke else "nnUNetPlans"


def resolve_settings(args: argparse.Namespace, argv: list[str]) -> Settings:
    """Fill the profile defaults and check the values a user can get wrong."""
    profile = PROFILES["cpu_smoke" if args.cpu_smoke else "gpu"]
    value = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in profile.items()}
    for name in ("num_labeled", "steps", "iterations_per_epoch"):
        if value[name] < 1:
            raise UserInputError(f"--{name.replace('_', '-')} {value[name]}: must be at least 1")
    for name in ("num_unlabeled", "num_eval", "val_iterations", "workers_per_run", "workers_semi"):
        if value[name] < 0:
            raise UserInputError(f"--{name.replace('_', '-')} {value[name]}: must not be negative")
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
    runs = [parse_run_spec(t) for t in args.trainers]
    keys = [r.key for r in runs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise UserInputError(f"--trainers names {', '.join(duplicates)} twice; list each run once")
    concurrency = value["concurrency"] if value["concurrency"] is not None else len(runs)
    if concurrency < 1:
        raise UserInputError(f"--concurrency {concurrency}: must be at least 1")
    data = Path(args.data).expanduser().resolve()
    if not data.is_dir():
        raise UserInputError(f"--data {data}: folder not found; pass the folder of the LA lite scans "
                             f"(<ID>/mri_norm2.h5), e.g. ../shared/data/la2018_uamt_lite_1.25mm")
    plan_processes = args.plan_processes if args.plan_processes is not None else (
        1 if args.cpu_smoke else max(1, os.cpu_count() or 1))
    if plan_processes < 1:
        raise UserInputError(f"--plan-processes {plan_processes}: must be at least 1")
    # the work folder last: nothing is created for a command line that is refused
    if args.output and Path(args.output).suffix.lower() != ".json":
        raise UserInputError(f"--output {args.output}: name a .json file (the Markdown table goes beside it as .md)")
    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="la_semisup_"))
    else:
        workdir = Path(args.workdir).expanduser().resolve()
        if workdir.exists() and (not workdir.is_dir() or (any(workdir.iterdir())
                                                          and not (workdir / WORKDIR_MARKER).is_file())):
            raise UserInputError(f"--workdir {workdir}: exists, is not empty and was not made by this benchmark; "
                                 f"choose a new or empty folder (the benchmark writes nnU-Net's datasets there)")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).write_text("made by benchmarks/la_semisup.py: its prepared datasets are reused and "
                                          "replaced by later benchmarks in this folder\n")
    stem = f"seed{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = workdir / "runs" / stem
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = workdir / "runs" / f"{stem}_{n}"
    run_dir.mkdir(parents=True)
    output = Path(args.output).expanduser().resolve() if args.output else run_dir / "la_semisup.json"
    return Settings(
        data=data, spacing=args.spacing, split_file=args.split, num_labeled=value["num_labeled"],
        num_unlabeled=value["num_unlabeled"], num_eval=value["num_eval"], dataset_ids=(semi_id, all_id),
        runs=runs, steps=value["steps"], iterations_per_epoch=value["iterations_per_epoch"],
        val_iterations=value["val_iterations"], seed=args.seed, device=value["device"], concurrency=concurrency,
        workers_per_run=value["workers_per_run"], workers_semi=value["workers_semi"], compile=args.compile,
        tta=value["tta"] == "on", plan_processes=plan_processes, cpu_smoke=args.cpu_smoke, workdir=workdir,
        run_dir=run_dir, output=output, time_limit=args.time_limit, argv=argv)


# ------------------------------------------------------------------------------------------------ split

def _case_ids(data: Path) -> list[str]:
    """IDs of the case folders (``<ID>/mri_norm2.h5``) anywhere under ``data``."""
    return sorted({p.parent.name for p in data.rglob("mri_norm2.h5")})


def _train_list(data: Path) -> tuple[list[str], str]:
    """train.list of the data folder if it has one (its README defines the split by it), else UA-MT's."""
    for candidate in (data / "train.list", data.parent / "train.list"):
        if candidate.is_file():
            ids = [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
            return ids, str(candidate)
    from nnunet_sassnet.conversion import load_uamt_split
    return load_uamt_split()[0], "UA-MT's train.list (nnunet_sassnet/data)"


def make_split(s: Settings) -> Split:
    """The split: from ``--split`` or by position in train.list (first labeled, next unlabeled, last eval)."""
    present = set(_case_ids(s.data))
    if not present:
        raise UserInputError(f"--data {s.data}: no <ID>/mri_norm2.h5 found at any depth; pass the folder of "
                             f"the LA lite scans")
    if s.split_file is not None:
        path = Path(s.split_file)
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserInputError(f"--split {path}: cannot read it as JSON ({e})") from None
        if not isinstance(content, dict) or not all(isinstance(content.get(k, []), list)
                                                    for k in ("labeled", "unlabeled", "test")):
            raise UserInputError(f"--split {path}: expected {{\"labeled\": [...], \"unlabeled\": [...], "
                                 f"\"test\": [...]}}")
        split = Split([str(i) for i in content.get("labeled", [])], [str(i) for i in content.get("unlabeled", [])],
                      [str(i) for i in content.get("test", [])], f"split file {path.resolve()}")
    else:
        order, list_name = _train_list(s.data)
        order = [i for i in order if i in present]
        need = s.num_labeled + s.num_unlabeled + s.num_eval
        if need > len(order):
            raise UserInputError(f"--num-labeled {s.num_labeled} + --num-unlabeled {s.num_unlabeled} + --num-eval "
                                 f"{s.num_eval} = {need} scans, but only {len(order)} scans of train.list are "
                                 f"under {s.data}; ask for fewer")
        split = Split(order[:s.num_labeled], order[s.num_labeled:s.num_labeled + s.num_unlabeled],
                      order[len(order) - s.num_eval:] if s.num_eval else [],
                      f"{list_name}: first {s.num_labeled} labeled, next {s.num_unlabeled} unlabeled, last "
                      f"{s.num_eval} evaluation")
    if not split.labeled:
        raise UserInputError("the split has no labeled scan; nnU-Net needs labeled training scans")
    if not split.test:
        raise UserInputError("the split has no evaluation scan (\"test\"); the benchmark scores on them")
    ids = split.labeled + split.unlabeled + split.test
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise UserInputError(f"the split lists {', '.join(repeated[:5])} more than once; list each scan once")
    absent = [i for i in ids if i not in present]
    if absent:
        raise UserInputError(f"the split names {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}, not "
                             f"under {s.data}")
    semi = [r.key for r in s.runs if r.semi_supervised]
    if semi and not split.unlabeled:
        raise UserInputError(f"--trainers {semi[0]}: a semi-supervised trainer, but the split has no unlabeled scans")
    on_all = [r.key for r in s.runs if r.semi_supervised and r.data == "all"]
    if on_all:
        raise UserInputError(f"--trainers {on_all[0]}: a semi-supervised trainer on the all-labeled dataset, which "
                             f"has no unlabeled scans; run it on the semi-supervised one (without ':all')")
    return split


# ------------------------------------------------------------------------------------------------ trainers

def resolve_trainers(s: Settings, ext_dirs: list[str], log_file: Path) -> None:
    """Find every trainer class as nnU-Net would; record how to import it and whether it is semi-supervised."""
    previous = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(ext_dirs)
    try:
        with open(log_file, "a") as log, contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

            from nnunet_sassnet.trainers import nnUNetTrainerSASSNet
            for run in s.runs:
                try:
                    cls = recursive_find_trainer_class_by_name(run.trainer)
                except (RuntimeError, AssertionError) as e:
                    raise UserInputError(f"--trainers {run.key}: nnU-Net finds no trainer {run.trainer} "
                                         f"({str(e).splitlines()[0][:200]})") from None
                run.semi_supervised = issubclass(cls, nnUNetTrainerSASSNet)
                run.bench_trainer = run.trainer + BENCH_SUFFIX
                run.base_import = _import_recipe(cls, ext_dirs)
    finally:
        if previous is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = previous


def _import_recipe(cls: type, ext_dirs: list[str]) -> tuple[str, str, str]:
    """(module, class name, file) with which the benchmark's trainer module gets ``cls`` in another process.

    Classes of installed packages are imported by module name. nnU-Net imports the modules of the
    ``nnUNet_extTrainer`` folders as top-level modules and forgets them afterwards, so those are loaded from
    their file in the folder where nnU-Net found them instead (module name empty).
    """
    module = cls.__module__
    try:
        importable = importlib.util.find_spec(module) is not None and \
            getattr(importlib.import_module(module), cls.__name__, None) is cls
    except (ImportError, ValueError):
        importable = False
    if importable:
        return module, cls.__name__, ""
    relative = Path(*module.split(".")).with_suffix(".py")
    for folder in ext_dirs:
        if (Path(folder) / relative).is_file():
            return "", cls.__name__, str((Path(folder) / relative).resolve())
    raise UserInputError(f"trainer {cls.__name__}: its module {module} is neither importable nor a file in "
                         f"nnUNet_extTrainer's folders; install it or put its file into such a folder")


_TRAINER_MODULE_TEMPLATE = '''"""Trainers of one la_semisup benchmark (written by benchmarks/la_semisup.py for this work folder).

Each class is its base trainer with the benchmark's schedule and seed, and without nnU-Net's final
validation: the benchmark predicts and scores its own evaluation scans instead.
"""
import importlib.util
import random

import numpy as np
import torch

SEED = {seed!r}
SCHEDULE = {schedule!r}


def _load(module: str, name: str, file: str) -> type:
    if module:
        return getattr(importlib.import_module(module), name)
    # a trainer from another nnUNet_extTrainer folder: load its file under a private module name
    spec = importlib.util.spec_from_file_location("_la_semisup_base_" + name, file)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return getattr(loaded, name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the CUDA generators too


def _bench_trainer(base: type, name: str) -> type:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # seeded before nnU-Net builds anything: initial weights (network, SDM head, discriminator) and the
        # patch sampling of in-process augmentation are fixed by the seed; augmentation worker processes draw
        # their own seeds, as in stock nnU-Net
        _seed_everything(SEED)
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        # nnU-Net assigns its schedule in __init__, so it is replaced afterwards
        for key, value in SCHEDULE.items():
            setattr(self, key, value)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file("la_semisup: nnU-Net's final validation skipped; the benchmark scores the "
                               "evaluation scans")

    return type(name, (base,), {{"__init__": __init__, "perform_actual_validation": perform_actual_validation,
                                "__module__": __name__, "__qualname__": name,
                                "__doc__": base.__name__ + " with the benchmark's schedule and seed."}})

'''


def write_trainer_module(s: Settings, folder: Path) -> Path:
    """Write the module of benchmark trainers (one per trainer class) into ``folder``."""
    schedule = {"num_epochs": s.epochs, "num_iterations_per_epoch": s.iterations_per_epoch,
                "num_val_iterations_per_epoch": s.val_iterations}
    text = _TRAINER_MODULE_TEMPLATE.format(seed=s.seed, schedule=schedule)
    done: set[str] = set()
    for run in s.runs:
        if run.bench_trainer in done:
            continue
        done.add(run.bench_trainer)
        module, name, file = run.base_import
        text += f"{run.bench_trainer} = _bench_trainer(_load({module!r}, {name!r}, {file!r}), " \
                f"{run.bench_trainer!r})\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TRAINER_MODULE}.py"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ running

@dataclass
class StepResult:
    """The outcome of one subprocess."""

    ok: bool
    returncode: int | None
    seconds: float
    log: Path
    timed_out: bool = False
    error: str = ""


class Benchmark:
    """State shared by the stages: settings, paths, environment, the results document and live processes."""

    def __init__(self, s: Settings):
        self.s = s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + s.time_limit if s.time_limit > 0 else None
        # datasets at the top of the work folder (seed-independent, reusable); everything else per benchmark
        w, r = s.workdir, s.run_dir
        self.raw, self.preprocessed, self.prepared = w / "nnUNet_raw", w / "nnUNet_preprocessed", w / "prepared"
        self.results, self.logs, self.predictions = r / "nnUNet_results", r / "logs", r / "predictions"
        self.evaluation, self.trainer_folder, self.cache = r / "evaluation", r / "trainers", r / "cache"
        # multiprocessing puts Unix sockets into TMPDIR, whose paths may not exceed ~100 characters: a deep work
        # folder keeps the system's temporary folder (the sockets are removed with their processes)
        self.tmp = w / "tmp" if len(str(w / "tmp")) <= MAX_TMPDIR_LENGTH else None
        for folder in (self.raw, self.preprocessed, self.prepared, self.results, self.logs, self.predictions,
                       self.evaluation, self.trainer_folder, self.cache, *([self.tmp] if self.tmp else [])):
            folder.mkdir(parents=True, exist_ok=True)
        from nnunet_sassnet.discovery import trainer_dir
        user_ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
        self.ext_dirs = [str(self.trainer_folder), trainer_dir(), *user_ext]
        self.lock = threading.RLock()
        self.print_lock = threading.Lock()
        self.processes: dict[int, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.doc: dict[str, Any] = {}
        self.stages: list[dict[str, Any]] = []
        # readiness of the prepared data ("semi", "all", "unlabeled"): a run starts as soon as its data is there
        self.events = {key: threading.Event() for key in ("semi", "all", "unlabeled")}
        self.state: dict[str, tuple[bool, str]] = {}

    def wait_for(self, keys: list[str]) -> tuple[bool, str]:
        """Wait until the data ``keys`` are prepared; (False, why) when one failed or the benchmark stopped."""
        for key in keys:
            self.events[key].wait()
            ok, why = self.state.get(key, (False, "interrupted"))
            if not ok or self.stopping.is_set():
                return False, why or "interrupted"
        return True, ""

    # ---- output ---------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, message: str) -> None:
        with self.print_lock:
            print(f"[{self.elapsed():7.1f} s] {message}", flush=True)

    def record_stage(self, name: str, start: float, end: float, status: str) -> None:
        with self.lock:
            self.stages.append({"stage": name, "start_s": round(start - self.t0, 2), "end_s": round(end - self.t0, 2),
                                "seconds": round(end - start, 2), "status": status})
            self.write()

    def write(self) -> None:
        """Write the results JSON (atomically: readers never see half a file); called after every stage."""
        with self.lock:
            self.doc["stages"] = self.stages
            self.doc["elapsed_s"] = round(self.elapsed(), 2)
            self.doc["paired"] = paired_comparisons(self.doc.get("runs", {}), BASELINE)
            self.doc["table"] = format_results(self.doc)
            doc = {**self.doc, "datasets": {k: {kk: vv for kk, vv in d.items() if kk != "stamp"}
                                            for k, d in self.doc.get("datasets", {}).items()}}
            text = json.dumps(_finite_or_null(doc), indent=2, allow_nan=False) + "\n"
            self.s.output.parent.mkdir(parents=True, exist_ok=True)
            for path, content in ((self.s.output, text), (self.s.output.with_suffix(".md"), self.doc["table"])):
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(content)
                os.replace(tmp, path)

    # ---- environment ----------------------------------------------------------------------------------
    def env(self, data_workers: int | None = None) -> dict[str, str]:
        """nnU-Net's environment for a subprocess: every folder and cache under the work folder."""
        env = dict(os.environ)
        cpus = os.cpu_count() or 1
        threads = str(max(1, cpus // max(1, self.s.concurrency)))
        env.update({
            "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results), "nnUNet_extTrainer": os.pathsep.join(self.ext_dirs),
            "nnUNet_compile": self.s.compile, "nnUNet_def_n_proc": str(max(1, self.s.workers_per_run)),
            # the planner refuses 0 augmentation processes; trainings get their own value
            "nnUNet_n_proc_DA": str(max(1, self.s.workers_per_run) if data_workers is None else data_workers),
            "PYTHONPATH": os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p]]),
            "PYTHONUNBUFFERED": "1",
            # concurrent processes would otherwise each start one thread per core
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
            "TORCHINDUCTOR_COMPILE_THREADS": "1",
            "MPLCONFIGDIR": str(self.cache / "matplotlib"),
            "TORCHINDUCTOR_CACHE_DIR": str(self.cache / "inductor"), "TRITON_CACHE_DIR": str(self.cache / "triton"),
            "XDG_CACHE_HOME": str(self.cache),
        })
        if self.tmp is not None:
            env["TMPDIR"] = str(self.tmp)
        return env

    # ---- subprocesses ---------------------------------------------------------------------------------
    def remaining(self, cap: float) -> float:
        if self.deadline is None:
            return cap
        return min(cap, self.deadline - time.monotonic())

    def run_step(self, name: str, cmd: list[str], env: dict[str, str], cap: float) -> StepResult:
        """Run one tool with its output in ``logs/<name>.log``; stop it (and its workers) at its time limit."""
        log = self.logs / f"{name}.log"
        timeout = self.remaining(cap)
        start = time.monotonic()
        if self.stopping.is_set() or timeout <= 1:
            why = "interrupted" if self.stopping.is_set() else "time limit reached before it could start"
            self.say(f"{name}: not started ({why})")
            self.record_stage(name, start, start, "skipped")
            return StepResult(False, None, 0.0, log, timed_out=not self.stopping.is_set(), error=why)
        self.say(f"{name}: started (log {log})")
        with open(log, "w") as out:
            out.write("$ " + " ".join(cmd) + "\n\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(self.s.run_dir),
                                    start_new_session=True)  # its own process group: workers are stopped with it
            with self.lock:
                self.processes[proc.pid] = proc
            if self.stopping.is_set():  # stop_all ran between the check above and the start
                stop_process_group(proc)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                stop_process_group(proc)
            finally:
                with self.lock:
                    self.processes.pop(proc.pid, None)
        seconds = time.monotonic() - start
        ok = proc.returncode == 0 and not timed_out
        status = "ok" if ok else ("timeout" if timed_out else f"failed (exit code {proc.returncode})")
        if self.stopping.is_set() and not ok:
            status = "interrupted"
        self.record_stage(name, start, time.monotonic(), status)
        if ok:
            self.say(f"{name}: done in {seconds:.1f} s")
            return StepResult(True, 0, seconds, log)
        error = f"timed out after {seconds:.0f} s" if timed_out else status
        self.say(f"{name}: {error} after {seconds:.1f} s; last lines of {log}:\n{tail(log)}")
        return StepResult(False, proc.returncode, seconds, log, timed_out=timed_out, error=error)

    def stop_all(self) -> None:
        """Stop every subprocess still running (ours only: each has its own process group)."""
        self.stopping.set()
        with self.lock:
            procs = list(self.processes.values())
        for proc in procs:
            stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group that ``proc`` leads, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, indented."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text)


# ------------------------------------------------------------------------------------------------ stages

def _preparation_stamp(s: Settings, key: str, dataset_id: int, name: str, content: dict[str, list[str]]) -> dict:
    """What a prepared dataset was made from; a later benchmark in the same work folder reuses it if equal."""
    return {"dataset": key, "id": dataset_id, "name": name, "split": content, "data": str(s.data),
            "spacing": s.spacing, "plans": s.plans, "configuration": CONFIGURATION,
            "small_plans": {"patch": list(SMOKE_PATCH), "features": list(SMOKE_FEATURES)} if s.cpu_smoke else None}


def convert_datasets(b: Benchmark, split: Split) -> dict[str, dict[str, Any]]:
    """Both nnU-Net raw datasets, with the project's converter (in this process; it takes seconds).

    A dataset that an earlier benchmark in this work folder prepared from the same data, split and plans is
    reused as it is (conversion, planning and preprocessing do not depend on the seed); any other dataset with
    the same ID there is replaced.
    """
    from nnunet_sassnet.conversion import convert_la2018

    s = b.s
    start = time.monotonic()
    datasets: dict[str, dict[str, Any]] = {}
    specs = (("semi", s.dataset_ids[0], "LAsemi", {"labeled": split.labeled, "unlabeled": split.unlabeled,
                                                   "test": split.test}),
             # the all-labeled model predicts the semi-supervised dataset's evaluation scans: no copy of them
             ("all", s.dataset_ids[1], "LAall", {"labeled": split.all_labeled, "unlabeled": [], "test": []}))
    needed = {r.data for r in s.runs} | {"semi"}
    with open(b.logs / "convert.log", "w") as log, contextlib.redirect_stdout(log):
        for key, dataset_id, name, content in specs:
            if key not in needed:
                continue
            folder_name = f"Dataset{dataset_id:03d}_{name}"
            stamp = _preparation_stamp(s, key, dataset_id, name, content)
            stamp_file = b.prepared / f"{key}.json"
            dataset = {"id": dataset_id, "name": folder_name, "raw": str(b.raw / folder_name),
                       "labeled": len(content["labeled"]), "unlabeled": len(content["unlabeled"]),
                       "evaluation": len(split.test), "stamp_file": str(stamp_file), "stamp": stamp,
                       "reused": False}
            plans_file = b.preprocessed / folder_name / f"{s.plans}.json"
            if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and plans_file.is_file():
                dataset["reused"] = True
            else:
                stamp_file.unlink(missing_ok=True)
                # stale data under this ID (another split or plans): nnU-Net would reuse its fingerprint
                for old in [*b.raw.glob(f"Dataset{dataset_id:03d}_*"), *b.preprocessed.glob(f"Dataset{dataset_id:03d}_*")]:
                    shutil.rmtree(old)
                split_file = b.prepared / f"{key}_split.json"
                split_file.write_text(json.dumps(content, indent=2))
                convert_la2018(str(s.data), dataset_id, name=name, split=str(split_file), spacing=s.spacing,
                               raw_dir=str(b.raw), progress=False)
            datasets[key] = dataset
    b.record_stage("convert", start, time.monotonic(), "ok")
    made = ", ".join(f"{d['name']} ({d['labeled']} labeled, {d['unlabeled']} unlabeled"
                     f"{'; prepared earlier, reused' if d['reused'] else ''})" for d in datasets.values())
    b.say(f"convert: {made}; {len(split.test)} evaluation scans")
    return datasets


def plan_dataset(b: Benchmark, dataset: dict[str, Any]) -> bool:
    """nnU-Net's planning and preprocessing of one dataset (3d_fullres); small derived plans for the smoke run."""
    s, dataset_id = b.s, str(dataset["id"])
    folder = b.preprocessed / dataset["name"]
    if not dataset["reused"]:
        np_ = str(s.plan_processes)
        module = "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints"
        argv = ["-d", dataset_id, "-c", CONFIGURATION, "-npfp", np_, "-np", np_]
        if s.cpu_smoke:
            argv.append("--no_pp")
        result = b.run_step(f"plan_{dataset['name']}", python_tool(module, "plan_and_preprocess_entry", argv),
                            b.env(), CAP_PLAN)
        if not result.ok:
            dataset["error"] = f"planning: {result.error}"
            return False
        if s.cpu_smoke:
            from nnunet_sassnet.plans import derive_small_plans
            derive_small_plans(str(folder), SMOKE_PATCH, features_per_stage=SMOKE_FEATURES, batch_size=2,
                               target_plans=SMALL_PLANS, configuration=CONFIGURATION)
            result = b.run_step(f"preprocess_{dataset['name']}", python_tool(module, "preprocess_entry", [
                "-d", dataset_id, "-plans_name", SMALL_PLANS, "-c", CONFIGURATION, "-np", np_]), b.env(), CAP_PLAN)
            if not result.ok:
                dataset["error"] = f"preprocessing: {result.error}"
                return False
        Path(dataset["stamp_file"]).write_text(json.dumps(dataset["stamp"], indent=2))
    dataset["plans"] = plans_summary(folder / f"{s.plans}.json")
    b.say(f"plans of {dataset['name']}: {dataset['plans']}")
    return True


def plans_summary(plans_file: Path) -> dict[str, Any]:
    """What the plans chose for 3d_fullres: patch, batch, spacing and network size."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][CONFIGURATION]
    arch = config.get("architecture", {}).get("arch_kwargs", {})
    return {"plans": plans.get("plans_name"), "patch_size": config["patch_size"], "batch_size": config["batch_size"],
            "spacing": config["spacing"], "features_per_stage": arch.get("features_per_stage"),
            "n_stages": arch.get("n_stages")}


def preprocess_unlabeled_step(b: Benchmark, dataset: dict[str, Any]) -> bool:
    """The unlabeled scans with the semi-supervised dataset's plans (what nnUNetTrainerSASSNet reads)."""
    argv = ["-d", str(dataset["id"]), "-c", CONFIGURATION, "-p", b.s.plans, "-np", str(b.s.plan_processes)]
    result = b.run_step(f"unlabeled_{dataset['name']}",
                        python_tool("nnunet_sassnet.unlabeled", "preprocess_unlabeled_entry", argv), b.env(),
                        CAP_UNLABELED)
    if not result.ok:
        dataset["error"] = f"unlabeled preprocessing: {result.error}"
    return result.ok


def train_predict_score(b: Benchmark, run: RunSpec, datasets: dict[str, dict[str, Any]],
                        slots: threading.Semaphore) -> None:
    """One run: wait for its data, train (holding one of the concurrency slots), predict, score."""
    s = b.s
    entry = b.doc["runs"][run.key]
    ok, why = b.wait_for([run.data] + (["unlabeled"] if run.semi_supervised and run.data == "semi" else []))
    if not ok:
        _finish_run(b, run, "skipped", f"its data is not ready: {why}")
        return
    dataset = datasets[run.data]
    with slots:
        if b.stopping.is_set():
            _finish_run(b, run, "skipped", "interrupted")
            return
        train_cmd = python_tool("nnunetv2.run.run_training", "run_training_entry", [
            str(dataset["id"]), CONFIGURATION, "all", "-tr", run.bench_trainer, "-p", s.plans, "-device", s.device])
        workers = s.workers_semi if run.semi_supervised else s.workers_per_run
        result = b.run_step(f"train_{run.slug}", train_cmd, b.env(data_workers=workers), CAP_TRAIN)
    entry["train_s"] = round(result.seconds, 2)
    entry["train_log"] = str(result.log)
    model = b.results / dataset["name"] / f"{run.bench_trainer}__{s.plans}__{CONFIGURATION}" / "fold_all"
    entry["model"] = str(model)
    if not result.ok or not (model / "checkpoint_final.pth").is_file():
        _finish_run(b, run, "timeout" if result.timed_out else "failed",
                    f"training: {result.error or 'no checkpoint_final.pth'}")
        return

    predictions = b.predictions / run.slug
    workers = str(max(1, s.workers_per_run))
    predict_cmd = python_tool("nnunetv2.inference.predict_from_raw_data", "predict_entry_point", [
        "-i", Path(datasets["semi"]["raw"]) / "imagesTs", "-o", predictions, "-d", dataset["id"], "-c", CONFIGURATION,
        "-tr", run.bench_trainer, "-p", s.plans, "-f", "all", "-device", s.device, "-npp", workers, "-nps", workers,
        "--disable_progress_bar", *([] if s.tta else ["--disable_tta"])])
    result = b.run_step(f"predict_{run.slug}", predict_cmd, b.env(), CAP_PREDICT)
    entry["predict_s"] = round(result.seconds, 2)
    if not result.ok:
        _finish_run(b, run, "timeout" if result.timed_out else "failed", f"prediction: {result.error}")
        return

    start = time.monotonic()
    try:
        from nnunet_sassnet.evaluation import EvaluationError, evaluate_folders, write_report
        report = evaluate_folders(str(Path(datasets["semi"]["raw"]) / "labelsTs"), str(predictions), labels=[1])
        write_report(report, str(b.evaluation / f"{run.slug}.json"))
    except (EvaluationError, OSError, RuntimeError) as e:
        b.record_stage(f"evaluate_{run.slug}", start, time.monotonic(), "failed")
        _finish_run(b, run, "failed", f"evaluation: {e}")
        return
    with b.lock:
        entry["evaluate_s"] = round(time.monotonic() - start, 2)
        entry["report"] = str(b.evaluation / f"{run.slug}.json")
        entry["cases"] = {case: {m: v[m] for m in REPORTED_METRICS} for case, v in report["cases"].items()}
        entry["mean"] = {m: report["mean"][m] for m in REPORTED_METRICS}
        entry["std"] = {m: report["std"][m] for m in REPORTED_METRICS}
        entry["n"] = {m: report["n"][m] for m in REPORTED_METRICS}
        entry["counts"] = report["counts"]
    b.record_stage(f"evaluate_{run.slug}", start, time.monotonic(), "ok")
    missing = sorted(set(b.doc["split"]["evaluation"]) - set(report["cases"]))
    if missing:
        _finish_run(b, run, "failed", f"no prediction for {', '.join(missing)}")
        return
    _finish_run(b, run, "done", "")
    b.say(f"{run.key}: Dice {100 * entry['mean']['dice']:.2f} % over {len(report['cases'])} evaluation scans")


def _finish_run(b: Benchmark, run: RunSpec, status: str, error: str) -> None:
    """Record a run's final status (and why it failed); steps stopped by an interrupt count as interrupted."""
    if b.stopping.is_set() and status in ("failed", "timeout", "skipped"):
        status = "interrupted"
    with b.lock:
        b.doc["runs"][run.key]["status"] = status
        if error:
            b.doc["runs"][run.key]["error"] = error
        b.write()
    if error:
        b.say(f"{run.key}: {status} ({error})")


# ------------------------------------------------------------------------------------------------ results

def _finite_or_null(value: Any) -> Any:
    """JSON without NaN/Infinity (which strict readers refuse): undefined values become null."""
    if isinstance(value, dict):
        return {str(k): _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return _finite_or_null(value.item())
    return value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def paired_comparisons(runs: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per-scan Dice differences of every scored run against ``baseline`` on the scans both scored."""
    base = runs.get(baseline, {}).get("cases")
    if not base:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, entry in runs.items():
        if key == baseline or not entry.get("cases"):
            continue
        cases = sorted(c for c in entry["cases"] if c in base and _number(entry["cases"][c]["dice"]) is not None
                       and _number(base[c]["dice"]) is not None)
        diffs = [100.0 * (entry["cases"][c]["dice"] - base[c]["dice"]) for c in cases]
        if not diffs:
            continue
        mean = sum(diffs) / len(diffs)
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
        out[key] = {
            "vs": baseline, "n": len(diffs), "mean_dice_diff_points": mean, "std_dice_diff_points": std,
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
            "wilcoxon_p": _wilcoxon(diffs), "per_case_points": dict(zip(cases, diffs)),
        }
    return out


def _wilcoxon(diffs: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences (None where undefined)."""
    if not any(diffs):
        return None
    try:
        from scipy.stats import wilcoxon
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(wilcoxon(diffs).pvalue)
    except (ImportError, ValueError):
        return None
    return p if math.isfinite(p) else None


def _pm(mean: Any, std: Any, scale: float = 1.0) -> str:
    m, sd = _number(mean), _number(std)
    if m is None:
        return "n/a"
    return f"{m * scale:.2f} ± {sd * scale:.2f}" if sd is not None else f"{m * scale:.2f}"


def format_results(doc: dict[str, Any]) -> str:
    """Markdown: the metrics table with the paired comparison, then the wall time of every stage."""
    runs: dict[str, dict[str, Any]] = doc.get("runs", {})
    paired = doc.get("paired", {})
    settings = doc.get("settings", {})
    lines = [f"Seed {settings.get('seed')}, {settings.get('steps')} steps per run, device "
             f"{doc.get('environment', {}).get('device_name') or settings.get('device')}; "
             f"{settings.get('num_eval_scans')} evaluation scans; mean ± std over scans (std: population).", "",
             "| Run | Labeled | Unlabeled | Status | Dice (%) | Jaccard (%) | 95HD (voxel) | ASD (voxel) | 95HD (mm) "
             "| ASD (mm) | ΔDice vs nnUNetTrainer (points) | Wins | Wilcoxon p |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in runs.items():
        mean, std = entry.get("mean", {}), entry.get("std", {})
        pair = paired.get(key)
        if key == BASELINE:
            delta, wins, p = "(baseline)", "", ""
        elif pair:
            delta = _pm(pair["mean_dice_diff_points"], pair["std_dice_diff_points"])
            wins = f"{pair['wins']}/{pair['n']}"
            p = f"{pair['wilcoxon_p']:.3g}" if pair["wilcoxon_p"] is not None else "n/a"
        else:
            delta, wins, p = "n/a", "", ""
        cells = [_pm(mean.get("dice"), std.get("dice"), 100), _pm(mean.get("jaccard"), std.get("jaccard"), 100),
                 *(_pm(mean.get(m), std.get(m)) for m in ("hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm"))]
        lines.append(f"| {entry.get('title', key)} | {entry.get('labeled', '')} | {entry.get('unlabeled', 0)} | "
                     f"{entry.get('status', 'pending')} | " + " | ".join(cells) + f" | {delta} | {wins} | {p} |")
    empties = {k: e["counts"]["empty_prediction"] for k, e in runs.items() if e.get("counts", {}).get("empty_prediction")}
    if empties:
        lines += ["", "Empty predictions (Dice 0; distances undefined and left out of the distance means): "
                  + ", ".join(f"{k}: {n}" for k, n in empties.items())]
    for key, entry in runs.items():
        if entry.get("error"):
            lines.append(f"- {key}: {entry['status']}: {entry['error']}")
    lines += ["", "| Stage | Seconds | From (s) | To (s) | Status |", "|---|---|---|---|---|"]
    for stage in doc.get("stages", []):
        lines.append(f"| {stage['stage']} | {stage['seconds']:.1f} | {stage['start_s']:.1f} | {stage['end_s']:.1f} | "
                     f"{stage['status']} |")
    lines.append(f"\nTotal wall time: {doc.get('elapsed_s', 0.0):.1f} s")
    return "\n".join(lines) + "\n"


def environment_info(device: str) -> dict[str, Any]:
    """Versions, device and commit, for the record."""
    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    for name in ("torch", "nnunetv2", "numpy"):
        try:
            module = importlib.import_module(name)
            info[name] = getattr(module, "__version__", None)
        except ImportError:
            info[name] = None
        if name == "nnunetv2" and info[name] is None:
            from importlib.metadata import PackageNotFoundError, version
            try:
                info[name] = version("nnunetv2")
            except PackageNotFoundError:
                pass
    info["device_name"] = "CPU"
    if device == "cuda":
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30)
            info["device_name"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else "CUDA device"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info["device_name"] = "CUDA device"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30)
        info["commit"] = commit.stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        info["uncommitted_changes"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


# ------------------------------------------------------------------------------------------------ main

def benchmark(s: Settings) -> int:
    """Run every stage; return 0 when every run was scored, 1 otherwise (the results are written either way)."""
    if s.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda, but torch sees no CUDA device; pass --device cpu (slow) or run "
                                 "on a GPU machine")
    b = Benchmark(s)
    b.say(f"work folder {s.workdir}; results {s.output}")
    resolve_trainers(s, b.ext_dirs, b.logs / "trainer_lookup.log")
    split = make_split(s)
    write_trainer_module(s, b.trainer_folder)
    b.doc = {
        "benchmark": "la_semisup",
        "settings": {
            "argv": s.argv, "data": str(s.data), "spacing_mm": s.spacing, "split_source": split.source,
            "steps": s.steps, "epochs": s.epochs, "iterations_per_epoch": s.iterations_per_epoch,
            "val_iterations_per_epoch": s.val_iterations, "seed": s.seed, "device": s.device,
            "concurrency": s.concurrency, "workers_per_run": s.workers_per_run, "workers_semi": s.workers_semi,
            "compile": s.compile, "cpu_smoke": s.cpu_smoke, "plans": s.plans, "configuration": CONFIGURATION,
            "fold": "all", "checkpoint": "checkpoint_final.pth", "test_time_mirroring": s.tta,
            "num_eval_scans": len(split.test), "time_limit_s": s.time_limit, "workdir": str(s.workdir),
            "run_dir": str(s.run_dir),
        },
        "split": {"labeled": split.labeled, "unlabeled": split.unlabeled, "evaluation": split.test},
        "environment": environment_info(s.device),
        "datasets": {},
        "runs": {r.key: {"title": r.title, "trainer": r.trainer, "bench_trainer": r.bench_trainer, "data": r.data,
                         "labeled": len(split.labeled) if r.data == "semi" else len(split.all_labeled),
                         "unlabeled": len(split.unlabeled) if r.data == "semi" and r.semi_supervised else 0,
                         "status": "pending"} for r in s.runs},
    }
    b.write()
    try:
        _run_stages(b, split)
    except KeyboardInterrupt:
        b.say("interrupted: stopping every running step")
        b.stop_all()
        for event in b.events.values():
            event.set()  # runs still waiting for their data give up
        with b.lock:
            for entry in b.doc["runs"].values():
                if entry["status"] == "pending":
                    entry["status"] = "interrupted"
            b.write()
        print("\n" + b.doc["table"], flush=True)
        return 130
    b.write()
    print("\n" + b.doc["table"], flush=True)
    print(f"Results: {s.output} (table: {s.output.with_suffix('.md')}); models, predictions and logs: "
          f"{s.run_dir}", flush=True)
    return 0 if all(e["status"] == "done" for e in b.doc["runs"].values()) else 1


def _run_stages(b: Benchmark, split: Split) -> None:
    """Convert, then prepare each dataset and run each training in threads; return when all are done."""
    s = b.s
    datasets = convert_datasets(b, split)
    b.doc["datasets"] = datasets
    b.write()
    needs_unlabeled = any(r.semi_supervised and r.data == "semi" for r in s.runs)

    def prepare(key: str) -> None:
        dataset = datasets[key]
        try:
            ok = plan_dataset(b, dataset)
            b.state[key] = (ok, dataset.get("error", ""))
            b.events[key].set()  # runs without unlabeled data start now
            if key == "semi":
                ok = ok and (preprocess_unlabeled_step(b, dataset) if needs_unlabeled else True)
                b.state["unlabeled"] = (ok, dataset.get("error", ""))
        except Exception as e:  # noqa: BLE001 -- one dataset's failure must not stop the other's runs
            dataset["error"] = f"{type(e).__name__}: {e}"
            b.state.setdefault(key, (False, dataset["error"]))
            if key == "semi":
                b.state["unlabeled"] = (False, dataset["error"])
            b.say(f"preparing {dataset['name']} failed: {dataset['error']}")
        finally:
            b.events[key].set()
            if key == "semi":
                b.events["unlabeled"].set()
            b.write()

    slots = threading.Semaphore(s.concurrency)
    threads = [threading.Thread(target=prepare, args=(k,), name=f"prepare-{k}", daemon=True) for k in datasets]
    threads += [threading.Thread(target=_guarded_run, args=(b, run, datasets, slots), name=f"run-{run.key}",
                                 daemon=True) for run in s.runs]
    for thread in threads:
        thread.start()
    # joined with a timeout so that SIGINT/SIGTERM reach this (main) thread
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.5)


def _guarded_run(b: Benchmark, run: RunSpec, datasets: dict[str, dict[str, Any]],
                 slots: threading.Semaphore) -> None:
    """A run's thread: an unexpected error fails this run only."""
    try:
        train_predict_score(b, run, datasets, slots)
    except Exception as e:  # noqa: BLE001 -- report it and let the other runs finish
        _finish_run(b, run, "failed", f"{type(e).__name__}: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: 0 all runs scored, 1 some run failed, 2 bad input, 130 interrupted."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)

    def on_sigterm(signum, frame):  # a time-limited caller's stop: end the subprocesses and write what is there
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    return run_cli(lambda: benchmark(resolve_settings(args, args_list)))


if __name__ == "__main__":
    sys.exit(main())
