"""Finding each run's trainer as nnU-Net does, and recording its settings (class attributes) for the ledger."""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterable

from nnunet_sassnet.errors import UserInputError

from benchmarks.la_semisup.settings import REPO, RunSpec

#: the folder of the benchmark's own trainers (``<trainer>_LAbench``), put first in nnUNet_extTrainer
BENCH_TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_trainers"


def resolve_trainers(runs: Iterable[RunSpec], ext_dirs: list[str], log_file: Path) -> None:
    """Find every trainer class as nnU-Net would; record how to import it, its settings, and whether it is
    semi-supervised (it reads the unlabeled scans)."""
    previous = os.environ.get("nnUNet_extTrainer")
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(ext_dirs)
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as log, contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

            from nnunet_sassnet import trainers
            # the common base of the trainers that read the unlabeled scans (SASSNet's where there is none)
            semi_base = getattr(trainers, "nnUNetTrainerSemiSupervised", trainers.nnUNetTrainerSASSNet)
            found: dict[str, type] = {}  # each lookup imports every trainer module nnU-Net has: once per name
            for run in runs:
                try:
                    cls = found.get(run.trainer) or recursive_find_trainer_class_by_name(run.trainer)
                except (RuntimeError, AssertionError) as e:
                    raise UserInputError(f"run {run.key}: nnU-Net finds no trainer {run.trainer} "
                                         f"({str(e).splitlines()[0][:200]})") from None
                found[run.trainer] = cls
                run.semi_supervised = issubclass(cls, semi_base)
                run.base_import = import_recipe(cls, ext_dirs)
                run.settings = class_settings(cls)
    finally:
        if previous is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = previous


def import_recipe(cls: type, ext_dirs: list[str]) -> tuple[str, str, str]:
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


def bases_variable(runs: Iterable[RunSpec]) -> str:
    """``LA_SEMISUP_BASES`` for the benchmark's trainer module (see nnunet_trainers/la_semisup_trainers.py)."""
    items = {}
    for run in runs:
        module, name, file = run.base_import
        items[run.trainer] = f"{run.trainer}={file or module}:{name}"
    return ";".join(items.values())


def _is_setting(name: str, value: Any) -> bool:
    # numbers, flags and words, or tuples of numbers (betas); tuples of names and dicts are log bookkeeping
    if name.startswith("_"):
        return False
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value)


def class_settings(cls: type) -> dict[str, Any]:
    """The class attributes that configure a trainer, from the class up to nnU-Net's ``nnUNetTrainer``.

    nnU-Net's own schedule is set in ``__init__`` and is recorded by the benchmark separately.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    settings: dict[str, Any] = {}
    # every class before nnUNetTrainer in the MRO, mixins included (DTC's settings live on a mixin that is no
    # nnUNetTrainer itself). The first class that names an attribute wins; an attribute that a subclass turns
    # into a property keeps its base value here (SASSNet's unlabeled_weight_max), so that the identities of
    # recorded runs stay what they were
    mro = cls.__mro__
    for klass in mro[:mro.index(nnUNetTrainer)] if nnUNetTrainer in mro else ():
        for name, value in vars(klass).items():
            if name not in settings and not callable(value) and not isinstance(value, (property, staticmethod,
                                                                                      classmethod)) \
                    and _is_setting(name, value):
                settings[name] = list(value) if isinstance(value, tuple) else value
    return dict(sorted(settings.items()))


def class_settings_at_commit(commit: str, trainer: str, path: str = "nnunet_sassnet/trainers.py") -> dict[str, Any]:
    """:func:`class_settings` of ``trainer`` as ``path`` defined it at ``commit`` (read from git, not imported).

    For runs recorded before the ledger existed: their trainer's settings are those of their commit.
    nnU-Net's own trainers have none.
    """
    if not trainer.startswith("nnUNetTrainer") or trainer == "nnUNetTrainer":
        return {}
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], capture_output=True,
                                text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise UserInputError(f"commit {commit}: cannot read {path} from git ({e}); pass a commit of this "
                             f"repository") from None
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    if trainer not in classes:
        raise UserInputError(f"commit {commit}: {path} defines no class {trainer}")
    settings: dict[str, Any] = {}
    name: str | None = trainer
    while name in classes:
        node = classes[name]
        for statement in node.body:
            target = statement.target if isinstance(statement, ast.AnnAssign) else (
                statement.targets[0] if isinstance(statement, ast.Assign) and len(statement.targets) == 1 else None)
            if not isinstance(target, ast.Name) or statement.value is None or target.id in settings:
                continue
            try:
                value = ast.literal_eval(statement.value)
            except ValueError:
                continue
            if _is_setting(target.id, value):
                settings[target.id] = list(value) if isinstance(value, tuple) else value
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        name = bases[0] if bases else None
    return dict(sorted(settings.items()))


def current_settings_ids(names: Iterable[str]) -> dict[str, str]:
    """Settings ids of the trainer classes as this checkout defines them, for the names it defines (nnU-Net's
    nnUNetTrainer, this package's trainers and variants); other names are left out."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_sassnet import trainers, variants
    found = {}
    for name in names:
        cls = nnUNetTrainer if name == nnUNetTrainer.__name__ else (getattr(trainers, name, None)
                                                                     or getattr(variants, name, None))
        if isinstance(cls, type) and issubclass(cls, nnUNetTrainer):
            found[name] = settings_id(class_settings(cls))
    return found


#: class attributes added after runs were recorded, with the value at which the code behaves as it did before
#: the attribute existed: at that value a class keeps the settings id of its recorded runs, so that they are not
#: trained again (``discriminator_downsampled``: False is the full-resolution discriminator every SASSNet run had)
#: ``augment_on_device``: None (on CUDA, batched on the GPU; nnU-Net's workers on the CPU) draws from the same
#: augmentation as the workers every recorded run had; the ledger records per run where it ran (its field
#: ``augment_on_device``)
NEUTRAL_SETTINGS: dict[str, Any] = {"discriminator_downsampled": False, "augment_on_device": None}


def settings_id(settings: dict[str, Any]) -> str:
    """A short hash of a trainer's settings: runs of a class whose defaults changed are told apart; an attribute
    at its :data:`NEUTRAL_SETTINGS` value counts as absent."""
    kept = {k: v for k, v in settings.items() if k not in NEUTRAL_SETTINGS or v != NEUTRAL_SETTINGS[k]}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]
