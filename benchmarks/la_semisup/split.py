"""The split of the LA scans into labeled, unlabeled and evaluation scans, and its fingerprint."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from nnunet_sassnet.errors import UserInputError

from benchmarks.la_semisup.settings import Settings


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

    @property
    def fingerprint(self) -> str:
        """A short hash of the three lists (in order): runs on the same split have the same one."""
        text = json.dumps({"labeled": self.labeled, "unlabeled": self.unlabeled, "evaluation": self.test})
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def budget_split(split: Split, num_labeled: int) -> Split:
    """A smaller label budget: the first ``num_labeled`` of the split's labeled scans, the same unlabeled and
    evaluation scans (the scans in between are left out, so that only the number of labels changes)."""
    return Split(split.labeled[:num_labeled], split.unlabeled, split.test,
                 f"{split.source}; first {num_labeled} of its labeled scans")


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
    # a work folder prepared elsewhere needs no scans: with --split, --data may be absent (see settings.py)
    present = set(_case_ids(s.data)) if s.data.is_dir() or s.split_file is None else None
    if present is not None and not present:
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
    absent = [i for i in ids if present is not None and i not in present]
    if absent:
        raise UserInputError(f"the split names {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}, not "
                             f"under {s.data}")
    semi = [r.key for r in s.runs if r.learns_unlabeled]
    if semi and not split.unlabeled:
        raise UserInputError(f"run {semi[0]}: it learns from unlabeled scans, but the split has none")
    on_all = [r.key for r in s.runs if r.learns_unlabeled and r.data == "all"]
    if on_all:
        raise UserInputError(f"run {on_all[0]}: it learns from unlabeled scans, but the all-labeled dataset has "
                             f"none; run it on the semi-supervised one (without ':all')")
    return split
