"""Score segmentations with the metrics of the SASSNet paper (Dice, Jaccard, 95HD, ASD, ASSD).

Command line::

    nnunet_sassnet_evaluate -ref labelsTs -pred pred [-o report.json] [--largest-component | --both] [-l 1 2 ...]

Modules: :mod:`.metrics` (the metrics as functions on arrays), :mod:`.masks` and :mod:`.surface` (what they
share), :mod:`.images` (reading and checking label images), :mod:`.scoring` (one case),
:mod:`.aggregate` (means over labels and cases), :mod:`.folders` (two folders, the library entry point),
:mod:`.report` (JSON, CSV, Markdown) and :mod:`.cli`.

The metric functions give the values of ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``, ``assd``;
surfaces with connectivity 1) but crop both masks to their joint bounding box and use the exact,
multi-threaded ``edt`` distance transform, so that large volumes are scored in seconds.
"""
from nnunet_sassnet.errors import UserInputError
from nnunet_sassnet.evaluation.cli import main
from nnunet_sassnet.evaluation.folders import evaluate_folders
from nnunet_sassnet.evaluation.images import IMAGE_ENDINGS
from nnunet_sassnet.evaluation.masks import keep_largest_component
from nnunet_sassnet.evaluation.metrics import asd, assd, dice, hd95, jaccard
from nnunet_sassnet.evaluation.report import format_table, report_paths, write_report
from nnunet_sassnet.evaluation.scoring import METRICS

__all__ = [
    "METRICS",
    "IMAGE_ENDINGS",
    "UserInputError",
    "dice",
    "jaccard",
    "hd95",
    "asd",
    "assd",
    "keep_largest_component",
    "evaluate_folders",
    "write_report",
    "report_paths",
    "format_table",
    "main",
]
