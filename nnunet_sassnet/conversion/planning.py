"""Where each LA 2018 case goes (imagesTr, imagesUnlabeled, imagesTs or nowhere), by one of three split rules."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nnunet_sassnet.conversion.sources import H5_FILE, NRRD_LABEL, Case
from nnunet_sassnet.conversion.splits import SPLIT_KEYS, load_uamt_split, read_split_json
from nnunet_sassnet.errors import UserInputError

__all__ = ["Plan", "make_plan"]


@dataclass
class Plan:
    """Where each case goes, and what the summary reports."""

    labeled: list[Case]
    unlabeled: list[Case]
    test: list[Case]
    skipped: list[Case]  # present in the input but not named by a split JSON
    rule: str
    missing: dict[str, list[str]]  # list name -> its IDs absent from the input


def _plan_uamt(cases: list[Case], num_labeled: int, input_dir: Path) -> Plan:
    train_ids, test_ids = load_uamt_split()
    by_id = {c.case_id: c for c in cases}
    listed = set(train_ids) | set(test_ids)
    train_present = [by_id[i] for i in train_ids if i in by_id]
    test_present = [by_id[i] for i in test_ids if i in by_id]
    if num_labeled < 1:
        raise UserInputError(f"--num-labeled {num_labeled}: must be at least 1 (nnU-Net needs labeled cases)")
    if num_labeled > len(train_present):
        raise UserInputError(f"--num-labeled {num_labeled}, but only {len(train_present)} of the {len(train_ids)} "
                             f"cases of UA-MT's train.list are under {input_dir}; pass --num-labeled "
                             f"{max(len(train_present), 1)} or fewer, or use --split none / a split JSON")
    others = [c for c in cases if c.case_id not in listed]
    return Plan(
        labeled=train_present[:num_labeled], unlabeled=train_present[num_labeled:],
        test=test_present + others, skipped=[],
        rule=f"uamt: labeled = the first {num_labeled} of UA-MT's train.list among the cases present, "
             f"unlabeled = the other train.list cases, test = test.list and unlisted cases",
        missing={"train.list": [i for i in train_ids if i not in by_id],
                 "test.list": [i for i in test_ids if i not in by_id]})


def _plan_json(cases: list[Case], path: Path, input_dir: Path) -> Plan:
    split = read_split_json(path)
    by_id = {c.case_id: c for c in cases}
    absent = [i for key in SPLIT_KEYS for i in split[key] if i not in by_id]
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise UserInputError(f"{path}: case(s) {', '.join(absent[:5])}{more} are not under {input_dir}; "
                             f"remove them from the split file or add their case folders")
    named = {i for key in SPLIT_KEYS for i in split[key]}
    return Plan(
        labeled=[by_id[i] for i in split["labeled"]], unlabeled=[by_id[i] for i in split["unlabeled"]],
        test=[by_id[i] for i in split["test"]], skipped=[c for c in cases if c.case_id not in named],
        rule=f"split file {path}", missing={})


def make_plan(cases: list[Case], split: str, num_labeled: int, input_dir: Path) -> Plan:
    """The destinations by ``split``: ``"uamt"``, ``"none"`` or the path of a split JSON file.

    Raises:
        UserInputError: the split cannot be followed (too few cases, a bad split file, a labeled case without
            a label).
    """
    if split == "uamt":
        plan = _plan_uamt(cases, num_labeled, input_dir)
    elif split == "none":
        plan = Plan(labeled=[c for c in cases if c.has_label], unlabeled=[c for c in cases if not c.has_label],
                    test=[], skipped=[], rule="none: cases with a label are labeled, the others unlabeled",
                    missing={})
        if not plan.labeled:
            raise UserInputError(f"{input_dir}: no case has a label ({NRRD_LABEL} or 'label' in {H5_FILE}); "
                                 f"nnU-Net needs labeled training cases")
    else:
        plan = _plan_json(cases, Path(split), input_dir)
    for case in plan.labeled:
        if not case.has_label:
            where = case.folder / NRRD_LABEL if case.layout == "nrrd" else f"'label' in {case.image_path}"
            # with --split none only cases with a label are labeled, so this is uamt or a split file
            fix = ("choose the labeled cases with --split FILE.json"
                   if split == "uamt" else "move it to \"unlabeled\" in the split file")
            raise UserInputError(f"case {case.case_id} ({case.folder}) must be labeled but has no label (no "
                                 f"{where}); add its label, or {fix}")
    return plan
