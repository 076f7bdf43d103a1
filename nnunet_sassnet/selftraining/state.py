"""The record of one self-training round: a small JSON file in the student's raw dataset folder.

It says what the round is (its identity: the labeled dataset, the teacher model and folds, the student trainer,
the plans and the pseudo-label options), which steps are done and how long each took, and, per unlabeled case,
the teacher's confidence and whether the case became a pseudo-labeled training case. A step is recorded as done
only once everything it writes is complete, so a rerun after a kill starts at the first step not recorded and
never redoes a finished one; ``--force`` deletes the round and starts it again.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from nnunet_sassnet.atomic_files import write_json_atomic
from nnunet_sassnet.errors import UserInputError

__all__ = ["STATE_FILE", "STATE_FORMAT", "STEPS", "RoundState", "find_rounds"]

#: the record's name in the student's raw dataset folder
STATE_FILE = "selftraining.json"
STATE_FORMAT = 1
#: the steps of a round, in order (``fine_tune`` only with a fine-tuning trainer)
STEPS = ("teacher", "pseudo_labels", "dataset", "student", "fine_tune")


@dataclass
class RoundState:
    """One round's record (see the module docstring); :meth:`save` after every change."""

    folder: Path  # the student's raw dataset folder
    identity: dict[str, Any]
    round: int
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # teacher and student models, folds trained here

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    @classmethod
    def load(cls, folder: Path) -> "RoundState | None":
        """The record in ``folder``; None where there is none or it is not this command's."""
        try:
            doc = json.loads((folder / STATE_FILE).read_text())
            if doc.get("format") != STATE_FORMAT:
                return None
            return cls(folder=folder, identity=doc["identity"], round=int(doc["round"]), steps=doc.get("steps", {}),
                       cases=doc.get("cases", {}), details=doc.get("details", {}))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"{folder / STATE_FILE}: not readable ({type(e).__name__}: {e}); it records a "
                                 f"self-training round: restore it, or delete {folder} and its nnU-Net folders to "
                                 f"start that round again") from None

    def save(self) -> None:
        write_json_atomic(self.path, {"format": STATE_FORMAT, "made_by": "nnunet_sassnet_selftrain",
                                      "round": self.round, "identity": self.identity, "details": self.details,
                                      "steps": self.steps, "cases": self.cases})

    @property
    def redo(self) -> str | None:
        """Why the round must be done again (its teacher's weights were deleted), else None."""
        return self.details.get("redo")

    def mark_redo(self, reason: str) -> None:
        """No step stays "done": the weights it was done with are gone; the next run of the round redoes it."""
        for record in self.steps.values():
            if record.get("status") == "done":
                record["status"] = "redo"
        self.details["redo"] = reason
        self.save()

    def done(self, step: str) -> bool:
        return self.steps.get(step, {}).get("status") == "done"

    def start(self, step: str) -> None:
        """Record that ``step`` runs now (``seconds`` will be those of this attempt; ``attempts`` counts them)."""
        record = self.steps.setdefault(step, {})
        record.update(status="running", started=time.time(), attempts=record.get("attempts", 0) + 1)
        self.save()

    def finish(self, step: str) -> None:
        record = self.steps[step]
        record.update(status="done", finished=time.time())
        record["seconds"] = round(record["finished"] - record["started"], 2)
        self.save()

    def fold_done(self, step: str, fold: str) -> bool:
        return fold in self.steps.get(step, {}).get("folds_done", [])

    def finish_fold(self, step: str, fold: str) -> None:
        self.steps[step].setdefault("folds_done", []).append(fold)
        self.save()


def find_rounds(raw: Path) -> Iterator[RoundState]:
    """Every round recorded in the datasets of ``raw`` (nnUNet_raw)."""
    if not raw.is_dir():
        return
    for folder in sorted(raw.iterdir()):
        if folder.name.startswith("Dataset") and (folder / STATE_FILE).is_file():
            state = RoundState.load(folder)
            if state is not None:
                yield state
