"""What the installed startup file (``nnunet_sassnet_ext_trainer.pth``) adds to every Python start.

Python's ``site`` module reads each ``.pth`` file of site-packages at start-up with ``site.addpackage``; this
times that call on our file (written with the line setup.py installs): opening, reading and running the line.
For scale, the same for a file holding only ``import os``, what any such file costs. Each call starts with
``nnUNet_extTrainer`` unset, the case where the line appends. Prints the median over repeats of the mean time
per call, as CPU time of this process (``time.process_time``), which other programs on a busy machine inflate
less than wall-clock time.

    python benchmarks/startup_file_cost.py [--calls 2000] [--repeats 15]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import site
import statistics
import sys
import tempfile
import time

from nnunet_sassnet import discovery

OURS = discovery.startup_line(f"os.path.join(sitedir, 'nnunet_sassnet', {discovery.TRAINER_FOLDER!r})")
BASELINE = "import os\n"


def time_startup_file(calls: int, repeats: int, line: str) -> list[float]:
    """Seconds per ``site.addpackage`` call of a ``.pth`` file holding ``line``, one mean per repeat."""
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, discovery.STARTUP_FILE), "w") as f:
            f.write(line)
        saved = os.environ.pop(discovery.ENV_VARIABLE, None)
        path = list(sys.path)
        means = []
        try:
            for _ in range(repeats):
                elapsed = 0.0
                for _ in range(calls):
                    os.environ.pop(discovery.ENV_VARIABLE, None)
                    start = time.process_time()
                    site.addpackage(folder, discovery.STARTUP_FILE, set())
                    elapsed += time.process_time() - start
                means.append(elapsed / calls)
            expected = os.path.join(folder, "nnunet_sassnet", discovery.TRAINER_FOLDER)
            if line != BASELINE and os.environ.get(discovery.ENV_VARIABLE) != expected:  # the line really ran
                raise RuntimeError(f"the startup line set {os.environ.get(discovery.ENV_VARIABLE)!r}")
        finally:
            sys.path[:] = path
            os.environ.pop(discovery.ENV_VARIABLE, None)
            if saved is not None:
                os.environ[discovery.ENV_VARIABLE] = saved
    return means


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    for label, line in ((discovery.STARTUP_FILE, OURS), ("a .pth file with 'import os'", BASELINE)):
        means = time_startup_file(args.calls, args.repeats, line)
        print(f"{label}: median {statistics.median(means) * 1e6:.1f} us CPU per interpreter start "
              f"(min {min(means) * 1e6:.1f}, max {max(means) * 1e6:.1f}; {args.repeats} x {args.calls} calls)")
    print(f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
