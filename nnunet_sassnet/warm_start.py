"""Starting nnU-Net's commands from a warm process: a fork server that has torch and the other heavy libraries
imported already, so that a command starts in about a second instead of ten.

Each command still runs in a process of its own, in its own session (process group), with its own
environment, working folder and ``sys.argv``, through the same entry function as its console script; only the
third-party libraries that read no nnU-Net setting are imported before the fork. nnU-Net itself
(``nnunetv2.paths`` reads ``nnUNet_raw`` and the other folders when imported) and this package are imported in
the command's own process, after its environment is set.

Opt-in with ``NNUNET_SASSNET_WARM_START=1`` (the test suite sets it: dozens of tiny commands, each of which
would otherwise spend ten seconds importing torch, nnU-Net and matplotlib on two cores); a training of hours
gains nothing from it. The fork server never touches a GPU: CUDA starts in the command's own process.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import multiprocessing
import os
import re
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Mapping, Sequence

#: the switch (an environment variable, so that the demo's and the benchmark's own processes inherit it)
ENV_VARIABLE = "NNUNET_SASSNET_WARM_START"

#: imported by the fork server: libraries that nnU-Net's commands import and that read no nnU-Net setting
PRELOAD = ("torch", "torch._dynamo", "torch.nn.functional", "numpy", "scipy.ndimage", "matplotlib",
           "matplotlib.pyplot", "seaborn", "SimpleITK", "blosc2", "batchgenerators.dataloading.data_loader",
           "batchgeneratorsv2.transforms.base.basic_transform", "dynamic_network_architectures.architectures.unet",
           "acvl_utils.cropping_and_padding.bounding_boxes", "pandas", "sklearn.model_selection", "tqdm")

_context: multiprocessing.context.ForkServerContext | None = None
_lock = threading.Lock()


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether commands are to start warm: the switch is on (in ``env``, default this process's environment)."""
    value = (os.environ if env is None else env).get(ENV_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on") and "fork" in multiprocessing.get_all_start_methods()


def entry_of(cmd: Sequence[str]) -> tuple[str, str, list[str]] | None:
    """``(module, function, argv)`` of a command line that names a console script installed for this
    interpreter (``["nnUNetv2_train", ...]``) or that :func:`nnunet_tools.entry_command` made, else None (such
    a command starts as a plain process)."""
    if len(cmd) == 3 and cmd[0] == sys.executable and cmd[1] == "-c":
        return _parse_entry_command(cmd[2])
    if not cmd or os.sep in cmd[0]:
        return None
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    if cmd[0] not in scripts or ":" not in scripts[cmd[0]]:
        return None
    module, function = scripts[cmd[0]].split(":", 1)
    return module, function.strip(), [str(a) for a in cmd[1:]]


def _parse_entry_command(code: str) -> tuple[str, str, list[str]] | None:
    from nnunet_sassnet.nnunet_tools import ENTRY_COMMAND_PATTERN

    match = re.fullmatch(ENTRY_COMMAND_PATTERN, code)
    if match is None:
        return None
    argv = ast.literal_eval(match["argv"])
    return match["module"], match["function"], [str(a) for a in argv[1:]]


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            available = [name for name in PRELOAD if importlib.util.find_spec(name.split(".")[0]) is not None]
            context.set_forkserver_preload(available)
            _context = context
        return _context


def start_early(env: Mapping[str, str] | None = None) -> None:
    """Start the fork server now, where warm starts are on (in ``env``): it imports :data:`PRELOAD` in its own
    process while the caller goes on with other work, instead of when the first command starts."""
    if enabled(env):
        from multiprocessing import forkserver

        _server()
        forkserver.ensure_running()


class WarmProcess:
    """A command started by the fork server, with the part of ``subprocess.Popen`` that ``run_tool`` and its
    callers use: ``pid`` (the leader of the command's own process group), ``stdout`` (its output, stderr
    included), ``poll()``, ``wait(timeout)`` and ``returncode`` (-N where signal N ended it)."""

    def __init__(self, module: str, function: str, argv: Sequence[str], env: Mapping[str, str],
                 cwd: str | Path | None):
        context = _server()
        read, write = context.Pipe(duplex=False)
        # not daemonic: a daemonic process may not start processes, and nnU-Net's commands do
        self._process = context.Process(target=_run_entry, args=(module, function, list(argv), dict(env),
                                                                  None if cwd is None else str(cwd), write))
        with _lock:
            _start_without_main(self._process)
        # Only the reaper thread below reads the command's exit status. multiprocessing's list of children would let
        # any thread's next Process.start() read it too (its clean-up polls every child): when both read at once, one
        # gets the status and the other end-of-file, which multiprocessing reports as exit status 255 and keeps.
        # Out of that list, a running command no longer holds up the interpreter's exit; run_tool stops the commands
        # it leaves behind.
        children = getattr(multiprocessing.process, "_children", None)
        if children is not None:
            children.discard(self._process)
        write.close()  # the command (and the processes it starts) hold the only writing ends now
        self.stdout = os.fdopen(os.dup(read.fileno()), "rb")
        read.close()
        self.pid = self._process.pid
        self.returncode: int | None = None
        # one thread reaps the process; wait() from any thread (the caller's, a time limit's) reads its result
        self._done = threading.Event()
        threading.Thread(target=self._reap, daemon=True, name=f"warm-{self.pid}").start()

    def _reap(self) -> None:
        self._process.join()
        self.returncode = self._process.exitcode
        self._done.set()

    def poll(self) -> int | None:
        """The exit status, or None while the command runs."""
        return self.returncode if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"warm process {self.pid}", timeout)
        return self.returncode


def _start_without_main(process) -> None:
    """Start ``process`` without multiprocessing's re-import of the caller's ``__main__`` in the child: that
    would run the caller's module (pytest's, the benchmark's) and could import nnU-Net before the command's
    environment is set."""
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def without_main(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = without_main
    try:
        process.start()
    finally:
        spawn.get_preparation_data = original


def _run_entry(module: str, function: str, argv: list[str], env: dict[str, str], cwd: str | None, output) -> None:
    """In the forked process: become the command (session, output, environment, folder, argv) and run it."""
    os.setsid()
    fd = output.fileno()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    output.close()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout.reconfigure(write_through=True)
    sys.stderr.reconfigure(write_through=True)
    os.environ.clear()
    os.environ.update(env)
    _apply_startup_file()
    if cwd is not None:
        os.chdir(cwd)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))  # the fork server's OpenMP read its own environment
    sys.argv = [function, *argv]
    try:
        result = getattr(importlib.import_module(module), function)()
    except SystemExit:
        raise
    except BaseException:
        # as the interpreter would: the installed excepthook decides what is printed, then exit status 1
        sys.excepthook(*sys.exc_info())
        raise SystemExit(1) from None
    raise SystemExit(result if isinstance(result, int) else 0)


def _apply_startup_file() -> None:
    """What this package's startup file does in a fresh interpreter: it ran in the fork server, whose
    environment the command's replaced. Its line is run as Python's ``site`` runs it (with ``sitedir``)."""
    import site

    from nnunet_sassnet.discovery import STARTUP_FILE

    for folder in [*site.getsitepackages(), site.getusersitepackages()]:
        startup = Path(folder) / STARTUP_FILE
        if startup.is_file():
            for line in startup.read_text().splitlines():
                if line.startswith("import"):
                    exec(line, {"sitedir": folder})
            return
