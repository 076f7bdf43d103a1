"""The unlabeled pipeline under parallel folds, kills, damaged cases, a full disk, a version deleted by hand, and a
shared or read-only nnUNet_preprocessed.

The trainer of the story test (tests/failure_trainers) is SASSNet's smoke trainer with a checkpoint every epoch and
hooks that start runs together and hold a run at a chosen iteration, so that each failure happens at a known
moment rather than by luck of timing. The other tests run nnU-Net's trainers and this package's functions in this
process (in-process training steps), and the read-only ones in a forked child that obeys permission bits.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
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
    name = tiny_dataset["dataset_name"]
    # the tiny dataset's own folders only: other tests add datasets of their own beside it (self-training students)
    shutil.copytree(tiny_dataset["root"] / "raw" / name, root / "raw" / name)
    shutil.copytree(tiny_dataset["root"] / "preprocessed" / name, root / "preprocessed" / name, symlinks=True,
                    ignore=shutil.ignore_patterns("*_unlabeled*"))
    env = training_environment(tools.nnunet_environment(root / "raw", root / "preprocessed", root / "results",
                                                         trainer_dirs=[TRAINER_DIR], default_workers=1, threads=1))
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
                                                )["files"]["un000.b2nd"]["size"]
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
        current = Path(os.path.realpath(link)).name
        assert sorted(p.name for p in (pre / ds["versions"].name).iterdir()) == [current, current + ".lease"]
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
        cleanup = store.remove_unused()
        assert (cleanup.orphans, cleanup.removed, cleanup.kept) == ([], [], {})  # the adopted version is leased
    assert (tmp_path / "data_unlabeled" / "a.txt").read_text() == "new" and Path(adopted, "a.txt").is_file()
    waits = []
    with store.writer_lock():
        # a second writer (another open file, as in another process) does not get the lock meanwhile
        with store.writer_lock(blocking=False) as got:
            assert got is False
        orphan = store.new_build_folder()  # as if its builder had been killed
    lease.release()
    with store.writer_lock(on_wait=waits.append):
        cleanup = store.remove_unused()
    assert cleanup.orphans == [Path(orphan).name] and cleanup.removed == [Path(adopted).name] and waits == []
    # the current version and the lease file made with it
    assert sorted(p.name for p in Path(store.versions_dir).iterdir()) == [Path(new).name, Path(new).name + ".lease"]


# ---- damaged cases, a version deleted by hand ------------------------------------------------------------------
def use_in_process(ds: dict, monkeypatch, augmentation_processes: int = 0) -> None:
    """Point nnU-Net in this process at the copy (``augmentation_processes``: nnUNet_n_proc_DA)."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, ds["env"][key])
    monkeypatch.setenv("nnUNet_n_proc_DA", str(augmentation_processes))


def prepare(lease: bool = False):
    """ensure_preprocessed for the copy (as a training's start does with ``lease``); returns it and its log."""
    from nnunet_sassnet.unlabeled import ensure_preprocessed

    lines = []
    data = ensure_preprocessed("990", "3d_fullres", SMALL_PLANS, 1, lease=lease, progress=False, log=lines.append)
    return data, "\n".join(lines)


def case_files(folder: str | Path) -> dict[str, object]:
    """The preprocessed case files of a version, by content: the arrays of the ``.b2nd`` files (blosc2 may place a
    file's chunks in another order when it writes it again) and the bytes of the others."""
    import blosc2

    def content(path: Path) -> object:
        if path.suffix == ".b2nd":
            array = blosc2.open(str(path), mode="r")[:]
            return array.shape, str(array.dtype), array.tobytes()
        return path.read_bytes()

    return {p.name: content(p) for p in sorted(Path(folder).glob("un*"))}


def overwrite_middle(path: Path, length: int = 64) -> None:
    """Garbage of ``length`` bytes in the middle of ``path``: the size stays as written."""
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle:middle + length] = bytes((b + 1) % 256 for b in content[middle:middle + length])
    path.write_bytes(bytes(content))


def smoke_trainer():
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args("990", "3d_fullres", "all", "nnUNetTrainerSASSNet_smoke", SMALL_PLANS,
                                    device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def test_same_size_garbage_is_found_before_training_and_repaired(dataset_copy, monkeypatch):
    """Garbage of the same length in a preprocessed .b2nd and a .pkl: preprocessed again by the next run."""
    use_in_process(dataset_copy, monkeypatch)
    data, _ = prepare()
    written = case_files(data.folder)
    overwrite_middle(Path(data.folder, "un000.b2nd"))
    overwrite_middle(Path(data.folder, "un001.pkl"))
    again, log = prepare()
    assert again.folder == data.folder
    assert ("damaged case un000 (un000.b2nd: content differs from what was written); case un001 (un001.pkl: "
            "content differs from what was written): preprocessing 2 case(s) again") in log, log
    assert case_files(data.folder) == written
    assert "up to date (4 cases)" in prepare()[1]


def test_preprocessed_file_replaced_by_a_folder_is_repaired(dataset_copy, monkeypatch):
    use_in_process(dataset_copy, monkeypatch)
    data, _ = prepare()
    written = case_files(data.folder)
    target = Path(data.folder, "un000.b2nd")
    target.unlink()
    (target / "inside").mkdir(parents=True)
    again, log = prepare()
    assert "damaged case un000 (un000.b2nd: a folder, not a file): preprocessing 1 case(s) again" in log, log
    assert case_files(again.folder) == written
    assert "up to date (4 cases)" in prepare()[1]


def test_damage_found_while_training_is_named_left_out_and_repaired(dataset_copy, monkeypatch):
    """Damage after the training's start: named in the training log, left out, the loader's worker process keeps
    running; the next preprocessing run (no --force) preprocesses the case again."""
    from nnunet_sassnet.unlabeled import preprocess_unlabeled

    use_in_process(dataset_copy, monkeypatch, augmentation_processes=2)  # one unlabeled augmentation process
    prepare()  # here: the trainer would preprocess with 2 spawned processes (10 s of imports each)
    trainer = smoke_trainer()
    trainer._ensure_unlabeled_data()
    folder = Path(trainer.unlabeled_preprocessed_folder)
    written = case_files(folder)
    overwrite_middle(folder / "un001.b2nd")
    overwrite_middle(folder / "un002.pkl")  # read by nnU-Net's loader: UnicodeDecodeError or garbage
    loader = trainer._unlabeled_dataloader()
    try:
        drawn = {key for _ in range(30) for key in next(loader)["keys"]}
        assert all(p.is_alive() for p in loader._processes)
    finally:
        loader._finish()
        trainer._unlabeled_data.release()
    assert drawn == {"un000", "un003"}  # 60 draws: each damaged case would be drawn with p > 1 - 1e-7
    log = Path(trainer.log_file).read_text()
    for case, name in (("un001", "un001.b2nd"), ("un002", "un002.pkl")):
        line = (f"Unlabeled case {case} in {folder} is damaged ({name}: content differs from what was written): "
                f"left out of this run; the next run (or nnunet_sassnet_preprocess_unlabeled) preprocesses it again")
        assert log.count(line) == 1, log
    lines = []
    preprocess_unlabeled("990", "3d_fullres", SMALL_PLANS, 1, progress=False, log=lines.append)
    assert "damaged case un001 (found damaged while training: un001.b2nd: content differs" in lines[0], lines
    assert "preprocessing 2 case(s) again" in lines[0]
    assert case_files(folder) == written and not list(folder.glob("*.damaged"))


def test_damage_after_a_case_was_read_is_found_on_its_next_read(dataset_copy, monkeypatch, capfd):
    """Garbage written into a .b2nd and a .pkl after the loader has read every case: found on the next read (blosc2
    decodes the garbled .b2nd without an error), named once, left out; the loader keeps running."""
    use_in_process(dataset_copy, monkeypatch)
    prepare()
    trainer = smoke_trainer()
    trainer._ensure_unlabeled_data()
    folder = Path(trainer.unlabeled_preprocessed_folder)
    loader = trainer._unlabeled_dataloader()
    try:
        drawn = {key for _ in range(30) for key in next(loader)["keys"]}
        assert drawn == {"un000", "un001", "un002", "un003"}
        overwrite_middle(folder / "un001.b2nd")
        overwrite_middle(folder / "un002.pkl")
        drawn = {key for _ in range(30) for key in next(loader)["keys"]}
    finally:
        trainer._unlabeled_data.release()
    assert drawn == {"un000", "un003"}
    log = Path(trainer.log_file).read_text()
    for case, name in (("un001", "un001.b2nd"), ("un002", "un002.pkl")):
        assert log.count(f"Unlabeled case {case} in {folder} is damaged ({name}: content differs") == 1, log
    assert "Traceback" not in "".join(capfd.readouterr())
    assert sorted(p.name for p in folder.glob("*.damaged")) == ["un001.damaged", "un002.damaged"]


def test_labeled_cases_in_imagesUnlabeled_are_left_out_for_every_fold(dataset_copy, monkeypatch):
    """Fold 0's validation case copied into imagesUnlabeled under another name (written again: other bytes, same
    voxels), a training case under its own name: both left out before preprocessing, said once."""
    import SimpleITK as sitk
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_sassnet.unlabeled.labeled_copies import find_labeled_copies

    ds = dataset_copy
    use_in_process(ds, monkeypatch)
    trainer = get_trainer_from_args("990", "3d_fullres", 0, "nnUNetTrainerSASSNet_smoke", SMALL_PLANS,
                                    device=torch.device("cpu"))
    train_keys, val_keys = trainer.do_split()
    unlabeled = ds["raw"] / "imagesUnlabeled"
    sitk.WriteImage(sitk.ReadImage(str(ds["raw"] / "imagesTr" / f"{val_keys[0]}_0000.nii.gz")),
                    str(unlabeled / "scanX_0000.nii.gz"), useCompression=True, compressionLevel=9)
    shutil.copy(ds["raw"] / "imagesTr" / f"{train_keys[0]}_0000.nii.gz", unlabeled / f"{train_keys[0]}_0000.nii.gz")
    assert find_labeled_copies(str(ds["raw"])) == {"scanX": val_keys[0], train_keys[0]: train_keys[0]}
    data, log = prepare()
    assert log.count("that are labeled cases") == 1, log
    assert (f"scanX (same voxels as imagesTr case {val_keys[0]}), {train_keys[0]} (same name as imagesTr case "
            f"{train_keys[0]})") in log, log
    assert sorted(p.name for p in Path(data.folder).glob("*.pkl")) == [f"un00{i}.pkl" for i in range(4)]


def _write_stored_gzip(path: Path, content: bytes) -> None:
    """``content`` gzipped without compression and with no time in its header: the size follows the content's."""
    import gzip

    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=0, mtime=0) as f:
        f.write(content)


def test_raw_scan_replaced_with_its_size_and_time_kept_is_preprocessed_again(dataset_copy, monkeypatch):
    """``cp -p`` / ``rsync -t`` of another scan of the same size: the stamp follows the content."""
    import gzip

    import nibabel

    use_in_process(dataset_copy, monkeypatch)
    scan = dataset_copy["raw"] / "imagesUnlabeled" / "un000_0000.nii.gz"
    content = gzip.decompress(scan.read_bytes())
    _write_stored_gzip(scan, content)
    data, _ = prepare()
    written = case_files(data.folder)["un000.b2nd"]
    before = scan.stat()
    header = nibabel.load(scan).header
    itemsize = header.get_data_dtype().itemsize
    voxels_at = len(content) - int(np.prod(header.get_data_shape())) * itemsize  # the voxels end the file
    voxels = np.frombuffer(content[voxels_at:], np.uint8).reshape(-1, itemsize)
    _write_stored_gzip(scan, content[:voxels_at] + voxels[::-1].tobytes())  # the voxels in reverse order
    os.utime(scan, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert scan.stat().st_size == before.st_size and scan.stat().st_mtime_ns == before.st_mtime_ns
    again, log = prepare()
    assert "preprocessing 4 unlabeled cases now" in log, log
    assert case_files(again.folder)["un000.b2nd"] != written
    assert "up to date (4 cases)" in prepare()[1]


def test_deleted_lease_file_does_not_let_a_version_in_use_be_deleted(dataset_copy, monkeypatch):
    """A lease file removed by hand while a run reads its version, then a new scan: the version is kept."""
    ds = dataset_copy
    use_in_process(ds, monkeypatch)
    reading, _ = prepare(lease=True)
    written = case_files(reading.folder)
    Path(reading.folder + ".lease").unlink()
    add_scans(ds, ["new0"])
    newer, log = prepare()
    assert newer.folder != reading.folder
    kept = (f"kept the older version {reading.folder}: its lease file is missing (deleted by hand?); delete it by "
            f"hand once no run reads it")
    assert kept in log, log
    assert case_files(reading.folder) == written
    reading.release()
    assert kept in prepare()[1] and Path(reading.folder).is_dir()


@pytest.mark.parametrize("augmentation_processes", [0, 2])
def test_version_deleted_by_hand_while_training_stops_the_run_with_one_line(dataset_copy, monkeypatch, capfd,
                                                                           augmentation_processes):
    from nnunet_sassnet.errors import UserInputError

    use_in_process(dataset_copy, monkeypatch, augmentation_processes)
    prepare()
    trainer = smoke_trainer()
    trainer._ensure_unlabeled_data()
    loader = trainer._unlabeled_dataloader()
    try:
        next(loader)
        shutil.rmtree(trainer.unlabeled_preprocessed_folder)
        with pytest.raises(UserInputError, match="the unlabeled data this run reads was deleted while it trained"):
            next(loader)  # batches made before the deletion are not handed out either
    finally:
        if augmentation_processes:
            loader._finish()
    output = capfd.readouterr()
    assert "Traceback" not in output.out + output.err


VERSION_DELETED_WHILE_TRAINING = """
import shutil, torch
from nnunetv2.run.run_training import get_trainer_from_args

trainer = get_trainer_from_args("990", "3d_fullres", "all", "nnUNetTrainerSASSNet_smoke", "%s",
                                device=torch.device("cpu"))
trainer.initialize()
trainer._ensure_unlabeled_data()
loader = trainer._unlabeled_dataloader()
next(loader)
shutil.rmtree(trainer.unlabeled_preprocessed_folder)
while True:
    next(loader)
""" % SMALL_PLANS


def test_version_deleted_while_training_ends_the_process_with_one_line(dataset_copy, monkeypatch):
    """As nnUNetv2_train ends: the uncaught error is one line, the augmenter's background thread (whose worker
    processes stop at exit) adds no traceback."""
    use_in_process(dataset_copy, monkeypatch)
    prepare()  # here, not by 2 spawned processes in the child (10 s of imports each)
    env = {**dataset_copy["env"], "nnUNet_n_proc_DA": "2", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", VERSION_DELETED_WHILE_TRAINING], env=env, capture_output=True,
                            text=True, timeout=WAIT_S)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "was deleted while it trained" in errors[0], result.stderr


# ---- a shared or read-only nnUNet_preprocessed -----------------------------------------------------------------
def _drop_permission_override() -> None:
    """Clear CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER (bits 1 to 3) from this process: root then obeys
    permission bits like any user (files of another owner: their group and other bits)."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & ~0b1110)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def in_child_that_obeys_permissions(work: Callable[[], str]) -> str:
    """``work()`` in a forked child that obeys permission bits (as root, without the capabilities that override
    them: tests may run as root, which writes into read-only folders), with everything this process has imported;
    returns what it returned, or fails with its traceback."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.close(read)
            if os.geteuid() == 0:
                _drop_permission_override()
            text, code = work(), 0
        except BaseException:  # noqa: BLE001 -- reported to the parent
            text = traceback.format_exc()
        with os.fdopen(write, "w") as out:
            out.write(text)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    return text


def assert_not_writable(folder: Path) -> None:
    try:
        (folder / "probe").touch()
    except PermissionError:
        return
    raise AssertionError(f"{folder} is writable in the child: the test would prove nothing")


def tree_modes(root: Path) -> dict[str, str]:
    """Relative path -> permission bits of every folder and file below ``root`` (links left out)."""
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in [root, *root.rglob("*")]
            if not p.is_symlink()}


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_folders_and_lock_files_follow_the_umask_so_a_group_can_share_them(dataset_copy, monkeypatch, tmp_path, umask):
    """Modes as nnU-Net's own folders get them; then another member of the group (the tree handed to another owner,
    the test's process in the group without root's overrides) prepares a new scan (umask 002) or is told that it
    may not (umask 022)."""
    from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p

    from nnunet_sassnet.errors import UserInputError

    ds = dataset_copy
    use_in_process(ds, monkeypatch)
    previous = os.umask(umask)
    try:
        maybe_mkdir_p(str(tmp_path / "made_by_nnunet"))
        reading, _ = prepare(lease=True)
        reading.release()
    finally:
        os.umask(previous)
    folder_mode, file_mode = oct(0o777 & ~umask), oct(0o666 & ~umask)
    assert oct(stat.S_IMODE((tmp_path / "made_by_nnunet").stat().st_mode)) == folder_mode
    made = {name: mode for name, mode in tree_modes(ds["pre"]).items() if "_unlabeled" in name}
    version = Path(reading.folder).name
    assert made[f"{ds['versions'].name}/{version}"] == folder_mode and made[ds["versions"].name] == folder_mode
    assert {name for name, mode in made.items() if mode not in (folder_mode, file_mode)} == set(), made
    assert {f"{ds['link'].name}.lock", f"{ds['versions'].name}/{version}.lease",
            f"{ds['versions'].name}/{version}/un000.b2nd"} <= set(made)
    if os.geteuid() != 0:
        pytest.skip("handing the tree to another owner needs root")
    for path in [ds["pre"], *ds["pre"].rglob("*")]:
        # nnU-Net's part of the tree, as nnU-Net makes it with this umask
        if not path.is_symlink() and "_unlabeled" not in str(path.relative_to(ds["pre"])):
            path.chmod(0o777 & ~umask if path.is_dir() else 0o666 & ~umask)
        os.chown(path, 65534, os.getgid(), follow_symlinks=False)
    add_scans(ds, ["new0"])

    def prepare_as_group_member() -> str:
        try:
            data, log = prepare(lease=True)
        except UserInputError as e:
            return f"refused: {e.one_line()}"
        data.release()
        return log

    log = in_child_that_obeys_permissions(prepare_as_group_member)
    if umask == 0o002:
        assert "Preprocessed 5 unlabeled cases" in log and f"no run uses any more: {version}" in log, log
    else:
        assert log.startswith(f"refused: {ds['link']}: the unlabeled data is missing or was made from other plans"), log
        assert f"may not write in {ds['pre']}" in log and "nnunet_sassnet_preprocess_unlabeled -d 990" in log


def test_read_only_preprocessed_folder_trains_as_stock_nnunet(dataset_copy, monkeypatch):
    """chmod -R a-w on the dataset's preprocessed folder, unlabeled data up to date: stock nnUNetTrainer and SASSNet
    each train a step there; SASSNet says that it uses the data as it is, leased through a read-only handle, or
    that it cannot lease (lease file missing)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    ds = dataset_copy
    use_in_process(ds, monkeypatch)
    current, _ = prepare()

    def set_writable(writable: bool) -> None:
        for path in [ds["pre"], *ds["pre"].rglob("*")]:
            if not path.is_symlink():
                mode = stat.S_IMODE(path.stat().st_mode)
                path.chmod(mode | stat.S_IWUSR if writable else mode & ~0o222)

    def train_a_step_each() -> str:
        assert_not_writable(ds["pre"])
        losses = []
        for name in ("nnUNetTrainer", "nnUNetTrainerSASSNet_smoke"):
            trainer = get_trainer_from_args("990", "3d_fullres", "all", name, SMALL_PLANS, device=torch.device("cpu"))
            trainer.on_train_start()
            losses.append(float(trainer.train_step(next(trainer.dataloader_train))["loss"]))
        assert all(np.isfinite(losses)), losses
        return Path(trainer.log_file).read_text()

    set_writable(False)
    try:
        log = in_child_that_obeys_permissions(train_a_step_each)
        assert (f"Unlabeled data in {current.folder} is up to date (4 cases); {ds['pre']} is not writable here, so "
                f"it is used as it is; this run holds a lease on it (through a read-only handle)") in log, log
        set_writable(True)
        Path(current.folder + ".lease").unlink()
        set_writable(False)
        log = in_child_that_obeys_permissions(lambda: prepare(lease=True)[1])
        assert "used as it is; this run cannot lease it (its lease file" in log and "is missing" in log, log
    finally:
        set_writable(True)
