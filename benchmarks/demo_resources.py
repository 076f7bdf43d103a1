"""Wall time and peak memory of ``nnunet_sassnet_demo``, measured from outside, as a user experiences it.

    python benchmarks/demo_resources.py [--workdir DIR] [--busy-processes N] [-- DEMO ARGS...]

Runs the demo as a subprocess and samples its whole process tree (nnU-Net's tools and their worker
processes included) every 0.2 s. Reports the peak of the summed resident memory (RSS), the peak held for at
least a second, and the peak of the summed proportional set size (PSS: shared pages split among the
processes that share them, so forked and spawned workers are not counted twice). Uses psutil when it is
installed, else Linux's /proc. Prints one JSON line with these, the wall time, the CPU time of the process tree
(each process's last sampled user + system time, summed: it misses at most a sampling interval per process), the
demo's mean Dice (from its report.json), the torch threads its training chose per epoch (from the training log),
the CPU count and the load average before and after the run: other work on the machine slows the demo down, so
measure on an otherwise idle machine, or compare CPU times. ``--busy-processes N`` runs N competing processes
that each keep one core busy (``python -c "while True: pass"``) for the whole run: the demo on a machine that is
not idle. Memory is reported in GiB.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAMPLE_SECONDS = 0.2
HAS_PSUTIL = importlib.util.find_spec("psutil") is not None


def _descendants(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants, from the parent ids in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the command name (field 2) may hold spaces and parentheses: split after its last ")"
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    pids, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) if it ended. PSS splits shared pages among their users."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def _memory_psutil(pid: int) -> tuple[int, int]:
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0
    return info.rss, getattr(info, "pss", 0)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process so far (not its children's); None if it ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields 14 and 15 of stat (utime, stime), counted from field 3 after the command name
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds_psutil(pid: int) -> float | None:
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return times.user + times.system


def tree_memory(root_pid: int, cpu: dict[int, float] | None = None) -> tuple[int, int, int]:
    """Summed RSS, summed PSS (bytes) and number of processes of ``root_pid`` and its descendants.

    ``cpu``, where given, gets each process's CPU seconds so far (by pid; the last sample stays once it ends).
    """
    if HAS_PSUTIL:
        import psutil

        try:
            root = psutil.Process(root_pid)
            pids = [root_pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return 0, 0, 0
        measure, cpu_seconds = _memory_psutil, _cpu_seconds_psutil
    else:
        pids = _descendants(root_pid)
        measure, cpu_seconds = _memory, _cpu_seconds
    rss = pss = 0
    for pid in pids:
        r, p = measure(pid)
        rss += r
        pss += p
        if cpu is not None:
            seconds = cpu_seconds(pid)
            if seconds is not None:
                cpu[pid] = seconds
    return rss, pss, len(pids)


def chosen_threads(workdir: Path) -> list[int]:
    """The torch threads the demo's training chose, per epoch (its log lines "torch threads for this epoch: N")."""
    counts = []
    for log in sorted(workdir.glob("nnUNet_results/*/*/fold_*/training_log_*.txt")):
        for line in log.read_text(errors="replace").splitlines():
            match = re.search(r"torch threads for this epoch: (\d+)", line)
            if match:
                counts.append(int(match.group(1)))
    return counts


def sustained_peak(samples: list[tuple[float, int]], window_s: float) -> int:
    """The highest value held for at least ``window_s`` seconds: the maximum over windows of their minimum.

    Separates a lasting peak from a burst such as a pool of copy-on-write forks that lives a fraction of a
    second (their RSS counts the parent's pages again, their memory hardly exists).
    """
    best = 0
    for i, (t0, _) in enumerate(samples):
        j, lowest = i, None
        while j < len(samples) and samples[j][0] - t0 <= window_s:
            lowest = samples[j][1] if lowest is None else min(lowest, samples[j][1])
            j += 1
        if j < len(samples) and lowest is not None:  # a complete window
            best = max(best, lowest)
    return best


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        p.terminate()
    for p in processes:
        p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="the demo's work folder (default: a new temporary folder, kept afterwards)")
    parser.add_argument("--busy-processes", type=int, default=0,
                        help="competing processes that each keep one core busy during the run (default: 0)")
    parser.add_argument("demo_args", nargs="*", help="further arguments for nnunet_sassnet_demo (after --)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nnunet_sassnet_demo_bench_")) / "demo"
    load_before = os.getloadavg()
    command = ["nnunet_sassnet_demo", "--workdir", str(workdir), *args.demo_args]
    print("running: " + " ".join(command), file=sys.stderr, flush=True)

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy_processes)]
    start = time.perf_counter()
    try:
        process = subprocess.Popen(command)
    except BaseException:
        _stop(spinners)
        raise
    samples: list[tuple[float, int, int, int]] = []  # (seconds, RSS, PSS, processes)
    cpu: dict[int, float] = {}  # CPU seconds per process of the tree, last sample

    def sample() -> None:
        while process.poll() is None:
            samples.append((time.perf_counter() - start, *tree_memory(process.pid, cpu)))
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        returncode = process.wait()
    finally:
        _stop(spinners)
    wall = time.perf_counter() - start
    sampler.join()
    gib = 1024 ** 3
    peak_rss = max((s[1] for s in samples), default=0)
    peak_at = next((s[0] for s in samples if s[1] == peak_rss), None)

    dice = None
    report = workdir / "report.json"
    if returncode == 0 and report.is_file():
        dice = json.loads(report.read_text())["mean"]["dice"]
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(command),
        "exit_code": returncode,
        "wall_s": round(wall, 1),
        "peak_tree_rss_gib": round(peak_rss / gib, 2),
        "peak_tree_rss_at_s": None if peak_at is None else round(peak_at, 1),
        "peak_tree_rss_held_1s_gib": round(sustained_peak([(s[0], s[1]) for s in samples], 1.0) / gib, 2),
        "peak_tree_pss_gib": round(max((s[2] for s in samples), default=0) / gib, 2),
        "peak_processes": max((s[3] for s in samples), default=0),
        "cpu_s": round(sum(cpu.values()), 1),
        "mean_dice": None if dice is None else round(dice, 4),
        "torch_threads_per_epoch": chosen_threads(workdir),
        "busy_processes": args.busy_processes,
        "cpus": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine": platform.machine(),
        "memory_sampler": "psutil" if HAS_PSUTIL else "/proc",
    }
    print(json.dumps(result))
    return returncode


if __name__ == "__main__":
    sys.exit(main())
