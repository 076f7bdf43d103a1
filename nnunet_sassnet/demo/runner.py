"""Running the demo's stages: command-line tools in subprocesses with their output in a log file, progress
bars drawn from that output, and one line per finished stage."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from nnunet_sassnet import nnunet_tools as tools

__all__ = ["StageFailed", "Stages", "run_tool", "TqdmMirror", "TrainingProgress", "CaseCounter"]


class StageFailed(Exception):
    """A stage did not finish; the message is one line, ``details`` the end of its log."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def show_bars() -> bool:
    """Progress bars only on a terminal: in a log file their carriage-return updates are noise."""
    return sys.stderr.isatty()


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}" if minutes else f"{seconds:.1f} s"


class Stages:
    """Numbers the stages and prints one line per finished stage with its time and the time so far."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._stage_start = self.start

    def finish(self, message: str) -> None:
        self.done += 1
        now = time.perf_counter()
        print(f"[{self.done}/{self.total}] {message} ({format_seconds(now - self._stage_start)}, "
              f"total {format_seconds(now - self.start)})", flush=True)
        self._stage_start = now

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------- progress

class TqdmMirror:
    """Redraws the tqdm bars of a child process (``desc: 40%|###   | 4/10 [...]``) as one bar here."""

    _pattern = re.compile(r"^(?P<desc>[^|]*?):?\s*\d+%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+)")

    def __init__(self, fallback_desc: str):
        self.fallback_desc = fallback_desc
        self.bar: tqdm | None = None
        self._key: tuple[str, int] | None = None

    def __call__(self, fragment: str) -> None:
        match = self._pattern.match(fragment.strip())
        if match is None:
            return
        desc = match.group("desc").strip() or self.fallback_desc
        n, total = int(match.group("n")), int(match.group("total"))
        if self.bar is None or self._key != (desc, total):
            self.close()
            self.bar = tqdm(total=total, desc=desc, leave=False, disable=not show_bars())
            self._key = (desc, total)
        self.bar.n = n
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainingProgress:
    """Epoch bar for ``nnUNetv2_train`` from its log lines, with the loss and nnU-Net's pseudo Dice."""

    def __init__(self, num_epochs: int):
        self.bar = tqdm(total=num_epochs, desc="Training", unit="epoch", leave=False, disable=not show_bars())
        self.train_loss: float | None = None
        self.pseudo_dice: float | None = None
        self.validation_dice: float | None = None
        self.epochs_done = 0

    @staticmethod
    def _numbers(text: str) -> list[float]:
        # nnU-Net prints numpy scalars, e.g. "Pseudo dice [np.float32(0.8123)]"
        return [float(v) for v in re.findall(r"(?<![\w.])-?\d+\.\d+(?:e-?\d+)?", text)]

    def __call__(self, fragment: str) -> None:
        # nnU-Net's lines start with a timestamp: "2025-01-01 12:00:00.000000: train_loss -0.5"
        text = fragment.split(": ", 1)[1] if re.match(r"^\d{4}-\d\d-\d\d ", fragment) else fragment
        if text.startswith("train_loss"):
            self.train_loss = self._numbers(text)[0]
        elif text.startswith("Pseudo dice"):
            values = self._numbers(text)
            self.pseudo_dice = sum(values) / len(values) if values else None
        elif text.startswith("Epoch time"):
            self.epochs_done += 1
            self.bar.update()
            postfix = {}
            if self.train_loss is not None:
                postfix["loss"] = f"{self.train_loss:.3f}"
            if self.pseudo_dice is not None:
                postfix["pseudo Dice"] = f"{self.pseudo_dice:.3f}"
            self.bar.set_postfix(postfix, refresh=True)
        elif text.startswith("Training done"):
            self.bar.set_description("Final validation")
        elif text.startswith("Mean Validation Dice"):
            values = self._numbers(text)
            self.validation_dice = values[0] if values else None

    def close(self) -> None:
        self.bar.close()


class CaseCounter:
    """Bar over cases for tools that print one line per case (``nnUNetv2_predict``: "Predicting CASE:")."""

    def __init__(self, pattern: str, total: int, desc: str):
        self.pattern = re.compile(pattern)
        self.bar = tqdm(total=total, desc=desc, unit="case", leave=False, disable=not show_bars())
        self.started = 0

    def __call__(self, fragment: str) -> None:
        if self.pattern.search(fragment):
            # a case is done when the next one starts; the last one when the tool ends
            if self.started:
                self.bar.update()
            self.started += 1

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------- subprocesses

def run_tool(cmd: Sequence[str], env: dict[str, str], log_file: Path, on_output: Callable[[str], None] | None = None,
             cwd: Path | None = None) -> None:
    """Run a command; its output goes to ``log_file`` (appended) and, fragment by fragment, to ``on_output``.

    Raises :class:`StageFailed` with the end of the log when the command fails or cannot be started.
    """
    try:
        result = tools.run_tool(cmd, env, log_file, cwd=cwd, append=True, on_output=on_output, tail_lines=25)
    except FileNotFoundError:
        raise StageFailed(f"{cmd[0]} not found: is nnunet-sassnet installed in this Python environment "
                          f"(pip install -e .)?") from None
    if not result.ok:
        # tqdm's last redraws repeat themselves in the tail; keep the lines that say something
        lines = [t for t in result.tail if not TqdmMirror._pattern.match(t.strip())]
        raise StageFailed(f"{os.path.basename(cmd[0])} failed ({result.error}); its log: {log_file}",
                          details="\n".join(lines[-15:]))
