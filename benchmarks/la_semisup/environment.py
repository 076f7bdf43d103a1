"""What a run is recorded with: versions, device, host, and the commit of the code that ran."""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmarks.la_semisup.settings import REPO

SOURCE_FILE = "source.json"  # in the work folder's prepared/: the commit that --prepare-only ran at


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes) of this checkout; (None, None) where it has no git history."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        if head.returncode != 0 or not head.stdout.strip():
            return None, None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None, None


def record_source(prepared: Path) -> None:
    """Write this checkout's commit into a prepared work folder (the GPU machine's copy has no git)."""
    commit, dirty = git_commit()
    (prepared / SOURCE_FILE).write_text(json.dumps({"commit": commit, "uncommitted_changes": dirty}) + "\n")


def environment_info(device: str, commit: str | None, prepared: Path) -> dict[str, Any]:
    """Versions, device and commit (git; else ``commit``; else the one recorded by --prepare-only)."""
    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    for name, dist in (("torch", "torch"), ("nnunetv2", "nnunetv2"), ("numpy", "numpy")):
        try:
            info[name] = version(dist)
        except PackageNotFoundError:
            info[name] = getattr(importlib.import_module(name), "__version__", None)
    info["device_name"] = "CPU"
    if device == "cuda":
        import torch
        info["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    info["commit"], info["uncommitted_changes"] = git_commit()
    info["commit_source"] = "git"
    if info["commit"] is None and commit:
        info.update(commit=commit, commit_source="--commit")
    elif info["commit"] is None and (prepared / SOURCE_FILE).is_file():
        info.update(json.loads((prepared / SOURCE_FILE).read_text()), commit_source="--prepare-only")
    return info
