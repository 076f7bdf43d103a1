"""The demo's picture: image, reference, prediction and the predicted signed distance map (SDM) of a few scans.

``nnUNetv2_predict`` writes segmentations only, so the SDM comes from running the trained network here: the
checkpoint's weights in :meth:`nnUNetTrainerSASSNet.build_network_architecture`, nnU-Net's preprocessing,
a Gaussian-weighted sliding window like nnU-Net's, and nnU-Net's resampling back to the scan's grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FigureCase", "predict_sdm", "write_figure"]


@dataclass
class FigureCase:
    """One row of the figure: arrays (z, y, x) on the scan's grid."""

    case_id: str
    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    sdm: np.ndarray
    dice: float | None = None


def predict_sdm(model_folder: Path, fold: str, image_files: list[list[str]], configuration: str,
                label: int = 1, threads: int | None = None) -> list[np.ndarray]:
    """The SDM of ``label`` predicted by the fold's final checkpoint, one array (z, y, x) per case.

    ``image_files`` lists each case's channel files, as for nnU-Net. The SDM is negative inside the predicted
    structure and positive outside (SASSNet's convention); outside nnU-Net's crop it is +1. ``threads``: torch
    threads while predicting (None: as they are); restored afterwards.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sassnet.checkpoints import load_weights_only
    from nnunet_sassnet.trainers import nnUNetTrainerSASSNet

    plans_manager = PlansManager(load_json(str(model_folder / "plans.json")))
    dataset_json = load_json(str(model_folder / "dataset.json"))
    cm = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = nnUNetTrainerSASSNet.build_network_architecture(
        plans_manager, cm, determine_num_input_channels(plans_manager, cm, dataset_json),
        label_manager.num_segmentation_heads, enable_deep_supervision=False)
    checkpoint = load_weights_only(model_folder / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu")
    network.load_state_dict(checkpoint["network_weights"])
    network.eval()

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _sliding_window_sdms(network, plans_manager, cm, dataset_json, image_files, label)
    finally:
        torch.set_num_threads(previous_threads)


def _sliding_window_sdms(network, plans_manager, cm, dataset_json: dict, image_files: list[list[str]],
                         label: int) -> list[np.ndarray]:
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    patch = tuple(int(p) for p in cm.patch_size)
    gaussian = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float32,
                                device=torch.device("cpu"))
    preprocessor = cm.preprocessor_class(verbose=False)
    results = []
    for files in image_files:
        data, _, properties = preprocessor.run_case(files, None, plans_manager, cm, dataset_json)
        padded, revert_padding = pad_nd_image(torch.from_numpy(data), patch, "constant", {"value": 0}, True, None)
        sdm = torch.zeros(padded.shape[1:])
        weight = torch.zeros(padded.shape[1:])
        with torch.no_grad():
            for start in np.stack(np.meshgrid(*compute_steps_for_sliding_window(padded.shape[1:], patch, 0.5),
                                              indexing="ij"), -1).reshape(-1, len(patch)):
                window = tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch))
                _, tile_sdm = network(padded[(slice(None), *window)][None], return_sdm=True)
                # SDM channel c belongs to segmentation output c
                sdm[window] += tile_sdm[0, label] * gaussian
                weight[window] += gaussian
        sdm = (sdm / weight)[revert_padding[1:]].numpy()

        # back to the scan's grid, as nnU-Net exports its predictions: resample, undo the crop, undo the transpose
        spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
        sdm = np.asarray(cm.resampling_fn_probabilities(
            sdm[None], properties["shape_after_cropping_and_before_resampling"], cm.spacing, spacing))[0]
        full = np.ones(properties["shape_before_cropping"], dtype=np.float32)
        full = insert_crop_into_image(full, sdm.astype(np.float32), properties["bbox_used_for_cropping"])
        results.append(np.asarray(full).transpose(plans_manager.transpose_backward))
    return results


def _slice_index(reference: np.ndarray, prediction: np.ndarray) -> int:
    """The axial slice with the largest reference area (or prediction area, if the reference is empty)."""
    area = reference.reshape(reference.shape[0], -1).sum(1)
    if not area.any():
        area = prediction.reshape(prediction.shape[0], -1).sum(1)
    return int(np.argmax(area))


def write_figure(cases: list[FigureCase], output_png: Path, title: str) -> None:
    """One row per case (its slice through the largest reference area): image, reference, prediction, SDM."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.3 * len(cases) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cases), 4, squeeze=False)
    red = ListedColormap([(0, 0, 0, 0), (0.95, 0.2, 0.2, 0.45)])
    blue = ListedColormap([(0, 0, 0, 0), (0.2, 0.55, 1.0, 0.45)])
    for row, case in zip(axes, cases):
        z = _slice_index(case.reference, case.prediction)
        image, reference, prediction = case.image[z], case.reference[z] > 0, case.prediction[z] > 0
        low, high = np.percentile(case.image, (0.5, 99.5))
        for ax in row:
            ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{case.case_id[:10]}\nslice z={z}", fontsize=9)
        row[1].imshow(reference, cmap=red, vmin=0, vmax=1, interpolation="nearest")
        row[2].imshow(prediction, cmap=blue, vmin=0, vmax=1, interpolation="nearest")
        if reference.any():
            row[2].contour(reference, levels=[0.5], colors=["red"], linewidths=1.0)
        shown = row[3].imshow(case.sdm[z], cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
        if (case.sdm[z] < 0).any() and (case.sdm[z] > 0).any():
            row[3].contour(case.sdm[z], levels=[0.0], colors=["black"], linewidths=1.0)
        if reference.any():
            row[3].contour(reference, levels=[0.5], colors=["limegreen"], linewidths=1.2, linestyles="dashed")
        fig.colorbar(shown, ax=row[3], fraction=0.046, pad=0.02)
        dice = "" if case.dice is None else f", Dice {case.dice:.2f}"
        row[2].set_title(f"prediction{dice}", fontsize=10)
    axes[0, 0].set_title("image", fontsize=10)
    axes[0, 1].set_title("reference (label)", fontsize=10)
    axes[0, 3].set_title("predicted SDM", fontsize=10)
    fig.suptitle(f"{title}\nred and green dashed outlines: reference; black: the predicted SDM's 0 level",
                 fontsize=11)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_png, dpi=90)
