"""The unlabeled pipeline under parallel folds, kills, a damaged case and a full disk, through the stock commands.

The trainer used here (tests/failure_trainers) is SASSNet's smoke trainer with a checkpoint every epoch and
hooks that start runs together and hold a run at a chosen iteration, so that each failure happens at a known
moment rather than by luck of timing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SMALL_PLANS, run, training_environment
from nnunet_sassnet import nnunet_tools as tools

TRAINER = "nnUNetTrainerSASSNet_failures"
TRAINER_DIR = Path(__file__).parent / "failure_trainers"
WAIT_S = 480


@pytest.fixture()
def dataset_copy(tiny_dataset, tmp_path) -> dict:
    """A private copy of the tiny dataset without any preprocessed unlabeled data."""
    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset["root"] / "raw", root / "raw")
    shutil.copytree(tiny_dataset["root"] / "preprocessed", root / "preprocessed", symlinks=True,
                    ignore=shutil.ignore_patterns("*_unlabeled*"))
    env = training_environment(tools.nnunet_environment(root / "raw", root / "preprocessed", root / "results",
                                                         trainer_dirs=[TRAINER_DIR], default_workers=1, threads=1))
    name = tiny_dataset["dataset_name"]
    pre = root / "preprocessed" / name
    return {"env": env, "raw": root / "raw" / name, "pre": pre, "root": root, "name": name,
            "link": pre / f"{SMALL_PLANS}_3d_fullres_unlabeled",
            "versions": pre / f"{SMALL_PLANS}_3d_fullres_unlabeled_versions"}


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A tool in its own process group (so that a kill reaches its workers), output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def train_command(fold: int, *extra: str) -> list[str]:
    return tools.tool_command("nnUNetv2_train", ["990", "3d_fullres", fold, "-tr", TRAINER, "-p", SMALL_PLANS,
                                                 "-device", "cpu", *extra])


def wait_until(condition, what: str, processes: list[subprocess.Popen] = (), logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        dead = [p for p in processes if p.poll() not in (None, 0)]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
            reason = f"a process exited with {dead[0].returncode}" if dead else f"timed out after {WAIT_S} s"
            raise AssertionError(f"waiting for {what}: {reason}\n{tails}")
        time.sleep(0.1)


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def versions(ds: dict) -> list[str]:
    return sorted(p.name for p in ds["versions"].iterdir() if p.is_dir()) if ds["versions"].is_dir() else []


def leftovers(ds: dict) -> list[Path]:
    return list(ds["pre"].rglob(".tmp*"))


def add_scans(ds: dict, names: list[str]) -> None:
    folder = ds["raw"] / "imagesUnlabeled"
    sources = sorted(folder.glob("un*_0000.nii.gz"))
    for i, name in enumerate(names):
        shutil.copy(sources[i % len(sources)], folder / f"{name}_0000.nii.gz")


KILLED_PREPROCESSING = """
import pathlib, sys, time
import nnunet_sassnet.unlabeled as unlabeled
from nnunet_sassnet.unlabeled import preprocessing

one_case = preprocessing._preprocess_one_case

def one_case_then_hang(*args):
    one_case(*args)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(600)

preprocessing._preprocess_one_case = one_case_then_hang
sys.exit(unlabeled.preprocess_unlabeled_entry(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)  # seven processes that each import torch, on two cores
def test_parallel_folds_new_scans_kills_and_a_damaged_case(dataset_copy, tmp_path):
    """Issue 16, cases 1 to 4, as one story of a dataset whose folds train at the same time."""
    ds = dataset_copy
    marks = tmp_path / "marks"
    marks.mkdir()
    add_scans(ds, [f"more{i}" for i in range(4)])  # 8 cases: the preprocessing outlasts the others' arrival
    env = {**ds["env"], "SASSNET_TEST_DIR": str(marks), "SASSNET_TEST_START_TOGETHER": "3"}
    logs = {fold: tmp_path / f"fold{fold}.log" for fold in range(3)}

    # 1. three folds at once, nothing preprocessed; fold 0 stops before its 2nd iteration
    fold_env = {0: {**env, "SASSNET_TEST_PAUSE_AT": "1,4"}, 1: {**env, "SASSNET_TEST_SKIP_VALIDATION": "1"},
                2: {**env, "SASSNET_TEST_SKIP_VALIDATION": "1"}}
    runs = {fold: start(train_command(fold), fold_env[fold], logs[fold]) for fold in range(3)}
    try:
        wait_until(lambda: runs[1].poll() is not None and runs[2].poll() is not None
                   and (marks / "paused_0_1").exists(), "folds 1 and 2 to finish", list(runs.values()),
                   list(logs.values()))
        texts = {fold: logs[fold].read_text() for fold in range(3)}
        assert runs[1].returncode == 0 and runs[2].returncode == 0, texts[1][-3000:] + texts[2][-3000:]
        preprocessed = [fold for fold, text in texts.items() if "Preprocessed 8 unlabeled cases" in text]
        assert len(preprocessed) == 1, texts
        for fold in set(range(3)) - set(preprocessed):  # the others waited, said so, and found the data ready
            assert "is preparing" in texts[fold] and "waiting for it to finish" in texts[fold], texts[fold]
            assert "is up to date (8 cases)" in texts[fold], texts[fold]
        folders = {re.search(r"unlabeled folder (\S+)", text).group(1) for text in texts.values()}
        assert len(versions(ds)) == 1 and folders == {str(ds["versions"] / versions(ds)[0])}
        first_version = versions(ds)[0]

        # 2. a scan added while fold 0 trains; a preprocessing run is killed half-way
        add_scans(ds, ["new0"])
        killed_log = tmp_path / "killed_preprocessing.log"
        killed = start([sys.executable, "-c", KILLED_PREPROCESSING, str(marks / "one_case_done"), "-d", "990",
                        "-c", "3d_fullres", "-p", SMALL_PLANS, "-np", "1"], env, killed_log)
        wait_until((marks / "one_case_done").exists, "the first preprocessed case", [killed], [killed_log])
        kill(killed)
        assert len(leftovers(ds)) == 1 and os.path.realpath(ds["link"]).endswith(first_version)

        # ... the next run cleans up after it and preprocesses again; fold 0's version stays (it reads it)
        again = run(tools.tool_command("nnunet_sassnet_preprocess_unlabeled",
                                       ["-d", "990", "-c", "3d_fullres", "-p", SMALL_PLANS, "-np", "1"]), env)
        assert "removed 1 unfinished folder(s) left by an interrupted preprocessing run" in again.stdout
        assert "Preprocessed 9 unlabeled cases" in again.stdout
        assert not leftovers(ds) and len(versions(ds)) == 2 and first_version in versions(ds)
        second_version = Path(os.path.realpath(ds["link"])).name
        assert second_version != first_version

        # 3. fold 0 goes on reading its version, then is killed with SIGKILL in its 2nd epoch
        (marks / "resume_0_1").touch()
        wait_until((marks / "paused_0_4").exists, "fold 0 in its 2nd epoch", [runs[0]], [logs[0]])
        kill(runs[0])
        fold0 = ds["root"] / "results" / ds["name"] / f"{TRAINER}__{SMALL_PLANS}__3d_fullres" / "fold_0"
        assert (fold0 / "checkpoint_latest.pth").is_file() and not (fold0 / "checkpoint_final.pth").exists()
        assert "Traceback" not in logs[0].read_text()
    finally:
        for process in runs.values():
            if process.poll() is None:
                kill(process)

    # 4. a damaged case: a preprocessed file cut in half
    damaged = ds["versions"] / second_version / "un000.b2nd"
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])

    # 5. --c: continues from checkpoint_latest.pth, repairs the case, drops fold 0's old version, finishes
    resumed = run(train_command(0, "--c"), ds["env"])
    text = resumed.stdout
    assert "failure test: starts at iteration 3, discriminator steps 3" in text, text[-4000:]
    assert "damaged case un000 (un000.b2nd:" in text and "preprocessing 1 case(s) again" in text
    assert f"removed 1 older version(s) that no run uses any more: {first_version}" in text
    assert versions(ds) == [second_version] and not leftovers(ds)
    assert damaged.stat().st_size == json.loads((damaged.parent / "sassnet_unlabeled_stamp.json").read_text()
                                                )["files"]["un000.b2nd"]
    final = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)["sassnet"]
    assert final["current_iteration"] == 6
    assert {int(s["step"]) for s in final["discriminator_optimizer_state"]["state"].values()} == {6}
    assert (fold0 / "validation" / "summary.json").is_file()  # nnU-Net's final validation predicted


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``folder``; the reason when that is not allowed here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    return None if result.returncode == 0 else f"mount -t tmpfs is not allowed here: {result.stderr.strip()}"


def test_full_disk_while_preprocessing_keeps_the_previous_data(dataset_copy):
    """Issue 16, case 5: nnUNet_preprocessed on a 2 MiB tmpfs that new scans overflow."""
    ds = dataset_copy
    disk = ds["root"] / "small_disk"
    disk.mkdir()
    reason = _mount_tmpfs(disk, "2m")
    if reason:
        pytest.skip(reason)
    try:
        shutil.copytree(ds["root"] / "preprocessed", disk / "preprocessed")
        pre = disk / "preprocessed" / ds["name"]
        link = pre / ds["link"].name
        env = {**ds["env"], "nnUNet_preprocessed": str(disk / "preprocessed")}
        command = tools.tool_command("nnunet_sassnet_preprocess_unlabeled",
                                     ["-d", "990", "-c", "3d_fullres", "-p", SMALL_PLANS, "-np", "1"])
        run(command, env)
        before = {p.name: p.read_bytes() for p in link.iterdir()}
        free_before = shutil.disk_usage(disk).free

        # larger scans than the disk holds
        import numpy as np

        from synthetic import write_image

        rng = np.random.default_rng(0)
        for i in range(3):
            write_image(rng.normal(50, 10, (64, 64, 64)).astype(np.float32),
                        str(ds["raw"] / "imagesUnlabeled" / f"big{i}_0000.nii.gz"), 1.0)
        result = run(command + ["--force"], env, check=False)
        lines = result.stdout.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stdout, result.stdout[-3000:]
        assert lines[-1].startswith("error: ") and "no space left on the device" in lines[-1], lines[-1]
        assert str(pre) in lines[-1] and "previous unlabeled data is unchanged" in lines[-1]
        assert {p.name: p.read_bytes() for p in link.iterdir()} == before
        assert not list(pre.rglob(".tmp*")), list(pre.rglob(".tmp*"))
        assert [p.name for p in (pre / ds["versions"].name).iterdir()] == [Path(os.path.realpath(link)).name]
        assert shutil.disk_usage(disk).free == free_before
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_versioned_folder_keeps_leased_versions_and_removes_orphans(tmp_path):
    """The rules behind the rows above, without nnU-Net: leases, the writer lock, orphans, adoption."""
    from nnunet_sassnet.versioned_folder import VersionedFolder

    store = VersionedFolder(str(tmp_path / "data_unlabeled"))
    (tmp_path / "data_unlabeled").mkdir()  # a plain folder, as written before versions existed
    (tmp_path / "data_unlabeled" / "a.txt").write_text("old")
    with store.writer_lock():
        adopted = store.adopt_plain_folder()
        lease = store.lease(adopted)
        build = store.new_build_folder()
        Path(build, "a.txt").write_text("new")
        new = store.publish(build, "v2")
        assert store.remove_unused() == ([], [])  # the adopted version is leased
    assert (tmp_path / "data_unlabeled" / "a.txt").read_text() == "new" and Path(adopted, "a.txt").is_file()
    waits = []
    with store.writer_lock():
        # a second writer (another open file, as in another process) does not get the lock meanwhile
        with store.writer_lock(blocking=False) as got:
            assert got is False
        orphan = store.new_build_folder()  # as if its builder had been killed
    lease.release()
    with store.writer_lock(on_wait=waits.append):
        orphans, removed = store.remove_unused()
    assert orphans == [Path(orphan).name] and removed == [Path(adopted).name] and waits == []
    assert sorted(p.name for p in Path(store.versions_dir).iterdir()) == [Path(new).name]
