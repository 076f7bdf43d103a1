"""Self-training in one command (``nnunet_sassnet_selftrain``): nnU-Net's noisy student on ``imagesUnlabeled``.

* :mod:`~nnunet_sassnet.selftraining.cli`: the command line; :mod:`~.checks`: its checks (bad input).
* :mod:`~.recipe`: the rounds and their steps (teacher, pseudo-labels, the student's dataset, student,
  fine-tuning).
* :mod:`~.state`: each round's record in its student's dataset folder, which makes a rerun continue.
* :mod:`~.training`: model folders and nnU-Net's training of one fold.
* :mod:`~.pseudo_labels`: nnU-Net's predictor on the unlabeled scans, the confidence options.
* :mod:`~.student_dataset`: the student's raw folder, plan transfer, splits and preprocessing.
* :mod:`~.folders`: nnU-Net's folders, dataset names and free IDs.

See docs/self_training.md.
"""
from nnunet_sassnet.selftraining.cli import main

__all__ = ["main"]
