"""Concurrent CPU runs and torch's thread count: N processes side by side, each with one thread per core (what
``nnUNetv2_train -device cpu`` sets) or with cores / N threads (what ``OMP_NUM_THREADS`` asks of this package's
trainers). Prints each setting's wall time and their ratio, measured in one run.

    python benchmarks/concurrent_threads.py [--processes 2] [--passes 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORK = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
net = torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(16, 16, 3, padding=1))
x = torch.randn(2, 1, 32, 32, 32)
net(x).sum().backward()  # warm-up
print("ready", flush=True)
sys.stdin.readline()  # start together
for _ in range(int(sys.argv[2])):
    net(x).sum().backward()
"""


def side_by_side(processes: int, threads: int, passes: int) -> float:
    """Seconds until all ``processes`` finished ``passes`` forward and backward passes with ``threads`` each."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    procs = [subprocess.Popen([sys.executable, "-c", WORK, str(threads), str(passes)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, text=True) for _ in range(processes)]
    for p in procs:  # torch imported and warmed up in every process
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"a worker failed before its passes (exit {p.wait()})")
    start = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--passes", type=int, default=20)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    capped = max(1, cores // args.processes)
    per_core = side_by_side(args.processes, cores, args.passes)
    per_share = side_by_side(args.processes, capped, args.passes)
    print(f"{args.processes} processes on {cores} cores, {args.passes} passes each: "
          f"{cores} threads each {per_core:.2f} s, {capped} each {per_share:.2f} s, ratio {per_core / per_share:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
