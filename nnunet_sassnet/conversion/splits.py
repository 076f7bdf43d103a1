"""Split files: case lists (one ID a line, UA-MT's ``train.list``/``test.list``) and split JSON files
``{"labeled": [...], "unlabeled": [...], "test": [...]}``, read and checked in one place."""
from __future__ import annotations

import json
import os
from pathlib import Path

from nnunet_sassnet.errors import UserInputError, short_reason

__all__ = ["SPLIT_KEYS", "read_case_list", "read_split_json", "load_uamt_split"]

SPLIT_KEYS = ("labeled", "unlabeled", "test")
_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
_SPLIT_SHAPE = '{"labeled": [...], "unlabeled": [...], "test": [...]}'


def read_case_list(path: str | os.PathLike) -> list[str]:
    """The case IDs of a list file, one a line, in file order; blank lines and surrounding spaces ignored.

    Raises:
        UserInputError: the file cannot be read, names a case twice or names none.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: cannot read the case list ({short_reason(e)}); pass a text file with "
                             f"one case ID a line") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise UserInputError(f"{path}: the case list is empty; write one case ID a line")
    seen: set[str] = set()
    for case_id in ids:
        if case_id in seen:
            raise UserInputError(f"{path}: case {case_id} is listed twice; list each case once")
        seen.add(case_id)
    return ids


def read_split_json(path: str | os.PathLike) -> dict[str, list[str]]:
    """The split of a JSON file ``{"labeled": [...], "unlabeled": [...], "test": [...]}``.

    Returns every key of :data:`SPLIT_KEYS`, in that order; an absent "unlabeled" or "test" is an empty list.

    Raises:
        UserInputError: the file is unreadable or not such an object, has other keys, lacks a non-empty
            "labeled" list, holds something else than lists of non-empty strings, or names a case twice.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserInputError(f"{path}: cannot read the split file ({short_reason(e)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: not valid JSON ({short_reason(e)}); expected {_SPLIT_SHAPE}") from None
    if not isinstance(content, dict):
        raise UserInputError(f"{path}: expected a JSON object {_SPLIT_SHAPE}, found {type(content).__name__}")
    unknown = sorted(set(content) - set(SPLIT_KEYS))
    if unknown:
        raise UserInputError(f"{path}: unknown key(s) {unknown}; the split file has the keys "
                             f"{list(SPLIT_KEYS)} only")
    if "labeled" not in content:
        raise UserInputError(f"{path}: no \"labeled\" list; nnU-Net needs labeled training cases")
    split: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for key in SPLIT_KEYS:
        ids = content.get(key, [])
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise UserInputError(f"{path}: \"{key}\" must be a list of case IDs (strings)")
        for case_id in ids:
            if case_id in owner:
                raise UserInputError(f"{path}: case {case_id} is listed twice (in \"{owner[case_id]}\" and "
                                     f"\"{key}\"); list each case once")
            owner[case_id] = key
        split[key] = ids
    if not split["labeled"]:
        raise UserInputError(f"{path}: the \"labeled\" list is empty; nnU-Net needs labeled training cases")
    return split


def load_uamt_split() -> tuple[list[str], list[str]]:
    """UA-MT's split as shipped with the package: (train.list IDs in order, test.list IDs)."""
    return read_case_list(_DATA_DIR / "uamt_train.list"), read_case_list(_DATA_DIR / "uamt_test.list")
