"""Queue files: the protocol and the runs of a series of benchmark calls, in the order they are to run.

    {"protocol": {"num_labeled": 8, "num_unlabeled": 52, "num_eval": 20, "steps": 3000,
                  "iterations_per_epoch": 250, "val_iterations": 5, "tta": "on"},
     "runs": [{"trainer": "nnUNetTrainer", "seeds": [0, 1]},
              {"trainer": "nnUNetTrainerSASSNet", "seeds": [0], "compile": true},
              {"trainer": "nnUNetTrainer", "kind": "self_training", "seeds": [0, 1]}, ...]}

Each item is a trainer with its seeds; ``data`` "all" trains on every non-evaluation scan labeled, ``kind``
"self_training" is nnU-Net's self-training recipe (two trainings), ``compile`` turns on torch.compile,
``num_labeled`` N a smaller label budget (the first N of the protocol's labeled scans, the same unlabeled and
evaluation scans: a protocol of its own in the ledger). An item ``{"seed_of_positive": 2}`` (optionally with
``num_labeled``) stands for that seed of every setting whose seeds 0 and 1 both beat nnUNetTrainer in the ledger
(positive mean ΔDice), filled in by each call from the ledger at that place of the queue. Each call runs, in
this order, the runs that the ledger does not hold as done yet.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_sassnet.errors import UserInputError

from benchmarks.la_semisup.settings import KINDS, RunSpec, check_trainer_name

#: protocol values a queue file may fix (the command line's options of the same names, with '-' for '_')
PROTOCOL_KEYS = ("num_labeled", "num_unlabeled", "num_eval", "steps", "iterations_per_epoch", "val_iterations",
                 "tta")
ITEM_KEYS = {"trainer", "seeds", "kind", "data", "compile", "num_labeled", "note"}
RULE_KEYS = {"seed_of_positive", "num_labeled", "note"}


@dataclass
class SeedRule:
    """``{"seed_of_positive": N}``: seed N of every setting positive on seeds 0 and 1, before run ``position``."""

    seed: int
    num_labeled: int | None
    position: int  # index into the queue's runs where the filled-in runs go


def load_queue(path: Path) -> tuple[dict[str, Any], list[RunSpec], list[SeedRule]]:
    """The protocol values, the runs (one per trainer and seed, in order) and the seed rules of a queue file."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"--queue {path}: cannot read it as JSON ({e})") from None
    if not isinstance(content, dict) or not isinstance(content.get("runs"), list) or not content["runs"]:
        raise UserInputError(f"--queue {path}: expected {{\"protocol\": {{...}}, \"runs\": [{{\"trainer\": ..., "
                             f"\"seeds\": [...]}}, ...]}} with at least one run")
    proto = content.get("protocol", {})
    unknown = sorted(set(proto) - set(PROTOCOL_KEYS)) if isinstance(proto, dict) else ["(not an object)"]
    if unknown:
        raise UserInputError(f"--queue {path}: protocol key {unknown[0]} unknown; use {', '.join(PROTOCOL_KEYS)}")
    for key, value in proto.items():
        expected = str if key == "tta" else int
        if not isinstance(value, expected) or isinstance(value, bool) or (key == "tta" and value not in ("on", "off")):
            raise UserInputError(f"--queue {path}: protocol {key} = {value!r}; expected "
                                 f"{'on or off' if key == 'tta' else 'a whole number'}")
    runs: list[RunSpec] = []
    rules: list[SeedRule] = []
    for number, item in enumerate(content["runs"], 1):
        where = f"--queue {path}, run {number}"
        if isinstance(item, dict) and "seed_of_positive" in item:
            rules.append(_seed_rule(item, where, len(runs)))
            continue
        if not isinstance(item, dict) or "trainer" not in item or set(item) - ITEM_KEYS:
            raise UserInputError(f"{where}: expected an object with \"trainer\" and \"seeds\" (and optionally "
                                 f"\"kind\", \"data\", \"compile\", \"num_labeled\", \"note\"), or "
                                 f"{{\"seed_of_positive\": 2}}")
        check_trainer_name(str(item["trainer"]), where)
        seeds, kind, data = item.get("seeds", [0]), item.get("kind", "train"), item.get("data", "semi")
        if not isinstance(seeds, list) or not seeds or not all(_whole(s) for s in seeds):
            raise UserInputError(f"{where}: seeds {seeds!r}; expected a list of whole numbers, e.g. [0, 1]")
        if kind not in KINDS or data not in ("semi", "all") or not isinstance(item.get("compile", False), bool):
            raise UserInputError(f"{where}: kind must be one of {', '.join(KINDS)}, data semi or all, compile "
                                 f"true or false")
        num_labeled = _budget(item, where)
        if num_labeled is not None and data == "all":
            raise UserInputError(f"{where}: num_labeled applies to the semi-supervised dataset, not to data all "
                                 f"(every non-evaluation scan labeled); drop one of them")
        runs += [RunSpec(trainer=item["trainer"], seed=seed, data=data, kind=kind, compile=item.get("compile", False),
                         num_labeled=num_labeled) for seed in seeds]
    keys = [r.key for r in runs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise UserInputError(f"--queue {path}: names run {twice[0]} twice; list each run once")
    return proto, runs, rules


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _budget(item: dict[str, Any], where: str) -> int | None:
    """An item's ``num_labeled`` (None: the protocol's)."""
    value = item.get("num_labeled")
    if value is not None and (not _whole(value) or value < 1):
        raise UserInputError(f"{where}: num_labeled {value!r}; expected a whole number of labeled scans, e.g. 4")
    return value


def _seed_rule(item: dict[str, Any], where: str, position: int) -> SeedRule:
    if set(item) - RULE_KEYS or not _whole(item["seed_of_positive"]):
        raise UserInputError(f"{where}: expected {{\"seed_of_positive\": SEED}} with optionally \"num_labeled\" "
                             f"and \"note\", e.g. {{\"seed_of_positive\": 2}}")
    return SeedRule(item["seed_of_positive"], _budget(item, where), position)
