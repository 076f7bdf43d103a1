"""``python -m benchmarks.la_semisup``: the command line (see the package's docstring and ``--help``)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from nnunet_sassnet.discovery import trainer_dir
from nnunet_sassnet.errors import UserInputError, run_cli

from benchmarks.bench_common import exit_without_native_teardown
from benchmarks.la_semisup import evidence, ledger, tables, which_trainer
from benchmarks.la_semisup.environment import environment_info, record_source
from benchmarks.la_semisup.preparation import convert_datasets, prepare_in_background
from benchmarks.la_semisup.queue import load_queue
from benchmarks.la_semisup.settings import (REPO, RunSpec, Settings, build_parser, resolve_settings,
                                            semi_dataset_key, unlabeled_key)
from benchmarks.la_semisup.split import Split, budget_split, make_split
from benchmarks.la_semisup.stages import STATUS_NOT_STARTED, finish_run, run_in_turn
from benchmarks.la_semisup.supervisor import Supervisor
from benchmarks.la_semisup.trainer_lookup import (BENCH_TRAINER_DIR, bases_variable, current_settings_ids,
                                                  resolve_trainers, settings_id)

DEFAULT_LEDGER = REPO / "docs" / "semisup_ledger.jsonl"
DEFAULT_RESULTS_DOC = REPO / "docs" / "semisup_results.md"
DEFAULT_README = REPO / "README.md"
RECORDED = ("done", "failed", "timeout", "interrupted")  # what goes into the ledger; not started runs stay queued


def benchmark(s: Settings) -> int:
    """Run the call; 0 when every run it trained was scored, 1 otherwise, 130 when interrupted."""
    if s.device == "cuda" and not s.prepare_only:
        import torch
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda, but torch sees no CUDA device; pass --device cpu (slow) or run "
                                 "on a GPU machine")
    user_ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    sup = Supervisor(s, [str(BENCH_TRAINER_DIR), *user_ext])
    sup.say(f"work folder {s.workdir}; results {s.output}")
    _resolve(s, sup)
    split = make_split(s)
    environment = environment_info(s.device, s.commit, sup.prepared)
    splits = _budget_splits(s, split)
    protos = {key: ledger.protocol(s, sp, environment["nnunetv2"]) for key, sp in splits.items()}
    recorded = ledger.read_ledger(s.ledger)
    _fill_seed_rules(s, sup, recorded, protos)
    call = {"id": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {environment['host']}",
            "command": "python -m benchmarks.la_semisup " + " ".join(s.argv), "concurrency": s.concurrency,
            "workers_per_run": s.workers_per_run, "workers_semi": s.workers_semi, "time_limit_s": s.time_limit}
    entries = {r.key: ledger.new_entry(r, protos[r.semi_dataset], splits[r.semi_dataset], call, environment)
               for r in s.runs}
    done = ledger.done_identities(recorded)
    for run in s.runs:
        if run.base_import == ("", "", ""):
            entries[run.key]["status"] = "trainer not found"
        elif ledger.identity(entries[run.key]) in done:
            entries[run.key]["status"] = "done earlier (ledger)"
    sup.runs = [r for r in s.runs if entries[r.key]["status"] == "pending"]
    sup.bases = bases_variable(sup.runs)
    sup.doc = {"benchmark": "la_semisup", "settings": _settings_record(s, split), "protocol": protos["semi"],
               "split": {"labeled": split.labeled, "unlabeled": split.unlabeled, "evaluation": split.test},
               "budgets": {key: {"num_labeled": len(sp.labeled), "labeled": sp.labeled,
                                 "protocol_id": ledger.protocol_id(protos[key])}
                           for key, sp in splits.items() if key != "semi"},
               "environment": environment, "datasets": {}, "runs": entries}
    _hook_records(sup, recorded, entries)
    sup.write()
    if s.prepare_only or sup.runs:
        try:
            _run_stages(sup, splits)
        except KeyboardInterrupt:
            sup.say("interrupted: stopping every running step")
            sup.stop_all()
            for event in sup.events.values():
                event.set()  # runs still waiting for their data give up
            with sup.lock:
                for run in sup.runs:
                    entry = entries[run.key]
                    if entry["status"] == "pending":
                        finish_run(sup, run, "interrupted" if entry.get("started_utc") else STATUS_NOT_STARTED,
                                   "stopped by an interrupt")
            print("\n" + sup.doc["table"], flush=True)
            return 130
    else:
        sup.say("nothing to run: every run of the queue is done in the ledger")
    sup.write()
    print("\n" + sup.doc["table"], flush=True)
    print(f"Results: {s.output} (table: {s.output.with_suffix('.md')}); models, predictions and logs: {s.run_dir}"
          + (f"; ledger: {s.ledger}" if s.ledger else ""), flush=True)
    if s.prepare_only:
        record_source(sup.prepared)
        ok = all(ok for ok, _ in sup.state.values())
        return 0 if ok else 1
    return 0 if all(entries[r.key]["status"] == "done" for r in sup.runs) else 1


def _resolve(s: Settings, sup: Supervisor) -> None:
    """Find the trainers; a queue's unknown trainer (one not written yet) is left out, a named one refused."""
    lookup_dirs = [*sup.ext_dirs, trainer_dir()]
    if s.queue_file is None:
        resolve_trainers(s.runs, lookup_dirs, sup.logs / "trainer_lookup.log")
        return
    for trainer in dict.fromkeys(r.trainer for r in s.runs):
        runs = [r for r in s.runs if r.trainer == trainer]
        try:
            resolve_trainers(runs, lookup_dirs, sup.logs / "trainer_lookup.log")
        except UserInputError as e:
            sup.say(f"{', '.join(r.key for r in runs)}: left out of this call ({e.one_line()})")


def _budget_splits(s: Settings, split: Split) -> dict[str, Split]:
    """The split of each label budget the runs and seed rules name ('semi': the protocol's own)."""
    budgets = {r.num_labeled for r in s.runs} | {rule.num_labeled for rule in s.seed_rules}
    splits = {"semi": split}
    for n in sorted(b for b in budgets if b is not None):
        if n > len(split.labeled):
            raise UserInputError(f"num_labeled {n}: the split has only {len(split.labeled)} labeled scans; a "
                                 f"budget takes the first N of them")
        splits[semi_dataset_key(n)] = budget_split(split, n)
    return splits


def _fill_seed_rules(s: Settings, sup: Supervisor, recorded: list[dict[str, Any]],
                     protos: dict[str, dict[str, Any]]) -> None:
    """Each {"seed_of_positive": N} of the queue becomes, at its place, seed N of every setting of its budget
    whose seeds 0 and 1 are both positive in the ledger, unless the trainer's settings changed since."""
    lookup_dirs = [*sup.ext_dirs, trainer_dir()]
    for rule in sorted(s.seed_rules, key=lambda r: r.position, reverse=True):
        pid = ledger.protocol_id(protos[semi_dataset_key(rule.num_labeled)])
        settings: dict[tuple, list[dict[str, Any]]] = {}
        for entry in recorded:
            if entry["protocol_id"] == pid and entry["data"] == "semi" and not evidence.is_baseline(entry):
                settings.setdefault(evidence.setting_key(entry), []).append(entry)
        keys, added = {r.key for r in s.runs}, []
        for runs in settings.values():
            last = runs[-1]
            if s.only_kind not in (None, last["kind"]) or not evidence.positive_on_first_seeds(runs, recorded):
                continue
            run = RunSpec(trainer=last["trainer"], seed=rule.seed, data="semi", kind=last["kind"],
                          compile=bool(last["compile"]), num_labeled=rule.num_labeled)
            if run.key in keys:
                continue
            try:
                resolve_trainers([run], lookup_dirs, sup.logs / "trainer_lookup.log")
            except UserInputError as e:
                sup.say(f"{run.key}: left out of this call ({e.one_line()})")
                continue
            if settings_id(run.settings) != last["settings_id"]:
                sup.say(f"{run.key}: left out of this call (the trainer's settings changed since its positive "
                        f"seeds 0 and 1)")
                continue
            added.append(run)
        s.runs[rule.position:rule.position] = added
        sup.say(f"seed {rule.seed} of the settings positive on seeds 0 and 1"
                f"{'' if rule.num_labeled is None else f' ({rule.num_labeled} labeled)'}: "
                f"{', '.join(r.key for r in added) or 'none'}")


def _settings_record(s: Settings, split: Split) -> dict[str, Any]:
    return {"argv": s.argv, "data": str(s.data), "spacing_mm": s.spacing, "split_source": split.source,
            "steps": s.steps, "epochs": s.epochs, "iterations_per_epoch": s.iterations_per_epoch,
            "val_iterations_per_epoch": s.val_iterations, "device": s.device, "concurrency": s.concurrency,
            "workers_per_run": s.workers_per_run, "workers_semi": s.workers_semi, "cpu_smoke": s.cpu_smoke,
            "plans": s.plans, "test_time_mirroring": s.tta, "step_size": s.step_size, "time_limit_s": s.time_limit,
            "min_start_s": s.min_start, "queue": str(s.queue_file) if s.queue_file else None,
            "ledger": str(s.ledger) if s.ledger else None, "workdir": str(s.workdir), "run_dir": str(s.run_dir)}


def _hook_records(sup: Supervisor, recorded: list[dict[str, Any]], entries: dict[str, dict[str, Any]]) -> None:
    """Each finished run goes into the ledger at once, and the tables are made again from the records."""
    s = sup.s

    # the settings of this call's trainers as they are now: a trainer's older recorded settings are marked
    current = {**current_settings_ids({e["trainer"] for e in recorded}),
               **{r.trainer: settings_id(r.settings) for r in s.runs if r.base_import != ("", "", "")}}

    def on_run_finished(run: RunSpec, entry: dict[str, Any]) -> None:
        if entry["status"] not in RECORDED:
            return
        if s.ledger is not None:
            ledger.append(s.ledger, entry)
        recorded.append(entry)
        if s.results_doc is not None:
            tables.update_document(s.results_doc, recorded, current)

    def on_write() -> None:
        pool = [*recorded, *(e for e in entries.values() if e not in recorded)]
        lines = tables.run_rows(list(entries.values()), pool, current)
        lines += ["", "| Stage | Seconds | From (s) | To (s) | Status |", "|---|---|---|---|---|"]
        lines += [f"| {st['stage']} | {st['seconds']:.1f} | {st['start_s']:.1f} | {st['end_s']:.1f} | "
                  f"{st['status']} |" for st in sup.stages]
        sup.doc["table"] = "\n".join(lines) + f"\n\nTotal wall time: {sup.elapsed():.1f} s\n"

    sup.on_run_finished, sup.on_write = on_run_finished, on_write


def _run_stages(sup: Supervisor, splits: dict[str, Split]) -> None:
    """Convert, then prepare each dataset and run each training in threads; return when all are done."""
    datasets = convert_datasets(sup, splits)
    sup.expect([*datasets, *(unlabeled_key(key) for key in datasets if key.startswith("semi"))])
    sup.doc["datasets"] = {k: {kk: vv for kk, vv in d.items() if kk != "stamp"} for k, d in datasets.items()}
    sup.write()
    threads = prepare_in_background(sup, datasets)
    if not sup.s.prepare_only:
        threads += [threading.Thread(target=run_in_turn, args=(sup, run, ticket, datasets), name=f"run-{run.key}",
                                     daemon=True) for ticket, run in enumerate(sup.runs)]
        for thread in threads[len(datasets):]:
            thread.start()
    # joined with a timeout so that SIGINT/SIGTERM reach this (main) thread
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.5)


def _other_commands(args: Any) -> int | None:
    """--import-run and --tables: ledger upkeep without training; None when neither is asked for."""
    if args.import_run:
        if not args.import_commit:
            raise UserInputError("--import-run needs --import-commit: the commit the run was made at")
        path = Path(args.ledger or DEFAULT_LEDGER)
        added = ledger.import_result_json(Path(args.import_run), args.import_commit, path, args.import_date)
        print(f"{len(added)} runs of {args.import_run} recorded in {path}")
    if args.tables or args.import_run:
        path = Path(args.results_doc or DEFAULT_RESULTS_DOC)
        entries = ledger.read_ledger(Path(args.ledger or DEFAULT_LEDGER))
        current = current_settings_ids({e["trainer"] for e in entries})
        tables.update_document(path, entries, current)
        print(f"tables of {path} made from the ledger")
        readme = Path(args.readme or DEFAULT_README)
        if readme.is_file() and which_trainer.update_readme(readme, entries, current):
            print(f"\"Which trainer to use\" table of {readme} made from the ledger")
        elif args.readme:
            raise UserInputError(f"--readme {readme}: has no generated table; add the two lines\n"
                                 f"{which_trainer.BEGIN}\n{which_trainer.END}\nwhere the table goes")
        return 0
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: 0 all runs scored, 1 some run failed, 2 bad input, 130 interrupted."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    g = parser.add_argument_group("ledger upkeep (no training)")
    g.add_argument("--tables", action="store_true", help="regenerate the tables of --results-doc from --ledger")
    g.add_argument("--import-run", default=None, metavar="JSON",
                   help="record the runs of a results JSON made before the ledger existed (with --import-commit)")
    g.add_argument("--import-commit", default=None, help="the commit that --import-run's runs were made at")
    g.add_argument("--import-date", default=None, help="the UTC date of --import-run's runs (YYYY-MM-DD)")
    g.add_argument("--readme", default=None,
                   help="with --tables: the file whose \"Which trainer to use\" table (between its markers) is made "
                        "from the ledger too [README.md, where it has the markers]")
    args = parser.parse_args(args_list)

    def on_sigterm(signum, frame):  # a time-limited caller's stop: end the subprocesses and write what is there
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)

    def body() -> int:
        other = _other_commands(args)
        if other is not None:
            return other
        protocol, runs, rules = load_queue(Path(args.queue)) if args.queue else (None, None, [])
        if args.kind and not args.queue:
            raise UserInputError("--kind selects runs of a queue: give --queue too")
        if args.queue and not args.cpu_smoke:
            args.ledger = args.ledger or str(DEFAULT_LEDGER)
            args.results_doc = args.results_doc or str(DEFAULT_RESULTS_DOC)
        return benchmark(resolve_settings(args, args_list, protocol, runs, rules))

    return run_cli(body)


if __name__ == "__main__":
    exit_without_native_teardown(main())
