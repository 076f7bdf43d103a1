"""What a preprocessed unlabeled case looked like when it was written, and whether it still does.

When a version is written, its stamp file records for every case file its size, a SHA-256 of its whole content and
a SHA-256 of a few sampled blocks (:func:`case_records`). Two checks use them:

* before training (:func:`damaged_cases`): sizes, the sampled blocks and the damage notes left by training runs.
  A few small reads per file, whatever its size: cheap enough for every training start, even with 1,000 cases;
* while training, each time the data loader draws a case, just before nnU-Net reads it (:func:`check_case`): the
  whole content against its SHA-256, so that damage anywhere in a file, also damage written after the case was
  read once, is found before the case is trained on (blosc2 decodes a garbled file without an error). A case
  that fails is left out of that run and noted for repair (:func:`note_damaged`): a ``<case>.damaged`` file in
  the version, which the next preprocessing run (a training's start or ``nnunet_sassnet_preprocess_unlabeled``)
  reads, preprocesses the case again and removes.

The costs of both are measured in ``benchmarks/unlabeled_check_cost.py`` (figures in docs/bad_input.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

from nnunet_sassnet.unlabeled.cases import CASE_FILE_SUFFIXES, STAMP_FILE

__all__ = ["DAMAGE_NOTE_SUFFIX", "file_record", "case_records", "load_records", "damaged_cases", "check_case",
           "note_damaged", "clear_damage_notes"]

#: the sampled blocks: this many, of this size, spread evenly from the start to the end of the file
SAMPLED_BLOCKS = 5
SAMPLED_BLOCK_BYTES = 16 * 1024
_READ_BYTES = 1024 ** 2
DAMAGE_NOTE_SUFFIX = ".damaged"


def _sampled_ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the sampled blocks of a file of ``size`` bytes (all of it when it is small)."""
    if size <= SAMPLED_BLOCKS * SAMPLED_BLOCK_BYTES:
        return [(0, size)]
    step = (size - SAMPLED_BLOCK_BYTES) / (SAMPLED_BLOCKS - 1)
    return [(round(i * step), SAMPLED_BLOCK_BYTES) for i in range(SAMPLED_BLOCKS)]


def _sampled_sha256(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset, length in _sampled_ranges(size):
            digest.update(os.pread(f.fileno(), length, offset))
    return digest.hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str) -> dict:
    """Size, SHA-256 and sampled-blocks SHA-256 of one file, as the stamp file records them."""
    size = os.path.getsize(path)
    return {"size": size, "sha256": _sha256(path), "sampled_sha256": _sampled_sha256(path, size)}


def case_records(folder: str, cases) -> dict[str, dict]:
    """File name -> :func:`file_record` for every file of ``cases`` in ``folder``."""
    return {case + suffix: file_record(os.path.join(folder, case + suffix))
            for case in sorted(cases) for suffix in CASE_FILE_SUFFIXES}


def load_records(folder: str) -> dict[str, dict]:
    """The records of the stamp file in ``folder`` (empty when it has none or cannot be read)."""
    try:
        with open(os.path.join(folder, STAMP_FILE)) as f:
            return json.load(f).get("files") or {}
    except (OSError, ValueError):
        return {}


def _size_problem(path: str, record: dict | None) -> str | None:
    if record is None:
        return "not recorded in the stamp file"
    if os.path.isdir(path):
        return "a folder, not a file"
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    return None if size == record["size"] else f"{size} bytes, {record['size']} bytes written"


def _file_problem(path: str, record: dict | None, whole: bool) -> str | None:
    """What is wrong with ``path`` by its size and its sampled blocks (``whole``: its whole content), or None."""
    problem = _size_problem(path, record)
    if problem is not None:
        return problem
    try:
        same = _sha256(path) == record["sha256"] if whole else \
            _sampled_sha256(path, record["size"]) == record["sampled_sha256"]
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None if same else "content differs from what was written"


def _damage_notes(folder: str) -> dict[str, str]:
    """Case -> the reason a training run noted for it."""
    notes = {}
    for name in os.listdir(folder):
        if name.endswith(DAMAGE_NOTE_SUFFIX):
            with contextlib.suppress(OSError):
                with open(os.path.join(folder, name)) as f:
                    notes[name[:-len(DAMAGE_NOTE_SUFFIX)]] = f.read().strip()
    return notes


def damaged_cases(folder: str, cases, records: dict[str, dict]) -> dict[str, str]:
    """Case -> what is wrong with it: a damage note, or a file whose size or sampled blocks differ from
    ``records``. The check before training (see the module)."""
    notes = _damage_notes(folder)
    damaged = {}
    for case in sorted(cases):
        if case in notes:
            damaged[case] = f"case {case} (found damaged while training: {notes[case]})"
            continue
        for suffix in CASE_FILE_SUFFIXES:
            name = case + suffix
            problem = _file_problem(os.path.join(folder, name), records.get(name), whole=False)
            if problem is not None:
                damaged[case] = f"case {case} ({name}: {problem})"
                break
    return damaged


def check_case(folder: str, case: str, records: dict[str, dict]) -> str | None:
    """What is wrong with the files of ``case`` by their whole content, or None. The check while training."""
    for suffix in CASE_FILE_SUFFIXES:
        name = case + suffix
        problem = _file_problem(os.path.join(folder, name), records.get(name), whole=True)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def note_damaged(folder: str, case: str, reason: str) -> str:
    """Note ``case`` for repair by the next preprocessing run: "noted", "noted already" (by another process of
    the loader), or why it cannot be noted (a folder this process may not write)."""
    try:
        fd = os.open(os.path.join(folder, case + DAMAGE_NOTE_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return "noted already"
    except OSError as e:
        return f"cannot be noted for repair here ({e.strerror})"
    with os.fdopen(fd, "w") as f:
        f.write(reason)
    return "noted"


def clear_damage_notes(folder: str, cases) -> None:
    """Remove the damage notes of ``cases`` (they have just been preprocessed again)."""
    for case in cases:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, case + DAMAGE_NOTE_SUFFIX))
