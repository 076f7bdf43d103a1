"""The benchmark's state while it runs: folders, subprocesses with their time limits, order of the runs,
the results document of this call, and its stop on an interrupt or the time limit."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nnunet_sassnet import nnunet_tools as tools
from nnunet_sassnet.atomic_files import write_text_atomic

from benchmarks.la_semisup.settings import Settings

MAX_TMPDIR_LENGTH = 60  # + multiprocessing's socket names (~40 characters) < the 108 of a Unix socket path


@dataclass
class StepResult:
    """The outcome of one tool run by :meth:`Supervisor.run_step`."""

    ok: bool
    seconds: float
    log: Path
    timed_out: bool = False
    error: str = ""


class OrderedSlots:
    """At most ``n`` trainings at once, started in queue order (ticket by ticket)."""

    def __init__(self, n: int):
        self.free, self.next_ticket = n, 0
        self.cond = threading.Condition()

    def acquire(self, ticket: int, give_up: threading.Event) -> bool:
        """Wait for this ticket's turn and a free slot; False when ``give_up`` is set first."""
        with self.cond:
            self.cond.wait_for(lambda: give_up.is_set() or (self.next_ticket == ticket and self.free > 0))
            self.pass_turn(ticket)
            if give_up.is_set():
                return False
            self.free -= 1
            return True

    def pass_turn(self, ticket: int) -> None:
        """Let the next ticket go (also for a run that takes no slot)."""
        with self.cond:
            self.next_ticket = max(self.next_ticket, ticket + 1)
            self.cond.notify_all()

    def release(self) -> None:
        with self.cond:
            self.free += 1
            self.cond.notify_all()


class Supervisor:
    """State shared by the stages: settings, folders, environment, the results document and live processes."""

    def __init__(self, s: Settings, ext_dirs: list[str]):
        self.s = s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + s.time_limit if s.time_limit > 0 else None
        # datasets at the top of the work folder (seed-independent, reusable); everything else per call
        w, r = s.workdir, s.run_dir
        self.raw, self.preprocessed, self.prepared = w / "nnUNet_raw", w / "nnUNet_preprocessed", w / "prepared"
        self.logs, self.runs_dir, self.cache = r / "logs", r / "runs", w / "cache"
        # multiprocessing puts Unix sockets into TMPDIR, whose paths may not exceed ~100 characters: a deep work
        # folder keeps the system's temporary folder (the sockets are removed with their processes)
        self.tmp = w / "tmp" if len(str(w / "tmp")) <= MAX_TMPDIR_LENGTH else None
        for folder in (self.raw, self.preprocessed, self.prepared, self.logs, self.runs_dir, self.cache,
                       *([self.tmp] if self.tmp else [])):
            folder.mkdir(parents=True, exist_ok=True)
        self.ext_dirs = ext_dirs
        self.runs = list(s.runs)  # the runs this call trains (a queue's runs not yet in the ledger)
        self.bases = ""  # LA_SEMISUP_BASES, set once the trainers are resolved
        self.lock = threading.RLock()
        self.print_lock = threading.Lock()
        self.processes: dict[int, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.slots = OrderedSlots(s.concurrency)
        self.doc: dict[str, Any] = {}
        self.stages: list[dict[str, Any]] = []
        self.on_write: Callable[[], None] | None = None  # renders the tables; set by the caller
        self.on_run_finished: Callable[[Any, dict[str, Any]], None] | None = None  # the ledger's; set by the caller
        # readiness of the prepared data ("semi", "all", "unlabeled"; "semi4", "unlabeled4" for a budget of 4
        # labeled scans): a run starts as soon as its data is there
        self.events = {key: threading.Event() for key in ("semi", "all", "unlabeled")}
        self.state: dict[str, tuple[bool, str]] = {}

    def expect(self, keys: list[str]) -> None:
        """Readiness events for the data ``keys`` (before any thread waits for them or sets them)."""
        for key in keys:
            self.events.setdefault(key, threading.Event())

    def wait_for(self, keys: list[str]) -> tuple[bool, str]:
        """Wait until the data ``keys`` are prepared; (False, why) when one failed or the benchmark stopped."""
        for key in keys:
            self.events[key].wait()
            ok, why = self.state.get(key, (False, "interrupted"))
            if not ok or self.stopping.is_set():
                return False, why or "interrupted"
        return True, ""

    # ---- output ---------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, message: str) -> None:
        with self.print_lock:
            print(f"[{self.elapsed():7.1f} s] {message}", flush=True)

    def record_stage(self, name: str, start: float, end: float, status: str) -> None:
        with self.lock:
            self.stages.append({"stage": name, "start_s": round(start - self.t0, 2), "end_s": round(end - self.t0, 2),
                                "seconds": round(end - start, 2), "status": status})
            self.write()

    def write(self) -> None:
        """Write this call's results JSON and table (atomically: readers never see half a file)."""
        with self.lock:
            self.doc["stages"] = self.stages
            self.doc["elapsed_s"] = round(self.elapsed(), 2)
            if self.on_write is not None:
                self.on_write()
            write_text_atomic(self.s.output, json.dumps(self.doc, indent=2, allow_nan=False) + "\n")
            write_text_atomic(self.s.output.with_suffix(".md"), self.doc.get("table", ""))

    # ---- environment ----------------------------------------------------------------------------------
    def env(self, data_workers: int | None = None, results: Path | None = None, raw: Path | None = None,
            preprocessed: Path | None = None, compile: bool = False,
            run_variables: dict[str, str] | None = None) -> dict[str, str]:
        """nnU-Net's environment for a subprocess: every folder and cache under the work folder."""
        cpus = os.cpu_count() or 1
        env = tools.nnunet_environment(
            raw or self.raw, preprocessed or self.preprocessed, results or (self.s.run_dir / "nnUNet_results"),
            trainer_dirs=self.ext_dirs, compile=compile, default_workers=max(1, self.s.workers_per_run),
            # the planner refuses 0 augmentation processes; trainings get their own value
            data_workers=max(1, self.s.workers_per_run) if data_workers is None else data_workers,
            threads=max(1, cpus // max(1, self.s.concurrency)))
        env.update({
            "LA_SEMISUP_BASES": self.bases, "TORCHINDUCTOR_COMPILE_THREADS": "1",
            "MPLCONFIGDIR": str(self.cache / "matplotlib"), "TORCHINDUCTOR_CACHE_DIR": str(self.cache / "inductor"),
            "TRITON_CACHE_DIR": str(self.cache / "triton"), "XDG_CACHE_HOME": str(self.cache),
            **(run_variables or {})})
        if self.tmp is not None:
            env["TMPDIR"] = str(self.tmp)
        return env

    # ---- subprocesses ---------------------------------------------------------------------------------
    def remaining(self, cap: float = float("inf")) -> float:
        if self.deadline is None:
            return cap
        return min(cap, self.deadline - time.monotonic())

    def run_step(self, name: str, cmd: list[str], env: dict[str, str], cap: float) -> StepResult:
        """Run one tool with its output in ``logs/<name>.log``; stop it (and its workers) at its time limit."""
        log = self.logs / f"{name}.log"
        timeout = self.remaining(cap)
        start = time.monotonic()
        if self.stopping.is_set() or timeout <= 1:
            why = "interrupted" if self.stopping.is_set() else "time limit reached before it could start"
            self.say(f"{name}: not started ({why})")
            self.record_stage(name, start, start, "skipped")
            return StepResult(False, 0.0, log, timed_out=not self.stopping.is_set(), error=why)
        self.say(f"{name}: started (log {log})")

        def register(process: subprocess.Popen) -> None:
            with self.lock:
                self.processes[process.pid] = process
            if self.stopping.is_set():  # stop_all ran between the check above and the start
                tools.stop_process_group(process)

        try:
            result = tools.run_tool(cmd, env, log, timeout=timeout, cwd=self.s.run_dir, on_start=register)
        finally:
            with self.lock:
                self.processes = {pid: p for pid, p in self.processes.items() if p.poll() is None}
        status = "ok" if result.ok else ("timeout" if result.timed_out else f"failed ({result.error})")
        if self.stopping.is_set() and not result.ok:
            status = "interrupted"
        self.record_stage(name, start, time.monotonic(), status)
        if result.ok:
            self.say(f"{name}: done in {result.seconds:.1f} s")
            return StepResult(True, result.seconds, log)
        self.say(f"{name}: {status} after {result.seconds:.1f} s; last lines of {log}:\n{tools.log_tail(log)}")
        return StepResult(False, result.seconds, log, timed_out=result.timed_out,
                          error="interrupted" if status == "interrupted" else result.error)

    def stop_all(self) -> None:
        """Stop every subprocess still running (ours only: each has its own process group)."""
        self.stopping.set()
        with self.slots.cond:
            self.slots.cond.notify_all()  # runs waiting for a slot give up
        with self.lock:
            procs = list(self.processes.values())
        for proc in procs:
            tools.stop_process_group(proc)
