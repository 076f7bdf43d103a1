"""LA 2018 converter: real UA-MT h5 scans and challenge-layout NRRD fixtures into nnU-Net raw datasets."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import LA_H5 as H5_FULL
from conftest import LA_LITE_H5 as H5_LITE
from nnunet_sassnet.conversion import convert_la2018, load_uamt_split, main, read_case_list, read_split_json
from nnunet_sassnet.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
needs_full = pytest.mark.needs_la_data(H5_FULL)
needs_lite = pytest.mark.needs_la_data(H5_LITE)

TRAIN, TEST = load_uamt_split()
# the three smallest of the 12 full-resolution scans (the first 12 lines of train.list)
SMALL_FULL = ["1GU15S0GJ6PFNARO469W", "1MHBF3G6DCPWHSKG7XCP", "0RZDK210BSMWAA6467LU"]
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
ROTATED = tuple(np.array([[np.cos(0.5), -np.sin(0.5), 0.0],
                          [np.sin(0.5), np.cos(0.5), 0.0],
                          [0.0, 0.0, 1.0]]).ravel())  # a rotation about z: a valid, non-trivial direction


# ---------------------------------------------------------------------------------------------- helpers

def link_h5(source: Path, case_id: str, parent: Path) -> Path:
    """A UA-MT case folder under ``parent`` whose mri_norm2.h5 links to the real scan (never copied)."""
    folder = parent / case_id
    folder.mkdir(parents=True)
    (folder / "mri_norm2.h5").symlink_to(source / case_id / "mri_norm2.h5")
    return folder


def write_h5(folder: Path, image: np.ndarray, label: np.ndarray | None) -> Path:
    folder.mkdir(parents=True)
    with h5py.File(folder / "mri_norm2.h5", "w") as f:
        f.create_dataset("image", data=image)
        if label is not None:
            f.create_dataset("label", data=label)
    return folder / "mri_norm2.h5"


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with h5py.File(path, "r") as f:
        return f["image"][()], (f["label"][()] if "label" in f else None)


def write_nrrd_case(folder: Path, image_xyz: np.ndarray, mask_xyz: np.ndarray | None,
                    spacing=(0.7, 0.8, 1.3), origin=(-12.5, 33.0, 101.25), direction=ROTATED) -> None:
    """A challenge case: lgemri.nrrd and (when given) laendo.nrrd, arrays in (x, y, z) order."""
    folder.mkdir(parents=True)
    for array, name in ((image_xyz, "lgemri.nrrd"), (mask_xyz, "laendo.nrrd")):
        if array is None:
            continue
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        sitk.WriteImage(image, str(folder / name))


def synthetic(shape=(12, 10, 6), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    label = (rng.random(shape) > 0.7).astype(np.uint8)
    return image, label


def case_ids(folder: Path, suffix: str = "") -> set[str]:
    ending = suffix + ".nii.gz"
    return {p.name[: -len(ending)] for p in folder.iterdir() if p.name.endswith(ending)} if folder.is_dir() else set()


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime, to prove that nothing changed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "nnUNet_raw"
    folder.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(folder))
    return folder


# ---------------------------------------------------------------------------------------------- conversion

@needs_lite
def test_uamt_split_with_a_subset_present(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture) -> None:
    """First N of train.list among the cases present; test.list and unlisted cases go to imagesTs."""
    src = tmp_path / "in"
    # train.list positions 2, 9, 30, 31, 55, at depths that make the folder walk disagree with train.list order
    link_h5(H5_LITE, TRAIN[55], src / "a")
    link_h5(H5_LITE, TRAIN[30], src / "a")
    link_h5(H5_LITE, TRAIN[9], src / "b" / "deeper")
    link_h5(H5_LITE, TRAIN[2], src / "z" / "deeper" / "still")
    link_h5(H5_LITE, TRAIN[31], src)
    image, label = synthetic(seed=1)
    write_h5(src / "c" / TEST[3], image, label)
    write_h5(src / "c" / "EXTRA_LABELED", *synthetic(seed=2))
    write_h5(src / "c" / "EXTRA_UNLABELED", synthetic(seed=3)[0], None)

    result = convert_la2018(str(src), 601, num_labeled=2, spacing=1.25, progress=False)
    out = result.dataset

    assert out == raw / "Dataset601_LA2018"
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset601_LA2018"]  # no temporary folder left
    assert case_ids(out / "imagesTr", "_0000") == case_ids(out / "labelsTr") == {TRAIN[2], TRAIN[9]}
    assert case_ids(out / "imagesUnlabeled", "_0000") == {TRAIN[30], TRAIN[31], TRAIN[55]}
    assert not (out / "labelsUnlabeled").exists()
    assert case_ids(out / "imagesTs", "_0000") == {TEST[3], "EXTRA_LABELED", "EXTRA_UNLABELED"}
    assert case_ids(out / "labelsTs") == {TEST[3], "EXTRA_LABELED"}
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "MRI"}
    assert dataset["labels"] == {"background": 0, "left_atrium": 1}
    assert dataset["numTraining"] == 2 and dataset["file_ending"] == ".nii.gz"

    assert capsys.readouterr().out == ""  # the library returns its summary and prints nothing
    summary = result.summary
    assert summary.startswith(f"LA 2018 -> {out}\n")
    assert "imagesTr + labelsTr : 2" in summary and "imagesUnlabeled     : 3" in summary
    assert "imagesTs            : 3 (2 with labelsTs)" in summary
    assert "train.list entries missing from the input: 75" in summary
    assert "test.list entries missing from the input: 19" in summary
    assert "1.25 x 1.25 x 1.25" in summary

    # exact voxels, source dtype, the (x, y, z) -> SimpleITK transpose rule, and the h5 geometry
    for case_id, image_file, label_file in (
            (TRAIN[2], out / "imagesTr" / f"{TRAIN[2]}_0000.nii.gz", out / "labelsTr" / f"{TRAIN[2]}.nii.gz"),
            (TRAIN[55], out / "imagesUnlabeled" / f"{TRAIN[55]}_0000.nii.gz", None)):
        h5_image, h5_label = read_h5(H5_LITE / case_id / "mri_norm2.h5")
        written = sitk.ReadImage(str(image_file))
        array = sitk.GetArrayFromImage(written)
        assert array.dtype == np.uint8 == h5_image.dtype
        np.testing.assert_array_equal(array, h5_image.transpose(2, 1, 0))
        assert written.GetSize() == h5_image.shape
        assert written.GetSpacing() == pytest.approx((1.25, 1.25, 1.25))
        assert written.GetOrigin() == pytest.approx((0, 0, 0)) and written.GetDirection() == pytest.approx(IDENTITY)
        if label_file is not None:
            label_array = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
            assert label_array.dtype == np.uint8
            np.testing.assert_array_equal(label_array, h5_label.transpose(2, 1, 0))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTs" / f"{TEST[3]}.nii.gz"))), label.transpose(2, 1, 0))


@needs_full
def test_real_full_resolution_scans_keep_float32(tmp_path: Path, raw: Path) -> None:
    src = tmp_path / "in"
    for case_id in SMALL_FULL:
        link_h5(H5_FULL, case_id, src / "2018LA_Seg_Training Set")
    out = convert_la2018(str(src), 601, split="none", progress=False).dataset

    assert case_ids(out / "imagesTr", "_0000") == set(SMALL_FULL)
    assert not any((out / "imagesUnlabeled").iterdir()) and not any((out / "imagesTs").iterdir())
    for case_id in SMALL_FULL:
        h5_image, h5_label = read_h5(H5_FULL / case_id / "mri_norm2.h5")
        written = sitk.ReadImage(str(out / "imagesTr" / f"{case_id}_0000.nii.gz"))
        array = sitk.GetArrayFromImage(written)
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, h5_image.transpose(2, 1, 0))
        assert written.GetSpacing() == pytest.approx((0.625,) * 3)  # UA-MT's spacing, not stored in the file
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{case_id}.nii.gz")))
        np.testing.assert_array_equal(label, h5_label.transpose(2, 1, 0))


@needs_lite
def test_challenge_layout_keeps_header_geometry(tmp_path: Path, raw: Path) -> None:
    """NRRD spacing, origin and direction survive; 0/255 masks become 0/1; a case without laendo is unlabeled."""
    src = tmp_path / "in"
    geometries = {TRAIN[0]: ((0.7, 0.8, 1.3), (-12.5, 33.0, 101.25), ROTATED),
                  TRAIN[1]: ((0.625, 0.625, 0.625), (4.0, -8.0, 15.5), IDENTITY),
                  TRAIN[2]: ((1.0, 1.1, 1.2), (0.5, 0.5, -60.0), ROTATED)}
    sources = {}
    for depth, (case_id, (spacing, origin, direction)) in zip(("Training Set", "x/Testing Set", "y"),
                                                                geometries.items()):
        image, label = read_h5(H5_LITE / case_id / "mri_norm2.h5")
        mask = None if case_id == TRAIN[2] else label * 255
        write_nrrd_case(src / depth / case_id, image, mask, spacing, origin, direction)
        sources[case_id] = (image, label)

    out = convert_la2018(str(src), 602, name="LAnrrd", split="none", progress=False).dataset

    assert out.name == "Dataset602_LAnrrd"
    assert case_ids(out / "imagesTr", "_0000") == case_ids(out / "labelsTr") == {TRAIN[0], TRAIN[1]}
    assert case_ids(out / "imagesUnlabeled", "_0000") == {TRAIN[2]}
    for case_id, (spacing, origin, direction) in geometries.items():
        folder = "imagesUnlabeled" if case_id == TRAIN[2] else "imagesTr"
        written = sitk.ReadImage(str(out / folder / f"{case_id}_0000.nii.gz"))
        assert sitk.GetArrayFromImage(written).dtype == np.uint8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sources[case_id][0].transpose(2, 1, 0))
        assert written.GetSpacing() == pytest.approx(spacing, abs=1e-5)
        assert written.GetOrigin() == pytest.approx(origin, abs=1e-4)
        assert written.GetDirection() == pytest.approx(direction, abs=1e-5)
        if case_id != TRAIN[2]:
            label = sitk.ReadImage(str(out / "labelsTr" / f"{case_id}.nii.gz"))
            assert sitk.GetArrayFromImage(label).dtype == np.uint8
            np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sources[case_id][1].transpose(2, 1, 0))
            assert label.GetSpacing() == pytest.approx(written.GetSpacing())
            assert label.GetOrigin() == pytest.approx(written.GetOrigin())
            assert label.GetDirection() == pytest.approx(written.GetDirection())


@needs_lite
def test_split_json(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    for case_id in TRAIN[:5]:
        link_h5(H5_LITE, case_id, src)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"labeled": [TRAIN[3], TRAIN[0]], "unlabeled": [TRAIN[1]], "test": [TRAIN[4]]}))

    result = convert_la2018(str(src), 601, split=str(split), spacing=1.25, progress=False)
    out = result.dataset

    assert case_ids(out / "imagesTr", "_0000") == case_ids(out / "labelsTr") == {TRAIN[0], TRAIN[3]}
    assert case_ids(out / "imagesUnlabeled", "_0000") == {TRAIN[1]}
    assert case_ids(out / "imagesTs", "_0000") == case_ids(out / "labelsTs") == {TRAIN[4]}
    assert TRAIN[2] not in {p.name.split("_")[0] for p in out.rglob("*.nii.gz")}
    assert f"not in the split file, not converted: 1 ({TRAIN[2]})" in result.summary
    assert capsys.readouterr().out == ""


@needs_lite
def test_overwrite_replaces_a_dataset_of_that_id_under_any_name(tmp_path: Path, raw: Path) -> None:
    src = tmp_path / "in"
    for case_id in TRAIN[:2]:
        link_h5(H5_LITE, case_id, src)
    old = raw / "Dataset601_Old"
    (old / "imagesTr").mkdir(parents=True)
    (old / "dataset.json").write_text("{}")

    out = convert_la2018(str(src), 601, num_labeled=1, spacing=1.25, overwrite=True, progress=False).dataset

    assert sorted(p.name for p in raw.iterdir()) == ["Dataset601_LA2018"]
    assert case_ids(out / "imagesTr", "_0000") == {TRAIN[0]}


@needs_full
def test_output_passes_nnunet_integrity_check(tmp_path: Path, raw: Path) -> None:
    """nnU-Net finds the dataset by ID and its verify_dataset_integrity (what --verify_dataset_integrity runs)
    passes, with imagesUnlabeled and imagesTs present beside imagesTr.

    One dataset only: each check spawns a worker that imports torch; the NRRD output's image/label geometry,
    the other thing the check compares, is asserted in test_challenge_layout_keeps_header_geometry.
    """
    src = tmp_path / "in"
    for case_id in SMALL_FULL:
        link_h5(H5_FULL, case_id, src)
    write_h5(src / TEST[0], *synthetic(seed=4))
    out = convert_la2018(str(src), 601, num_labeled=2, progress=False).dataset
    assert any((out / "imagesUnlabeled").iterdir()) and any((out / "labelsTs").iterdir())

    script = textwrap.dedent("""
        import os
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        name = maybe_convert_to_dataset_name(601)
        print("found", name)
        verify_dataset_integrity(os.path.join(os.environ["nnUNet_raw"], name), 1)
    """)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(tmp_path / "pp"),
               nnUNet_results=str(tmp_path / "results"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "found Dataset601_LA2018" in result.stdout
    assert "verify_dataset_integrity Done" in result.stdout
    assert "Error" not in result.stdout and "Warning" not in result.stdout


# ---------------------------------------------------------------------------------------------- command line

def _cli_env(raw: Path) -> dict[str, str]:
    # importable from the checkout whether or not the package is installed
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return dict(os.environ, nnUNet_raw=str(raw), PYTHONPATH=path)


@needs_lite
def test_cli_module_and_checkout_script(tmp_path: Path, raw: Path) -> None:
    src = tmp_path / "in"
    for case_id in TRAIN[:3]:
        link_h5(H5_LITE, case_id, src)
    module = subprocess.run(
        [sys.executable, "-m", "nnunet_sassnet.conversion", "-i", str(src), "-d", "601", "--num-labeled", "2",
         "--spacing", "1.25"], env=_cli_env(raw), capture_output=True, text=True, timeout=120)
    assert module.returncode == 0, module.stderr
    assert "imagesTr + labelsTr : 2" in module.stdout and "Writing" in module.stderr  # summary and progress bar
    # the command prints the summary before writing and the dataset folder when done
    assert module.stdout.startswith("LA 2018 -> ")
    assert module.stdout.endswith(f"Done: {(raw / 'Dataset601_LA2018').resolve()}\n")
    assert case_ids(raw / "Dataset601_LA2018" / "imagesUnlabeled", "_0000") == {TRAIN[2]}

    env = dict(os.environ, nnUNet_raw=str(raw))  # the script finds the package by itself
    script = subprocess.run(
        [sys.executable, str(REPO / "dataset_conversion" / "convert_la2018.py"), "-i", str(src), "-d", "602",
         "-n", "Script", "--split", "none", "--spacing", "1.25"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    assert case_ids(raw / "Dataset602_Script" / "imagesTr", "_0000") == set(TRAIN[:3])

    again = subprocess.run(
        [sys.executable, "-m", "nnunet_sassnet.conversion", "-i", str(src), "-d", "601", "-n", "Other"],
        env=_cli_env(raw), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert "Dataset601_LA2018" in again.stderr and "--overwrite" in again.stderr


@needs_lite
def test_console_script(tmp_path: Path, raw: Path) -> None:
    command = shutil.which("nnunet_sassnet_convert_la2018")
    if command is None:
        pytest.skip("nnunet_sassnet_convert_la2018 is not on PATH (pip install -e . installs it)")
    src = tmp_path / "in"
    link_h5(H5_LITE, TRAIN[0], src)
    result = subprocess.run([command, "-i", str(src), "-d", "601", "--split", "none", "--spacing", "1.25"],
                            env=dict(os.environ, nnUNet_raw=str(raw)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert case_ids(raw / "Dataset601_LA2018" / "labelsTr") == {TRAIN[0]}


# ---------------------------------------------------------------------------------------------- bad input
# Each builder makes a bad input under ``tmp`` and returns (argv after -d, text the message must contain).

def _empty(tmp: Path):
    (tmp / "in").mkdir()
    return ["-i", str(tmp / "in")], str(tmp / "in")


def _unrecognised(tmp: Path):
    (tmp / "in" / "case1").mkdir(parents=True)
    (tmp / "in" / "notes.txt").write_text("hello")
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(tmp / "in" / "case1" / "image.nii.gz"))
    return ["-i", str(tmp / "in")], "no LA 2018 cases found"


def _missing_folder(tmp: Path):
    return ["-i", str(tmp / "nowhere")], str(tmp / "nowhere")


def _garbage_h5(tmp: Path):
    write_h5(tmp / "in" / TRAIN[0], *synthetic())
    (tmp / "in" / TRAIN[1]).mkdir()
    (tmp / "in" / TRAIN[1] / "mri_norm2.h5").write_bytes(b"not an hdf5 file" * 100)
    return ["-i", str(tmp / "in"), "--split", "none"], str(tmp / "in" / TRAIN[1] / "mri_norm2.h5")


def _truncated_h5(tmp: Path):
    write_h5(tmp / "in" / TRAIN[0], *synthetic())
    data = (H5_LITE / TRAIN[1] / "mri_norm2.h5").read_bytes() if H5_LITE.is_dir() else None
    if data is None:
        pytest.skip(f"1.25 mm LA 2018 h5 scans not found at {H5_LITE}")
    (tmp / "in" / TRAIN[1]).mkdir()
    (tmp / "in" / TRAIN[1] / "mri_norm2.h5").write_bytes(data[: len(data) // 2])
    return ["-i", str(tmp / "in"), "--split", "none"], str(tmp / "in" / TRAIN[1] / "mri_norm2.h5")


def _garbage_nrrd(tmp: Path):
    write_nrrd_case(tmp / "in" / "A", *synthetic())
    write_nrrd_case(tmp / "in" / "B", *synthetic())
    (tmp / "in" / "B" / "lgemri.nrrd").write_bytes(b"\x00\x01garbage" * 50)
    return ["-i", str(tmp / "in"), "--split", "none"], str(tmp / "in" / "B" / "lgemri.nrrd")


def _truncated_nrrd(tmp: Path):
    # the header is intact, the voxels are cut: found only while writing, after case A has been written
    image, label = synthetic((40, 30, 20))
    write_nrrd_case(tmp / "in" / "A", image, label * 255)
    write_nrrd_case(tmp / "in" / "B", image, label * 255)
    path = tmp / "in" / "B" / "lgemri.nrrd"
    path.write_bytes(path.read_bytes()[:-5000])
    return ["-i", str(tmp / "in"), "--split", "none"], str(path)


def _h5_label_values(tmp: Path):
    image, label = synthetic()
    write_h5(tmp / "in" / TRAIN[0], image, label)
    write_h5(tmp / "in" / TRAIN[1], image, label * 255)  # a challenge-style mask in an h5 file
    return ["-i", str(tmp / "in"), "--split", "none"], f"{tmp / 'in' / TRAIN[1] / 'mri_norm2.h5'}: 'label' holds"


def _nrrd_label_values(tmp: Path):
    image, label = synthetic()
    write_nrrd_case(tmp / "in" / "A", image, label * 255)
    write_nrrd_case(tmp / "in" / "B", image, label)  # 0/1 where the challenge has 0/255
    return ["-i", str(tmp / "in"), "--split", "none"], f"{tmp / 'in' / 'B' / 'laendo.nrrd'}: holds values {{0, 1}}"


def _h5_no_image(tmp: Path):
    with h5py.File(tmp / "x.h5", "w") as f:
        f.create_dataset("volume", data=np.zeros((4, 4, 4)))
    (tmp / "in" / "A").mkdir(parents=True)
    shutil.move(tmp / "x.h5", tmp / "in" / "A" / "mri_norm2.h5")
    return ["-i", str(tmp / "in"), "--split", "none"], f"{tmp / 'in' / 'A' / 'mri_norm2.h5'}: no 'image' dataset"


def _h5_nan_image(tmp: Path):
    image, label = synthetic()
    write_h5(tmp / "in" / "A", image, label)
    write_h5(tmp / "in" / "B", np.where(label > 0, np.nan, 1.0).astype(np.float32), label)
    return ["-i", str(tmp / "in"), "--split", "none"], f"{tmp / 'in' / 'B' / 'mri_norm2.h5'}: 'image' holds NaN"


def _h5_shape_mismatch(tmp: Path):
    image, label = synthetic()
    write_h5(tmp / "in" / TRAIN[0], image, label[:, :, :-1])
    return ["-i", str(tmp / "in"), "--split", "none"], str(tmp / "in" / TRAIN[0] / "mri_norm2.h5")


def _nrrd_shape_mismatch(tmp: Path):
    image, label = synthetic()
    write_nrrd_case(tmp / "in" / "A", image, None)
    write_nrrd_case(tmp / "in" / "A_label", None, label[:-2] * 255)
    shutil.move(tmp / "in" / "A_label" / "laendo.nrrd", tmp / "in" / "A" / "laendo.nrrd")
    (tmp / "in" / "A_label").rmdir()
    return ["-i", str(tmp / "in"), "--split", "none"], str(tmp / "in" / "A" / "laendo.nrrd")


def _labeled_without_label_uamt(tmp: Path):
    image, label = synthetic()
    write_h5(tmp / "in" / TRAIN[0], image, None)  # first in train.list, so labeled with --num-labeled 1
    write_h5(tmp / "in" / TRAIN[1], image, label)
    return ["-i", str(tmp / "in"), "--num-labeled", "1"], f"case {TRAIN[0]}"


def _labeled_without_label_json(tmp: Path):
    image, label = synthetic()
    write_nrrd_case(tmp / "in" / "A", image, label * 255)
    write_nrrd_case(tmp / "in" / "B", image, None)
    (tmp / "split.json").write_text(json.dumps({"labeled": ["A", "B"], "unlabeled": [], "test": []}))
    return ["-i", str(tmp / "in"), "--split", str(tmp / "split.json")], "case B"


def _too_many_labeled(tmp: Path):
    for case_id in TRAIN[:3]:
        write_h5(tmp / "in" / case_id, *synthetic())
    return ["-i", str(tmp / "in"), "--num-labeled", "4"], "--num-labeled 3 or fewer"


def _default_num_labeled_too_many(tmp: Path):
    for case_id in TRAIN[:3]:
        write_h5(tmp / "in" / case_id, *synthetic())
    return ["-i", str(tmp / "in")], "--num-labeled 16, but only 3"


def _split_json(content: str, expected: str):
    def build(tmp: Path):
        for case_id in ("A", "B"):
            write_h5(tmp / "in" / case_id, *synthetic())
        (tmp / "split.json").write_text(content)
        return ["-i", str(tmp / "in"), "--split", str(tmp / "split.json")], f"{tmp / 'split.json'}: {expected}"
    return build


def _split_missing_file(tmp: Path):
    write_h5(tmp / "in" / "A", *synthetic())
    return ["-i", str(tmp / "in"), "--split", str(tmp / "nosuch.json")], str(tmp / "nosuch.json")


def _mixed_layouts(tmp: Path):
    write_h5(tmp / "in" / "h5" / TRAIN[0], *synthetic())
    write_nrrd_case(tmp / "in" / "nrrd" / "A", *synthetic())
    return ["-i", str(tmp / "in"), "--split", "none"], "mixes the UA-MT layout"


def _duplicate_case(tmp: Path):
    write_h5(tmp / "in" / "one" / TRAIN[0], *synthetic())
    write_h5(tmp / "in" / "two" / TRAIN[0], *synthetic())
    return ["-i", str(tmp / "in"), "--split", "none"], f"case {TRAIN[0]} found twice"


def _image_missing_nrrd(tmp: Path):
    write_nrrd_case(tmp / "in" / "A", *synthetic())
    (tmp / "in" / "A" / "lgemri.nrrd").unlink()
    return ["-i", str(tmp / "in"), "--split", "none"], f"{tmp / 'in' / 'A'}: has laendo.nrrd but no lgemri.nrrd"


def _spacing_with_nrrd(tmp: Path):
    write_nrrd_case(tmp / "in" / "A", *synthetic())
    return ["-i", str(tmp / "in"), "--split", "none", "--spacing", "1.25"], "--spacing applies to the UA-MT"


def _num_labeled_with_split_none(tmp: Path):
    write_h5(tmp / "in" / "A", *synthetic())
    return ["-i", str(tmp / "in"), "--split", "none", "--num-labeled", "1"], "--num-labeled applies to"


BAD_INPUTS = {
    "empty folder": _empty,
    "unrecognised folder": _unrecognised,
    "missing folder": _missing_folder,
    "unreadable h5": _garbage_h5,
    "truncated h5": _truncated_h5,
    "unreadable nrrd": _garbage_nrrd,
    "truncated nrrd": _truncated_nrrd,
    "h5 label values": _h5_label_values,
    "nrrd label values": _nrrd_label_values,
    "h5 without image": _h5_no_image,
    "h5 image with NaN": _h5_nan_image,
    "h5 shape mismatch": _h5_shape_mismatch,
    "nrrd shape mismatch": _nrrd_shape_mismatch,
    "labeled without label (uamt)": _labeled_without_label_uamt,
    "labeled without label (json)": _labeled_without_label_json,
    "num-labeled too large": _too_many_labeled,
    "default num-labeled too large": _default_num_labeled_too_many,
    "split json syntax": _split_json('{"labeled": ["A",]}', "not valid JSON"),
    "split json unknown key": _split_json('{"labeled": ["A"], "validation": ["B"]}', "unknown key(s)"),
    "split json case twice": _split_json('{"labeled": ["A"], "test": ["A"]}', "case A is listed twice"),
    "split json absent case": _split_json('{"labeled": ["A", "Z"]}', "case(s) Z are not under"),
    "split json not a list": _split_json('{"labeled": "A"}', '"labeled" must be a list'),
    "split json no labeled": _split_json('{"unlabeled": ["A"]}', 'no "labeled" list'),
    "split file missing": _split_missing_file,
    "mixed layouts": _mixed_layouts,
    "duplicate case": _duplicate_case,
    "label without image": _image_missing_nrrd,
    "spacing with nrrd": _spacing_with_nrrd,
    "num-labeled with split none": _num_labeled_with_split_none,
}


@pytest.mark.parametrize("build", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_and_nothing_is_written(build, tmp_path: Path, raw: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    argv, expected = build(tmp_path)
    capsys.readouterr()
    assert main(argv + ["-d", "601"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Writing")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert list(raw.iterdir()) == []


def test_missing_nnunet_raw_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("nnUNet_raw", raising=False)
    write_h5(tmp_path / "in" / "A", *synthetic())
    assert main(["-i", str(tmp_path / "in"), "-d", "601", "--split", "none"]) == 2
    assert capsys.readouterr().err.startswith("error: nnUNet_raw is not set")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_dataset_is_left_untouched(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture,
                                            overwrite: bool) -> None:
    """Without --overwrite the ID is refused; with it, a conversion that fails still keeps the old dataset."""
    old = raw / "Dataset601_Other"
    (old / "imagesTr").mkdir(parents=True)
    (old / "dataset.json").write_text('{"name": "Other"}')
    (old / "imagesTr" / "X_0000.nii.gz").write_bytes(b"old")
    before = listing(raw)
    image, label = synthetic((40, 30, 20))
    write_nrrd_case(tmp_path / "in" / "A", image, label * 255)
    write_nrrd_case(tmp_path / "in" / "B", image, label * 255)
    if overwrite:  # fails while writing, after case A was written into the temporary folder
        path = tmp_path / "in" / "B" / "lgemri.nrrd"
        path.write_bytes(path.read_bytes()[:-5000])
    argv = ["-i", str(tmp_path / "in"), "-d", "601", "--split", "none"] + (["--overwrite"] if overwrite else [])

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(tmp_path / "in" / "B" / "lgemri.nrrd" if overwrite else old) in err
    assert listing(raw) == before


def test_missing_raw_folder_is_created_only_on_success(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image, label = synthetic((40, 30, 20))
    write_nrrd_case(tmp_path / "in" / "A", image, label * 255)
    write_nrrd_case(tmp_path / "in" / "B", image, label * 255)
    good = convert_la2018(str(tmp_path / "in"), 601, split="none", raw_dir=str(tmp_path / "new_raw"),
                          progress=False).dataset
    assert case_ids(good / "labelsTr") == {"A", "B"}

    path = tmp_path / "in" / "B" / "lgemri.nrrd"
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(UserInputError, match="lgemri.nrrd: unreadable or truncated NRRD"):
        convert_la2018(str(tmp_path / "in"), 601, split="none", raw_dir=str(tmp_path / "other_raw"), progress=False)
    assert not (tmp_path / "other_raw").exists()


# ---------------------------------------------------------------------------------------------- split files

def test_case_list_keeps_file_order_and_refuses_bad_lists(tmp_path: Path) -> None:
    good = tmp_path / "train.list"
    good.write_text("  B2 \n\nA1\nC3")
    assert read_case_list(good) == ["B2", "A1", "C3"]
    assert TRAIN == read_case_list(REPO / "nnunet_sassnet" / "data" / "uamt_train.list") and len(TRAIN) == 80
    assert len(TEST) == 20 and not set(TRAIN) & set(TEST)
    twice, empty = tmp_path / "twice.list", tmp_path / "empty.list"
    twice.write_text("A1\nB2\nA1\n")
    empty.write_text("\n  \n")
    for path, message in ((twice, "case A1 is listed twice"), (empty, "the case list is empty"),
                          (tmp_path / "none.list", "cannot read the case list")):
        with pytest.raises(UserInputError, match=message) as caught:
            read_case_list(path)
        assert str(caught.value).startswith(f"{path}: ")


def test_split_json_has_every_key_in_order(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"test": ["C"], "labeled": ["A", "B"]}))
    split = read_split_json(path)
    assert split == {"labeled": ["A", "B"], "unlabeled": [], "test": ["C"]}
    assert list(split) == ["labeled", "unlabeled", "test"]
    path.write_text(json.dumps(["A"]))
    with pytest.raises(UserInputError, match="expected a JSON object .* found list"):
        read_split_json(path)
    path.write_text(json.dumps({"labeled": ["A", ""]}))
    with pytest.raises(UserInputError, match='"labeled" must be a list of case IDs'):
        read_split_json(path)
