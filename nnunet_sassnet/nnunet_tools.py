"""Running nnU-Net's tools from Python: their environment variables, and each tool as a logged subprocess.

One place for what the demo, the benchmarks and the tests need alike: nnU-Net's folders and trainer lookup in
a subprocess's environment (never in the caller's own ``os.environ``), a command line for a tool that also
works where nnU-Net's console scripts are not on ``PATH`` (``pip install --target``), and a subprocess runner
with a log file, a time limit and a clean stop of the tool's worker processes.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from nnunet_sassnet import warm_start

__all__ = ["ENTRY_POINTS", "tool_command", "entry_command", "nnunet_environment", "usable_cores",
           "cap_torch_threads", "ToolRun", "run_tool", "stop_process_group", "log_tail"]

#: the console scripts that the project starts, as ``module:function`` (the same as their installed scripts)
ENTRY_POINTS: dict[str, str] = {
    "nnUNetv2_plan_and_preprocess":
        "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry",
    "nnUNetv2_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:preprocess_entry",
    "nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
    "nnunet_sassnet_preprocess_unlabeled": "nnunet_sassnet.unlabeled:preprocess_unlabeled_entry",
}


def entry_command(module: str, function: str, argv: Iterable[object]) -> list[str]:
    """A command line that runs ``module.function`` with this interpreter and ``argv`` as its ``sys.argv[1:]``.

    The entry functions read ``sys.argv`` like the console scripts do, so this is the script without needing
    it on ``PATH``.
    """
    code = (f"import sys; sys.argv = {[function, *map(str, argv)]!r}; from {module} import {function} as f; "
            f"r = f(); sys.exit(r if isinstance(r, int) else 0)")
    return [sys.executable, "-c", code]


#: what :func:`entry_command` writes after ``-c`` (read back by :mod:`nnunet_sassnet.warm_start`)
ENTRY_COMMAND_PATTERN = (r"import sys; sys\.argv = (?P<argv>\[.*\]); from (?P<module>[\w.]+) import "
                         r"(?P<function>\w+) as f; r = f\(\); sys\.exit\(r if isinstance\(r, int\) else 0\)")


def tool_command(tool: str, argv: Iterable[object]) -> list[str]:
    """The command line of a console script of :data:`ENTRY_POINTS`, run through its entry function."""
    module, function = ENTRY_POINTS[tool].split(":")
    return entry_command(module, function, argv)


def nnunet_environment(raw: str | Path, preprocessed: str | Path, results: str | Path, *,
                       base: Mapping[str, str] | None = None, trainer_dirs: Sequence[str | Path] = (),
                       compile: bool = False, data_workers: int | None = None,
                       default_workers: int | None = None, threads: int | None = None,
                       make_folders: bool = True) -> dict[str, str]:
    """The environment of an nnU-Net subprocess: ``base`` (default ``os.environ``) plus nnU-Net's variables.

    ``trainer_dirs`` come before this package's trainer folder in ``nnUNet_extTrainer``; ``data_workers`` is
    ``nnUNet_n_proc_DA`` (0: augmentation inside the training process; nnU-Net's planner needs at least 1),
    ``default_workers`` is ``nnUNet_def_n_proc``, and ``threads`` caps the math libraries' threads, because
    concurrent processes would otherwise each start one thread per core.
    """
    from nnunet_sassnet.discovery import trainer_dir

    env = dict(os.environ if base is None else base)
    env.update({
        "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed), "nnUNet_results": str(results),
        "nnUNet_extTrainer": os.pathsep.join([*map(str, trainer_dirs), trainer_dir()]),
        # stated either way: nnU-Net would otherwise decide by itself, and compiling costs a minute per process
        "nnUNet_compile": "t" if compile else "f",
        # progress lines reach the log as they are printed, not when a buffer fills
        "PYTHONUNBUFFERED": "1",
    })
    if data_workers is not None:
        env["nnUNet_n_proc_DA"] = str(data_workers)
    if default_workers is not None:
        env["nnUNet_def_n_proc"] = str(default_workers)
    if threads is not None:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(threads)
    if make_folders:
        for folder in (raw, preprocessed, results):
            Path(folder).mkdir(parents=True, exist_ok=True)
    return env


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform reports it, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS / Windows
        return max(1, os.cpu_count() or 1)


def cap_torch_threads() -> int:
    """Keep torch within ``OMP_NUM_THREADS``; returns the thread count now in use.

    ``nnUNetv2_train`` and ``nnUNetv2_predict`` with ``-device cpu`` set one torch thread per core whatever
    ``OMP_NUM_THREADS`` says, so two CPU runs side by side each run one thread per core: two processes on two
    cores took 1.6 and 3.0 times as long with two threads each as with one (``benchmarks/concurrent_threads.py``).
    Only ever lowers the count (on the GPU nnU-Net already uses one thread); without the variable nothing changes.
    """
    import torch

    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and 0 < int(value) < torch.get_num_threads():
        torch.set_num_threads(int(value))
    return torch.get_num_threads()


@dataclass
class ToolRun:
    """The outcome of :func:`run_tool`."""

    cmd: list[str]
    returncode: int | None
    seconds: float
    log_file: Path | None
    timed_out: bool = False
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def error(self) -> str:
        """One phrase for a failed run: why it ended."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        return "" if self.ok else f"exit code {self.returncode}"


def run_tool(cmd: Sequence[str], env: Mapping[str, str], log_file: Path | None = None, *,
             timeout: float | None = None, cwd: Path | None = None, append: bool = False,
             on_output: Callable[[str], None] | None = None,
             on_start: Callable[[subprocess.Popen], None] | None = None, tail_lines: int = 40) -> ToolRun:
    """Run ``cmd`` with its output (stdout and stderr) in ``log_file``; stop it after ``timeout`` seconds.

    The tool gets a process group of its own, so that a time limit or an interrupt also stops the worker
    processes it started (nnU-Net's augmentation and preprocessing workers). ``on_output`` receives the output
    fragment by fragment, split at newlines and carriage returns, so that a child's tqdm updates arrive as they
    happen; ``on_start`` receives the process (to stop it from elsewhere with :func:`stop_process_group`).
    A command that cannot be started raises ``FileNotFoundError``; any other failure is in the result.
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    log = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_file, "ab" if append else "wb")
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
    start = time.monotonic()
    timed_out = threading.Event()
    try:
        entry = warm_start.entry_of(cmd) if warm_start.enabled(env) else None
        if entry is not None:
            process = warm_start.WarmProcess(*entry, env=env, cwd=cwd)
        else:
            process = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        if log is not None:
            log.close()
        raise

    def on_timeout() -> None:
        timed_out.set()
        stop_process_group(process)

    timer = threading.Timer(timeout, on_timeout) if timeout is not None else None
    try:
        if on_start is not None:
            on_start(process)
        if timer is not None:
            timer.daemon = True
            timer.start()
        pending = b""
        while True:
            chunk = process.stdout.read1(65536)  # a pipe: stdout=PIPE above
            if not chunk:
                break
            if log is not None:
                log.write(chunk)
                log.flush()
            pending += chunk
            *fragments, pending = re.split(rb"[\r\n]", pending)
            for raw in fragments:
                _emit(raw, tail, on_output)
        _emit(pending, tail, on_output)
        returncode = process.wait()
    except BaseException:
        # Ctrl-C or an error here: leave no tool running behind the caller's back
        stop_process_group(process)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if log is not None:
            log.close()
    return ToolRun(list(cmd), returncode, time.monotonic() - start, log_file, timed_out=timed_out.is_set(),
                   tail=list(tail))


def _emit(raw: bytes, tail: deque[str], on_output: Callable[[str], None] | None) -> None:
    text = raw.decode(errors="replace")
    if text.strip():
        tail.append(text)
        if on_output is not None:
            on_output(text)


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group that ``process`` leads, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            # a warm-started command may not lead its group yet (it calls setsid first thing): the process
            try:
                os.kill(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, indented (for error messages)."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text)
