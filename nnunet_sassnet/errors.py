"""The error type for mistakes a user can fix: the command-line tools print its message in one line."""
from __future__ import annotations

import sys
import threading
from typing import Callable


class UserInputError(Exception):
    """Bad input: the message names the file or case and says how to fix it."""

    def one_line(self) -> str:
        """The message on one line (texts of wrapped library errors can span several)."""
        return " ".join(str(self).split())


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The last line of a library error's text, at most ``limit`` characters (ITK and HDF5 messages span
    several lines), for the parenthesis of a :class:`UserInputError` message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(main: Callable[[], int]) -> int:
    """Run a command's body; a :class:`UserInputError` becomes ``error: ...`` on stderr and exit code 2."""
    try:
        return main()
    except UserInputError as e:
        print(f"error: {e.one_line()}", file=sys.stderr)
        return 2


def _quiet_after_the_error(args) -> None:
    """``threading.excepthook`` once a :class:`UserInputError` has been reported and the process is ending."""


def install_excepthook() -> None:
    """Print an uncaught :class:`UserInputError` as one ``error: ...`` line instead of a traceback.

    nnU-Net's own commands (``nnUNetv2_train``) call our trainers; this keeps their bad-input messages as
    readable as those of our commands. Other exceptions keep Python's traceback. Exit code stays 1.
    """
    previous = sys.excepthook
    if getattr(previous, "_nnunet_sassnet", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, UserInputError):
            print(f"error: {exc.one_line()}", file=sys.stderr)
            # the process ends now: nnU-Net's augmenters' background threads, which see their worker processes
            # stopped at exit ("One or more background workers are no longer alive"), would each add a traceback
            # after the one line
            threading.excepthook = _quiet_after_the_error
        else:
            previous(exc_type, exc, tb)

    hook._nnunet_sassnet = True
    sys.excepthook = hook
