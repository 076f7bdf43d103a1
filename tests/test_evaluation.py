"""Tests of nnunet_sassnet.evaluation: parity with medpy on real LA masks, the empty-mask rules, the CLI end to
end, and the answer to each bad input."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import LA_H5
from nnunet_sassnet import evaluation as ev
from nnunet_sassnet.evaluation.scoring import score_label
from nnunet_sassnet.nnunet_tools import usable_cores

medpy_binary = pytest.importorskip("medpy.metric.binary")

REPO = Path(__file__).resolve().parents[1]
# Case 0 and case 9 (the largest), case 6 touches the last slice: surfaces at the image border.
LA_CASE_INDICES = (0, 6, 9)
ANISO = (0.625, 0.625, 2.5)
SPACINGS = [None, ANISO]
PERTURBATIONS = ["erode", "dilate", "shift", "island"]


def _la_case_dirs() -> list[Path]:
    if not LA_H5.is_dir():
        return []
    return sorted(p for p in LA_H5.iterdir() if (p / "mri_norm2.h5").is_file())


@pytest.fixture(scope="module")
def la_masks() -> dict[str, np.ndarray]:
    h5py = pytest.importorskip("h5py")
    dirs = _la_case_dirs()
    if len(dirs) <= max(LA_CASE_INDICES):
        pytest.skip(f"fewer than {max(LA_CASE_INDICES) + 1} real LA cases under {LA_H5}")
    masks = {}
    for i in LA_CASE_INDICES:
        with h5py.File(dirs[i] / "mri_norm2.h5", "r") as f:
            masks[dirs[i].name] = f["label"][:].astype(bool)
    return masks


def _island_slices(ref: np.ndarray, half: int = 3) -> tuple[slice, ...]:
    """A cube near the mask but separate from it even after a 1-voxel dilation (gap > 5 voxels); close, so
    that the joint bounding box and medpy's run time stay small."""
    box = ndimage.find_objects(ref.astype(np.uint8))[0]
    pad = tuple(slice(max(s.start - 20, 0), min(s.stop + 20, n)) for s, n in zip(box, ref.shape))
    dist = ndimage.distance_transform_edt(~ref[pad])
    inner = np.zeros(dist.shape, bool)
    inner[tuple(slice(half, n - half) for n in dist.shape)] = True
    centre = np.argwhere((dist >= 12) & (dist < 13) & inner)[0]
    return tuple(slice(int(c) + p.start - half, int(c) + p.start + half + 1) for c, p in zip(centre, pad))


_PERTURBED: dict[tuple[int, str], np.ndarray] = {}


def _perturb(ref: np.ndarray, kind: str) -> np.ndarray:
    key = (id(ref), kind)
    if key not in _PERTURBED:
        _PERTURBED[key] = _make_perturbation(ref, kind)
    return _PERTURBED[key]


def _make_perturbation(ref: np.ndarray, kind: str) -> np.ndarray:
    if kind == "erode":
        return ndimage.binary_erosion(ref, iterations=2)
    if kind == "dilate":
        return ndimage.binary_dilation(ref, iterations=3)
    if kind == "shift":
        return np.roll(ref, (3, -2, 1), axis=(0, 1, 2))
    if kind == "island":
        pred = ndimage.binary_dilation(ref, iterations=1)
        pred[_island_slices(ref)] = True
        return pred
    raise ValueError(kind)


def _crop_for_medpy(pred: np.ndarray, ref: np.ndarray, margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Medpy is slow on the full volume; both masks are background outside the joint bounding box, so a crop
    with a margin (clipped at the image border, which stays the border) gives medpy the same values."""
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, ref.shape))
    return pred[box], ref[box]


def _medpy_all(pred: np.ndarray, ref: np.ndarray, spacing) -> dict[str, float]:
    return {
        "dice": medpy_binary.dc(pred, ref),
        "jaccard": medpy_binary.jc(pred, ref),
        "hd95": medpy_binary.hd95(pred, ref, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, ref, voxelspacing=spacing),
        "assd": medpy_binary.assd(pred, ref, voxelspacing=spacing),
    }


def _close(a: float, b: float, rel: float = 1e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


# --------------------------------------------------------------------------------------------------------
# metric functions vs medpy
# --------------------------------------------------------------------------------------------------------


def _parity_masks(la_masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two of the three loaded cases keep the parity tests short; the CLI test uses all three."""
    return dict(list(la_masks.items())[:2])


@pytest.mark.needs_la_data(LA_H5)
@pytest.mark.parametrize("spacing", SPACINGS, ids=["voxel", "aniso"])
@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_metrics_match_medpy_on_real_la_masks(la_masks, kind, spacing):
    masks = _parity_masks(la_masks)
    if spacing is None:
        # Voxel units on one case are enough: with a spacing the code path is the same plus the sampling.
        masks = dict(list(masks.items())[:1])
    for case, ref in masks.items():
        pred = _perturb(ref, kind)
        # Ours on the full volume, medpy on a crop: this also checks that our internal cropping is exact.
        ours = {
            "dice": ev.dice(pred, ref),
            "jaccard": ev.jaccard(pred, ref),
            "hd95": ev.hd95(pred, ref, spacing),
            "asd": ev.asd(pred, ref, spacing),
            "assd": ev.assd(pred, ref, spacing),
        }
        expected = _medpy_all(*_crop_for_medpy(pred, ref), spacing)
        for key, value in expected.items():
            assert _close(ours[key], value), (case, kind, spacing, key, ours[key], value)


@pytest.mark.needs_la_data(LA_H5)
def test_metrics_match_medpy_isotropic_spacing(la_masks):
    """Isotropic spacings take a shortcut (voxel distances scaled), so they get their own check."""
    ref = next(iter(la_masks.values()))
    pred = _perturb(ref, "shift")
    expected = _medpy_all(*_crop_for_medpy(pred, ref), 0.625)
    assert _close(ev.hd95(pred, ref, 0.625), expected["hd95"])
    assert _close(ev.asd(pred, ref, (0.625,) * 3), expected["asd"])
    assert _close(ev.assd(pred, ref, [0.625] * 3), expected["assd"])


@pytest.mark.needs_la_data(LA_H5)
def test_metrics_match_medpy_uncropped_at_image_border(la_masks):
    """The mask of this case touches the last slice; medpy on the full array, nothing cropped."""
    ref = next(m for m in la_masks.values() if m[..., -1].any() or m[..., 0].any())
    pred = np.roll(ref, 2, axis=2)  # pushes the mask through the border and wraps it around
    for spacing in (ANISO,):
        expected = _medpy_all(pred, ref, spacing)
        assert _close(ev.hd95(pred, ref, spacing), expected["hd95"])
        assert _close(ev.asd(pred, ref, spacing), expected["asd"])
        assert _close(ev.assd(pred, ref, spacing), expected["assd"])
        # asd is one direction only: swapping the arguments changes it, assd does not.
        assert _close(ev.asd(ref, pred, spacing), medpy_binary.asd(ref, pred, voxelspacing=spacing))
        assert _close(ev.assd(ref, pred, spacing), expected["assd"])


@pytest.mark.needs_la_data(LA_H5)
def test_largest_component_removes_the_island(la_masks):
    for ref in _parity_masks(la_masks).values():
        pred = _perturb(ref, "island")
        without_island = ndimage.binary_dilation(ref, iterations=1)
        kept = ev.keep_largest_component(pred)
        assert kept.dtype == bool
        np.testing.assert_array_equal(kept, without_island)
        # The island inflates the distances; keeping the largest component brings them back. (The island's
        # few surface voxels need not reach the 95th percentile, so hd95 may stay equal.)
        assert ev.asd(pred, ref, ANISO) > ev.asd(kept, ref, ANISO)
        assert ev.assd(pred, ref) > ev.assd(kept, ref)
        assert ev.hd95(pred, ref, ANISO) >= ev.hd95(kept, ref, ANISO)
        assert _close(ev.hd95(kept, ref, ANISO), medpy_binary.hd95(*_crop_for_medpy(without_island, ref), ANISO))


def test_keep_largest_component_is_26_connected():
    mask = np.zeros((6, 6, 6), dtype=np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = 1  # diagonal chain: one 26-connected component
    mask[5, 5, 0] = 1
    np.testing.assert_array_equal(ev.keep_largest_component(mask), (mask == 1) & (np.indices(mask.shape)[2] > 0))
    assert not ev.keep_largest_component(np.zeros((3, 3, 3))).any()


def test_metric_functions_validate_input():
    a = np.zeros((4, 4, 4), bool)
    a[1:3, 1:3, 1:3] = True
    with pytest.raises(ValueError, match="shape"):
        ev.dice(a, a[:3])
    with pytest.raises(ValueError, match="spacing"):
        ev.hd95(a, a, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        ev.asd(a, a, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError):
        ev.dice(np.array(["a"]), np.array(["b"]))
    empty = np.zeros_like(a)
    assert math.isnan(ev.dice(empty, empty)) and math.isnan(ev.jaccard(empty, empty))
    assert ev.dice(empty, a) == 0.0
    assert math.isnan(ev.hd95(empty, a)) and math.isnan(ev.assd(a, empty))
    # 2-D input and a scalar spacing work too.
    assert _close(ev.hd95(a[1], np.roll(a[1], 1, 0), 0.5), medpy_binary.hd95(a[1], np.roll(a[1], 1, 0), 0.5))


def test_large_volume_pair_is_exact():
    """A 640x640x88 pair scored through the files, as the CLI does; the time is printed, not asserted."""
    z, y, x = np.ogrid[:88, :640, :640]
    ref = ((z - 44) / 20.0) ** 2 + ((y - 300) / 90.0) ** 2 + ((x - 330) / 80.0) ** 2 <= 1
    pred = ((z - 45) / 19.0) ** 2 + ((y - 306) / 86.0) ** 2 + ((x - 328) / 84.0) ** 2 <= 1
    spacing = np.array((2.5, 0.625, 0.625))
    start = time.perf_counter()
    scores = score_label(pred, ref, spacing, usable_cores())
    print(f"\n640x640x88 pair scored (voxel + mm) in {time.perf_counter() - start:.2f} s")
    p, r = _crop_for_medpy(pred, ref)
    for unit, sp in (("voxel", None), ("mm", tuple(spacing))):
        expected = _medpy_all(p, r, sp)
        for metric in ("hd95", "asd", "assd"):
            assert _close(scores[f"{metric}_{unit}"], expected[metric]), (metric, unit)
    assert _close(scores["dice"], medpy_binary.dc(pred, ref))


# --------------------------------------------------------------------------------------------------------
# folders, report and the empty-mask rules
# --------------------------------------------------------------------------------------------------------


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), dtype=np.uint8) -> Path:
    """Write with SimpleITK; ``spacing`` is in SimpleITK's (x, y, z) order, the array is (z, y, x)."""
    image = sitk.GetImageFromArray(np.asarray(array).astype(dtype))
    image.SetSpacing(tuple(float(s) for s in spacing))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _cube(shape=(12, 14, 16), lo=(3, 4, 5), hi=(8, 10, 11), value=1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = value
    return a


def _report_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.startswith("report") or ".report" in p.name)


def test_empty_prediction_and_both_empty_rules(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref = _cube()
    pred = np.roll(ref, 1, axis=2)
    empty = np.zeros_like(ref)
    _write(ref_dir / "a.nii.gz", ref)
    _write(pred_dir / "a.nii.gz", pred)
    _write(ref_dir / "b_emptypred.nii.gz", ref)
    _write(pred_dir / "b_emptypred.nii.gz", empty)
    _write(ref_dir / "c_bothempty.nii.gz", empty)
    _write(pred_dir / "c_bothempty.nii.gz", empty)
    _write(ref_dir / "d_emptyref.nii.gz", empty)
    _write(pred_dir / "d_emptyref.nii.gz", ref)

    report = ev.evaluate_folders(str(ref_dir), str(pred_dir))
    cases = report["cases"]
    assert report["settings"]["labels"] == [1]
    assert cases["a"]["dice"] == pytest.approx(medpy_binary.dc(pred, ref))
    assert cases["a"]["asd_voxel"] == pytest.approx(medpy_binary.asd(pred, ref))

    b = cases["b_emptypred"]
    assert b["dice"] == 0.0 and b["jaccard"] == 0.0
    assert all(b[m] is None for m in ev.METRICS[2:])
    assert b["per_label"]["1"]["status"] == "empty_prediction"
    c = cases["c_bothempty"]
    assert all(math.isnan(c[m]) for m in ev.METRICS)
    d = cases["d_emptyref"]
    assert d["dice"] == 0.0 and d["hd95_mm"] is None and d["per_label"]["1"]["status"] == "empty_reference"

    assert report["counts"] == {"cases": 4, "empty_prediction": 1, "empty_reference": 1, "both_empty": 1}
    # Distances are averaged over case a only (missing is not 0); Dice over a, b and d (c left out).
    assert report["mean"]["hd95_voxel"] == pytest.approx(cases["a"]["hd95_voxel"])
    assert report["n"]["hd95_voxel"] == 1
    assert report["mean"]["dice"] == pytest.approx(cases["a"]["dice"] / 3)
    assert report["n"]["dice"] == 3
    assert "null" in report["note"] and "published" in report["note"]

    out = tmp_path / "out" / "r.json"
    ev.write_report(report, str(out))
    loaded = json.loads(out.read_text())
    assert loaded["cases"]["b_emptypred"]["hd95_mm"] is None
    assert math.isnan(loaded["cases"]["c_bothempty"]["dice"])
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["case"] for r in rows] == ["a", "b_emptypred", "c_bothempty", "d_emptyref"]
    assert rows[1]["hd95_mm"] == "" and rows[1]["status"] == "empty_prediction"
    table = out.with_suffix(".md").read_text()
    assert "Empty predictions: 1" in table and "| w/o NMS | 4 |" in table
    assert not list(out.parent.glob("*.tmp"))


def test_multiple_labels_and_label_selection(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref = _cube()
    ref[9:11, 2:6, 2:6] = 2
    pred = np.roll(ref, 1, axis=1)
    _write(ref_dir / "m.nrrd", ref, spacing=(0.5, 0.8, 2.0))
    _write(pred_dir / "m.mha", pred, spacing=(0.5, 0.8, 2.0))  # endings may differ; case ids match
    report = ev.evaluate_folders(str(ref_dir), str(pred_dir))
    assert report["settings"]["labels"] == [1, 2]
    case = report["cases"]["m"]
    spacing = (2.0, 0.8, 0.5)  # array axes (z, y, x)
    for label in (1, 2):
        scores = case["per_label"][str(label)]
        assert scores["hd95_mm"] == pytest.approx(medpy_binary.hd95(pred == label, ref == label, spacing), rel=1e-3)
        assert scores["jaccard"] == pytest.approx(medpy_binary.jc(pred == label, ref == label))
    assert case["assd_mm"] == pytest.approx(np.mean([case["per_label"][k]["assd_mm"] for k in ("1", "2")]))
    assert "| w/o NMS | 2 |" in ev.format_table(report)

    only2 = ev.evaluate_folders(str(ref_dir), str(pred_dir), labels=[2])
    assert list(only2["cases"]["m"]["per_label"]) == ["2"]
    assert only2["cases"]["m"]["dice"] == pytest.approx(case["per_label"]["2"]["dice"])


@pytest.mark.needs_la_data(LA_H5)
def test_cli_end_to_end_on_real_masks(la_masks, tmp_path):
    ref_dir, pred_dir = tmp_path / "labelsTs", tmp_path / "pred"
    spacing_xyz = (0.625, 0.7, 2.5)
    spacing_arr = spacing_xyz[::-1]
    expected = {}
    for (case, ref), kind in zip(la_masks.items(), ("erode", "island", "shift")):
        pred = _perturb(ref, kind)
        _write(ref_dir / f"la_{case[:6]}.nii.gz", ref, spacing_xyz)
        _write(pred_dir / f"la_{case[:6]}.nii.gz", pred, spacing_xyz)
        expected[f"la_{case[:6]}"] = (pred, ref, kind)
    # What nnU-Net leaves beside its predictions must be ignored.
    for name in ("plans.json", "dataset.json", "predict_from_raw_data_args.json"):
        (pred_dir / name).write_text("{}")
    for case in expected:
        np.savez_compressed(pred_dir / f"{case}.npz", probabilities=np.zeros(1))
        (pred_dir / f"{case}.pkl").write_bytes(b"\x80\x04N.")

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "nnunet_sassnet.evaluation", "-ref", str(ref_dir), "-pred", str(pred_dir), "--both"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| w/o NMS | 3 |" in proc.stdout and "| w/ NMS (largest component) | 3 |" in proc.stdout

    report = json.loads((pred_dir / "report.json").read_text())
    assert (pred_dir / "report.csv").is_file() and (pred_dir / "report.md").is_file()
    assert report["settings"]["both_variants"] and report["variant"] == "raw"
    for case, (pred, ref, kind) in expected.items():
        raw = report["cases"][case]
        lcc = report["largest_component"]["cases"][case]
        p, r = _crop_for_medpy(pred, ref)
        want_mm = _medpy_all(p, r, spacing_arr)
        want_vox = _medpy_all(p, r, None)
        assert _close(raw["dice"], want_mm["dice"]) and _close(raw["jaccard"], want_mm["jaccard"])
        for metric in ("hd95", "asd", "assd"):
            assert _close(raw[f"{metric}_mm"], want_mm[metric]), (case, metric)
            assert _close(raw[f"{metric}_voxel"], want_vox[metric]), (case, metric)
        if kind == "island":
            kept = ev.keep_largest_component(pred)
            assert lcc["asd_mm"] < raw["asd_mm"] and lcc["hd95_mm"] <= raw["hd95_mm"]
            assert _close(lcc["hd95_mm"], medpy_binary.hd95(kept, ref, voxelspacing=spacing_arr))
        else:
            assert lcc["hd95_mm"] == raw["hd95_mm"]
    rows = list(csv.DictReader(open(pred_dir / "report.csv")))
    assert len(rows) == 6 and {r["variant"] for r in rows} == {"raw", "largest_component"}
    assert "95HD (voxel)" in (pred_dir / "report.md").read_text()


# --------------------------------------------------------------------------------------------------------
# bad input: one-line error naming the case, exit code != 0, no report written
# --------------------------------------------------------------------------------------------------------


@pytest.fixture()
def good_folders(tmp_path) -> tuple[Path, Path]:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for case in ("case_001", "case_002"):
        _write(ref_dir / f"{case}.nii.gz", _cube(), spacing=(0.7, 0.7, 2.5))
        _write(pred_dir / f"{case}.nii.gz", np.roll(_cube(), 1, axis=0), spacing=(0.7, 0.7, 2.5))
    return ref_dir, pred_dir


def _run_main(capsys, ref_dir: Path, pred_dir: Path, *extra: str) -> tuple[int, str]:
    rc = ev.main(["-ref", str(ref_dir), "-pred", str(pred_dir), *extra])
    err = capsys.readouterr().err
    return rc, err


def _assert_refused(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    for needle in needles:
        assert needle in err, err


def test_good_folders_pass(good_folders, capsys):
    ref_dir, pred_dir = good_folders
    rc = ev.main(["-ref", str(ref_dir), "-pred", str(pred_dir)])
    assert rc == 0
    assert "| w/o NMS | 2 |" in capsys.readouterr().out
    assert [p.name for p in _report_files(pred_dir)] == ["report.csv", "report.json", "report.md"]


def test_parallel_processes_give_the_same_report(good_folders):
    ref_dir, pred_dir = good_folders
    serial = ev.evaluate_folders(str(ref_dir), str(pred_dir), both=True)
    parallel = ev.evaluate_folders(str(ref_dir), str(pred_dir), both=True, num_processes=2)
    assert parallel["cases"] == serial["cases"] and parallel["mean"] == serial["mean"]
    assert parallel["largest_component"]["cases"] == serial["largest_component"]["cases"]


def _break_missing(ref_dir, pred_dir):
    (pred_dir / "case_002.nii.gz").unlink()
    return "case_002"


def _break_extra(ref_dir, pred_dir):
    _write(pred_dir / "case_003.nii.gz", _cube())
    return "case_003"


def _break_shape(ref_dir, pred_dir):
    _write(pred_dir / "case_002.nii.gz", _cube(shape=(12, 14, 17)), spacing=(0.7, 0.7, 2.5))
    return "case_002"


def _break_spacing(ref_dir, pred_dir):
    _write(pred_dir / "case_001.nii.gz", _cube(), spacing=(0.7, 0.7, 2.6))
    return "case_001"


def _break_non_integer(ref_dir, pred_dir):
    _write(pred_dir / "case_002.nii.gz", _cube() * 0.5, spacing=(0.7, 0.7, 2.5), dtype=np.float32)
    return "case_002"


def _break_negative(ref_dir, pred_dir):
    _write(ref_dir / "case_001.nii.gz", -_cube().astype(np.int16), spacing=(0.7, 0.7, 2.5), dtype=np.int16)
    return "case_001"


def _break_unreadable(ref_dir, pred_dir):
    (pred_dir / "case_001.nii.gz").write_bytes(b"this is not an image" * 10)
    return "case_001"


def _break_truncated(ref_dir, pred_dir):
    path = pred_dir / "case_002.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "case_002"


def _break_duplicate(ref_dir, pred_dir):
    _write(pred_dir / "case_001.nrrd", _cube(), spacing=(0.7, 0.7, 2.5))
    return "case_001"


def _break_vector(ref_dir, pred_dir):
    image = sitk.GetImageFromArray(np.stack([_cube(), _cube()], axis=-1), isVector=True)
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(pred_dir / "case_002.nii.gz"))
    return "case_002"


BREAKERS = {
    "missing_prediction": _break_missing,
    "extra_prediction": _break_extra,
    "shape_mismatch": _break_shape,
    "spacing_mismatch": _break_spacing,
    "non_integer_labels": _break_non_integer,
    "negative_labels": _break_negative,
    "unreadable_file": _break_unreadable,
    "truncated_file": _break_truncated,
    "duplicate_case": _break_duplicate,
    "multi_component": _break_vector,
}


@pytest.mark.parametrize("breaker", list(BREAKERS), ids=list(BREAKERS))
def test_bad_input_is_refused(good_folders, capsys, breaker):
    ref_dir, pred_dir = good_folders
    case = BREAKERS[breaker](ref_dir, pred_dir)
    rc, err = _run_main(capsys, ref_dir, pred_dir, "--both")
    _assert_refused(rc, err, case)
    assert _report_files(ref_dir.parent) == []


def test_bad_folders_and_options_are_refused(good_folders, capsys, tmp_path):
    ref_dir, pred_dir = good_folders
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "plans.json").write_text("{}")
    _assert_refused(*_run_main(capsys, empty, pred_dir), str(empty), "no reference images")
    _assert_refused(*_run_main(capsys, ref_dir, tmp_path / "nope"), "does not exist")
    _assert_refused(*_run_main(capsys, ref_dir, pred_dir, "-l", "0"), "label 0")
    _assert_refused(*_run_main(capsys, ref_dir, pred_dir, "-o", str(tmp_path / "x.txt")), "must end in .json")
    assert _report_files(tmp_path) == []


def test_existing_report_needs_overwrite(good_folders, capsys):
    ref_dir, pred_dir = good_folders
    assert ev.main(["-ref", str(ref_dir), "-pred", str(pred_dir)]) == 0
    before = (pred_dir / "report.json").read_text()
    capsys.readouterr()
    _assert_refused(*_run_main(capsys, ref_dir, pred_dir), "report.json exists", "--overwrite")
    assert (pred_dir / "report.json").read_text() == before
    # The report files beside the predictions are not taken for predictions on a second run.
    assert ev.main(["-ref", str(ref_dir), "-pred", str(pred_dir), "--overwrite"]) == 0
    assert ev.main(["-ref", str(ref_dir), "-pred", str(pred_dir), "--largest-component"]) == 0
    assert (pred_dir / "report_largest_component.json").is_file()


def test_bad_input_from_the_command_line_has_no_traceback(good_folders):
    ref_dir, pred_dir = good_folders
    _break_spacing(ref_dir, pred_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "nnunet_sassnet.evaluation", "-ref", str(ref_dir), "-pred", str(pred_dir)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: case case_001: prediction spacing") and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert _report_files(ref_dir.parent) == []
