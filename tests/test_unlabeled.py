"""Unlabeled scans: preprocessing with the dataset's plans, staleness, and every bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SMALL_PLANS, run
from synthetic import write_image


@pytest.fixture()
def dataset_copy(tiny_dataset, tmp_path) -> dict:
    """A private copy of the tiny dataset's raw and preprocessed folders (tests here change them)."""
    root = tmp_path / "copy"
    for key in ("raw", "preprocessed"):
        shutil.copytree(tiny_dataset["root"] / key, root / key)
    (root / "results").mkdir()
    env = dict(tiny_dataset["env"])
    env.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                "nnUNet_results": str(root / "results")})
    name = tiny_dataset["dataset_name"]
    return {"env": env, "raw": root / "raw" / name, "pre": root / "preprocessed" / name, "root": root}


def preprocess(env: dict, *extra: str, check: bool = False):
    return run(["nnunet_sassnet_preprocess_unlabeled", "-d", "990", "-c", "3d_fullres", "-p", SMALL_PLANS,
                "-np", "1", *extra], env, check=check)


def unlabeled_folder(ds: dict) -> Path:
    return ds["pre"] / f"{SMALL_PLANS}_3d_fullres_unlabeled"


def assert_refused(result, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    # one error line, the last thing printed (a progress bar may come before it), no traceback
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_same_preprocessing_as_labeled_scans(dataset_copy):
    """A labeled scan moved into imagesUnlabeled is preprocessed to exactly nnU-Net's data for that scan (moved, not
    copied: a copy of a labeled case is never unlabeled data)."""
    ds = dataset_copy
    shutil.move(ds["raw"] / "imagesTr" / "tr000_0000.nii.gz", ds["raw"] / "imagesUnlabeled" / "dup_0000.nii.gz")
    preprocess(ds["env"], check=True)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    labeled = nnUNetDatasetBlosc2(str(ds["pre"] / f"{SMALL_PLANS}_3d_fullres"))
    unlabeled = nnUNetDatasetBlosc2(str(unlabeled_folder(ds)))
    data_l, _, _, props_l = labeled.load_case("tr000")
    data_u, seg_u, _, props_u = unlabeled.load_case("dup")
    assert np.array_equal(np.asarray(data_l[:]), np.asarray(data_u[:]))
    assert props_u["spacing"] == props_l["spacing"]
    assert set(np.unique(np.asarray(seg_u[:]))) <= {-1, 0}  # no label information, only the nonzero mask
    assert all(len(v) == 0 for v in props_u["class_locations"].values())


def test_stale_data_is_detected_and_redone_by_the_trainer(dataset_copy, monkeypatch):
    ds = dataset_copy
    preprocess(ds["env"], check=True)
    stamp_file = unlabeled_folder(ds) / "sassnet_unlabeled_stamp.json"
    stamp = json.loads(stamp_file.read_text())
    # plans changed after the unlabeled data was made (e.g. another normalisation)
    plans_file = ds["pre"] / f"{SMALL_PLANS}.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_fullres"]["batch_size"] = 3
    plans_file.write_text(json.dumps(plans))
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, ds["env"][key])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args("990", "3d_fullres", "all", "nnUNetTrainerSASSNet_smoke", SMALL_PLANS,
                                    device=torch.device("cpu"))
    trainer.initialize()
    trainer._ensure_unlabeled_data()
    log = Path(trainer.log_file).read_text()
    assert "made from other plans" in log and "preprocessing 4 unlabeled cases" in log
    assert json.loads(stamp_file.read_text())["stamp"] != stamp["stamp"]
    # current now: nothing is redone
    before = stamp_file.stat().st_mtime_ns
    trainer._ensure_unlabeled_data()
    assert stamp_file.stat().st_mtime_ns == before


def test_unlabeled_scan_smaller_than_the_patch_is_padded(dataset_copy, monkeypatch):
    ds = dataset_copy
    folder = ds["raw"] / "imagesUnlabeled"
    for f in folder.iterdir():
        f.unlink()
    write_image(np.random.default_rng(0).normal(50, 10, (8, 10, 6)).astype(np.float32),
                str(folder / "small_0000.nii.gz"), 1.0)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, ds["env"][key])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args("990", "3d_fullres", "all", "nnUNetTrainerSASSNet_smoke", SMALL_PLANS,
                                    device=torch.device("cpu"))
    trainer.discriminator_features = 16
    trainer.on_train_start()
    batch = next(trainer.dataloader_unlabeled)
    assert tuple(batch["data"].shape) == (2, 1, 16, 16, 16)
    out = trainer.train_step(next(trainer.dataloader_train))
    assert np.isfinite(out["loss"])


BAD_INPUTS = {
    "unknown dataset": (lambda ds: None, ["-d", "123"], ["unknown dataset", "123"]),
    "missing folder": (lambda ds: shutil.rmtree(ds["raw"] / "imagesUnlabeled"), [], ["does not exist",
                                                                                      "imagesUnlabeled"]),
    "empty folder": (lambda ds: [f.unlink() for f in (ds["raw"] / "imagesUnlabeled").iterdir()], [],
                     ["is empty", "imagesUnlabeled"]),
    "missing channel": (lambda ds: (ds["raw"] / "imagesUnlabeled" / "un001_0000.nii.gz").rename(
        ds["raw"] / "imagesUnlabeled" / "un001_0001.nii.gz"), [], ["un001_0000.nii.gz", "missing"]),
    "extra channel": (lambda ds: shutil.copy(ds["raw"] / "imagesUnlabeled" / "un001_0000.nii.gz",
                                             ds["raw"] / "imagesUnlabeled" / "un001_0001.nii.gz"), [],
                      ["un001_0001.nii.gz", "extra channel"]),
    "wrong file ending": (lambda ds: shutil.copy(ds["raw"] / "imagesUnlabeled" / "un001_0000.nii.gz",
                                                 ds["raw"] / "imagesUnlabeled" / "un009_0000.nrrd"), [],
                          ["un009_0000.nrrd", "file name"]),
    "unreadable image": (lambda ds: (ds["raw"] / "imagesUnlabeled" / "un002_0000.nii.gz").write_bytes(b"broken"),
                         [], ["un002_0000.nii.gz", "could not read"]),
    "2D image in a 3D dataset": (lambda ds: sitk.WriteImage(
        sitk.GetImageFromArray(np.ones((24, 24), np.float32)), str(ds["raw"] / "imagesUnlabeled" / "un003_0000.nii.gz")),
        [], ["un003_0000.nii.gz", "3D"]),
    "4D image": (lambda ds: sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 24, 24, 24), np.float32),
                                                                   isVector=False),
                                            str(ds["raw"] / "imagesUnlabeled" / "un001_0000.nii.gz")),
                 [], ["un001_0000.nii.gz: a 4D image: 2 volumes of 24 x 24 x 24 voxels", "split it"]),
    "vector image (2 components)": (lambda ds: sitk.WriteImage(
        sitk.GetImageFromArray(np.ones((24, 24, 24, 2), np.float32), isVector=True),
        str(ds["raw"] / "imagesUnlabeled" / "un001_0000.nii.gz")), [],
        ["un001_0000.nii.gz: a vector image: 2 components per voxel on a 24 x 24 x 24 grid", "split it"]),
    "NaN and Inf voxels": (lambda ds: change_voxels(ds, "un001", nan_and_inf), [],
                           ["un001_0000.nii.gz", "9 of 13824 voxels are NaN or infinite"]),
    "values too large for the normalisation": (
        lambda ds: change_voxels(ds, "un001", lambda a: (a / a.max() * np.float32(3e38)).astype(np.float32)),
        [], ["un001_0000.nii.gz", "become NaN or infinite in the plan's ZScoreNormalization", "rescale"]),
    "truncated .nii.gz": (lambda ds: cut_in_half(ds["raw"] / "imagesUnlabeled" / "un001_0000.nii.gz"),
                          [], ["un001_0000.nii.gz", "truncated or corrupt"]),
    "values x 1e20 (finite in float32)": (
        lambda ds: change_voxels(ds, "un001", lambda a: (a.astype(np.float64) * 1e20).astype(np.float32)),
        [], ["un001_0000.nii.gz", "every voxel becomes 0 in the plan's ZScoreNormalization", "rescale"]),
    "case names x and x_seg": (lambda ds: shutil.copy(ds["raw"] / "imagesUnlabeled" / "un002_0000.nii.gz",
                                                      ds["raw"] / "imagesUnlabeled" / "un001_seg_0000.nii.gz"),
                               [], ["un001_seg_0000.nii.gz", "clashes with case un001", "rename"]),
    "dangling link": (lambda ds: (ds["raw"] / "imagesUnlabeled" / "un009_0000.nii.gz").symlink_to(
        ds["root"] / "no_such_scan.nii.gz"), [], ["un009_0000.nii.gz", "does not exist", "fix the link"]),
}


def change_voxels(ds: dict, case: str, change) -> None:
    """Rewrite a 1-channel unlabeled scan with ``change(voxels)`` (SimpleITK writes NaN and Inf as they are)."""
    path = str(ds["raw"] / "imagesUnlabeled" / f"{case}_0000.nii.gz")
    image = sitk.ReadImage(path)
    changed = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
    changed.CopyInformation(image)
    sitk.WriteImage(changed, path)


def nan_and_inf(voxels: np.ndarray) -> np.ndarray:
    voxels[3:5, 3:5, 3:5] = np.nan  # SimpleITK would read these 9 voxels as 0
    voxels[0, 0, 0] = np.inf
    return voxels


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def entry_in_process(ds: dict, monkeypatch, capsys, *args: str):
    """The console script's entry function in this process (a subprocess costs ~10 s of imports).

    The console script itself runs in ``test_no_plans_yet_is_refused`` and the other tests here.
    """
    from nnunet_sassnet.unlabeled import preprocess_unlabeled_entry

    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, ds["env"][key])
    capsys.readouterr()
    code = preprocess_unlabeled_entry(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(dataset_copy, case, monkeypatch, capsys):
    ds = dataset_copy
    # a previous, good result that must survive
    good = entry_in_process(ds, monkeypatch, capsys, "-d", "990", "-c", "3d_fullres", "-p", SMALL_PLANS, "-np", "1")
    assert good.returncode == 0, good.stderr
    before = sorted(p.name for p in unlabeled_folder(ds).iterdir())
    stamp = (unlabeled_folder(ds) / "sassnet_unlabeled_stamp.json").read_text()
    change, args, fragments = BAD_INPUTS[case]
    change(ds)
    result = entry_in_process(ds, monkeypatch, capsys, *(args or ["-d", "990", "-p", SMALL_PLANS, "-np", "1",
                                                                  "--force"]), "-c", "3d_fullres")
    assert_refused(result, *fragments)
    assert sorted(p.name for p in unlabeled_folder(ds).iterdir()) == before
    assert (unlabeled_folder(ds) / "sassnet_unlabeled_stamp.json").read_text() == stamp
    assert not [p for p in ds["pre"].rglob(".tmp*")]


def make_two_channel(ds: dict) -> None:
    """Turn the copy into a 2-channel dataset as nnU-Net would plan it (one normalisation and one set of intensity
    statistics per channel), with a second channel file for each unlabeled scan."""
    for folder in (ds["raw"], ds["pre"]):
        dataset_json = json.loads((folder / "dataset.json").read_text())
        dataset_json["channel_names"] = {"0": "ch0", "1": "ch1"}
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
    plans_file = ds["pre"] / f"{SMALL_PLANS}.json"
    plans = json.loads(plans_file.read_text())
    configuration = plans["configurations"]["3d_fullres"]
    for key in ("normalization_schemes", "use_mask_for_norm"):
        configuration[key] = configuration[key] * 2
    statistics = plans["foreground_intensity_properties_per_channel"]
    statistics["1"] = statistics["0"]
    plans_file.write_text(json.dumps(plans))
    for image in sorted((ds["raw"] / "imagesUnlabeled").glob("*_0000.nii.gz")):
        shutil.copy(image, image.with_name(image.name.replace("_0000", "_0001")))


def test_channel_files_of_another_grid_are_named(dataset_copy, monkeypatch, capsys):
    """A 2-channel dataset: the channel file whose shape or spacing differs is named, not the first one."""
    ds = dataset_copy
    make_two_channel(ds)
    args = ["-d", "990", "-c", "3d_fullres", "-p", SMALL_PLANS, "-np", "1"]
    good = entry_in_process(ds, monkeypatch, capsys, *args)
    assert good.returncode == 0, good.stderr
    second = ds["raw"] / "imagesUnlabeled" / "un001_0001.nii.gz"
    write_image(np.ones((20, 24, 24), np.float32), str(second), 1.0)
    assert_refused(entry_in_process(ds, monkeypatch, capsys, *args),
                   "un001_0001.nii.gz: shape (20, 24, 24) differs from un001_0000.nii.gz's (24, 24, 24)", "resample")
    write_image(np.ones((24, 24, 24), np.float32), str(second), 1.5)
    assert_refused(entry_in_process(ds, monkeypatch, capsys, *args),
                   "un001_0001.nii.gz: spacing (1.5, 1.5, 1.5) differs from un001_0000.nii.gz's (1.0, 1.0, 1.0)")


def test_no_plans_yet_is_refused(dataset_copy):
    ds = dataset_copy
    result = run(["nnunet_sassnet_preprocess_unlabeled", "-d", "990", "-c", "3d_fullres", "-p", "NoSuchPlans"],
                 ds["env"], check=False)
    assert_refused(result, "NoSuchPlans.json", "nnUNetv2_plan_and_preprocess")


HUGE_HEADER_CHECK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 * 1024 ** 3, 4 * 1024 ** 3))  # a 4 GB memory limit
from nnunet_sassnet.errors import run_cli
from nnunet_sassnet.unlabeled.image_checks import check_nifti_file
sys.exit(run_cli(lambda: check_nifti_file(sys.argv[1]) or 0))
"""


def test_header_that_claims_more_than_the_memory_is_named_as_such(tmp_path, monkeypatch):
    """A .nii.gz whose header claims 1200^3 float32 voxels, read under a 4 GB memory limit."""
    import gzip
    import os
    import sys

    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape((1200, 1200, 1200))
    header.set_data_dtype(np.float32)
    path = tmp_path / "huge_0000.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + np.ones(1000, np.float32).tobytes()))
    result = subprocess.run([sys.executable, "-c", HUGE_HEADER_CHECK, str(path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert_refused(result, "huge_0000.nii.gz: its header declares 1200 x 1200 x 1200 float32 voxels (6.4 GiB), "
                           "more than this process may allocate")


def test_selftraining_with_a_raw_dataset_json_that_is_not_json_is_one_line(dataset_copy, monkeypatch, capsys):
    from nnunet_sassnet.selftraining.cli import main

    ds = dataset_copy
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, ds["env"][key])
    dataset_json = ds["raw"] / "dataset.json"
    dataset_json.write_text(dataset_json.read_text().rstrip().rstrip("}"))  # the closing brace lost
    capsys.readouterr()
    code = main(["-d", "990", "-c", "3d_fullres", "-p", SMALL_PLANS, "-f", "0", "-device", "cpu"])
    result = subprocess.CompletedProcess([], code, *capsys.readouterr())
    assert_refused(result, f"{dataset_json}: not valid JSON (", "line", "fix the file")
