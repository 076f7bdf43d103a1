"""Does SASSNet help nnU-Net? A same-steps, same-seed benchmark on the LA 2018 lite data (1.25 mm).

From UA-MT's LA scans at 1.25 mm (``../shared/data/la2018_uamt_lite_1.25mm``) the benchmark

1. converts nnU-Net datasets with the project's converter: the semi-supervised one (by default the first
   8 scans of train.list labeled, the next 52 unlabeled, the last 20 as evaluation scans), one more for each
   smaller label budget a queue names (the first N of those labeled, the same unlabeled and evaluation scans)
   and, where a run needs it, the all-labeled one (the 60 non-evaluation scans labeled: the ceiling);
2. plans and preprocesses them (3d_fullres, nnU-Net's own plans; ``--cpu-smoke``: small derived plans) and
   preprocesses the unlabeled scans (:mod:`.preparation`);
3. trains every run with the same number of steps and its seed, several at once as separate processes on one
   device, in queue order (:mod:`.stages`, :mod:`.supervisor`); a self-training run trains twice;
4. predicts the evaluation scans with nnU-Net's predictor, scores them with
   :func:`nnunet_sassnet.evaluation.evaluate_folders`, and writes each run the moment it ends into this
   call's results and, with ``--ledger``, into the ledger that accumulates run after run (:mod:`.ledger`);
   the tables (this call's and, with ``--results-doc``, those of docs/semisup_results.md) are regenerated from
   the records, with the paired per-scan Dice difference of each run against ``nnUNetTrainer`` of its seed
   (:mod:`.tables`), pooled over the seeds with a bootstrap interval and the verdict of the rule fixed in
   docs/semisup_results.md (:mod:`.evidence`); ``--tables`` also makes the README's "Which trainer to use"
   table (:mod:`.which_trainer`).

A queue file (:mod:`.queue`, e.g. ``benchmarks/queue_la8.json``) fixes the protocol and the runs in order;
runs already done in the ledger (same protocol, trainer settings and seed) are not trained again, which is
how a seed's ``nnUNetTrainer`` baseline is reused.

GPU, one queue call within a time limit (see ``benchmarks/lent_gpu.sh``)::

    python -m benchmarks.la_semisup --queue benchmarks/queue_la8.json --data DIR --workdir /tmp/la \\
        --ledger docs/semisup_ledger.jsonl --results-doc docs/semisup_results.md --time-limit 520

CPU smoke test (a handful of scans, tiny network, a few steps)::

    python -m benchmarks.la_semisup --cpu-smoke
"""
