"""What the ledger's runs say about a setting: paired per-scan differences against nnUNetTrainer of the same
seed, pooled over the seeds, a bootstrap interval over the scans, and the verdict of the rule fixed in
docs/semisup_results.md before the runs it judges.

A *setting* is a trainer with its class settings, run kind, dataset and torch.compile, within one protocol
(split, steps, plans, ...): :func:`setting_key`. The rule (:func:`verdict`): a setting **pays** when, over its
seeds, the pooled mean per-scan Dice difference is at least +1.0 point, the lower end of its 95 % bootstrap
interval over the scans is above 0, and every seed's mean difference is positive. Seeds 0 and 1 are run for
every setting; seed 2 for nnUNetTrainer and for every setting whose seeds 0 and 1 are both positive.
"""
from __future__ import annotations

import math
import statistics
import warnings
from typing import Any, Iterable

import numpy as np

from benchmarks.la_semisup.settings import BASELINE

SEEDS_REPORTED = (0, 1, 2)
SEEDS_FIRST = (0, 1)  # every setting; seed 2 joins where both are positive
SEED_OF_POSITIVE = 2
PAYS_POINTS = 1.0  # pooled mean per-scan ΔDice a setting must reach
INTERVAL_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # numpy.random.default_rng(BOOTSTRAP_SEED): the same interval every time the tables are made
PAYS, DOES_NOT_PAY, OPEN = "pays", "does not pay", "open"


def number(value: Any) -> float | None:
    """A finite float, else None."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def is_baseline(entry: dict[str, Any]) -> bool:
    """Stock nnUNetTrainer on the labeled scans, eager: what every run of its seed is compared with."""
    return (entry["trainer"] == BASELINE and entry["kind"] == "train" and entry["data"] == "semi"
            and not entry["compile"])


def setting_key(entry: dict[str, Any]) -> tuple:
    """What makes runs of different seeds the same setting: protocol, kind, trainer, dataset, compile, settings."""
    return (entry["protocol_id"], entry["kind"], entry["trainer"], entry["data"], bool(entry["compile"]),
            entry["settings_id"])


def find_baseline(entry: dict[str, Any], pool: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The done baseline of the entry's protocol and seed: from the entry's own call if there is one, else the
    latest recorded (a reused baseline)."""
    candidates = [e for e in pool if is_baseline(e) and e["status"] == "done" and e.get("cases")
                  and e["protocol_id"] == entry["protocol_id"] and e["seed"] == entry["seed"]]
    same_call = [e for e in candidates if e["call"].get("id") == entry["call"].get("id")]
    chosen = same_call or candidates
    return chosen[-1] if chosen else None


def paired(entry: dict[str, Any], base: dict[str, Any]) -> dict[str, Any] | None:
    """Per-scan Dice differences (points) of ``entry`` against ``base`` on the scans both scored."""
    cases = sorted(c for c in (entry.get("cases") or {}) if c in base["cases"]
                   and number(entry["cases"][c]["dice"]) is not None and number(base["cases"][c]["dice"]) is not None)
    diffs = [100.0 * (entry["cases"][c]["dice"] - base["cases"][c]["dice"]) for c in cases]
    if not diffs:
        return None
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
    return {"n": len(diffs), "mean_dice_diff_points": mean, "std_dice_diff_points": std,
            "median_dice_diff_points": statistics.median(diffs),
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
            "wilcoxon_p": _wilcoxon(diffs), "per_case_points": dict(zip(cases, diffs))}


def _wilcoxon(diffs: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences (None where undefined)."""
    if not any(diffs):
        return None
    try:
        from scipy.stats import wilcoxon
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(wilcoxon(diffs).pvalue)
    except (ImportError, ValueError):
        return None
    return p if math.isfinite(p) else None


def latest_done(runs: Iterable[dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """The last recorded done run of ``seed`` with per-scan results."""
    done = [e for e in runs if e["seed"] == seed and e["status"] == "done" and e.get("cases")]
    return done[-1] if done else None


def seed_pairs(runs: list[dict[str, Any]], pool: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """For each reported seed that both the setting (``runs``) and its baseline (in ``pool``) have: the paired
    comparison of the setting's latest done run of that seed."""
    pairs = {}
    for seed in SEEDS_REPORTED:
        run = latest_done(runs, seed)
        base = find_baseline(run, pool) if run is not None else None
        pair = paired(run, base) if base is not None else None
        if pair is not None:
            pairs[seed] = pair
    return pairs


def bootstrap_interval(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = INTERVAL_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``: ``resamples`` draws of len(values) values with
    replacement from a generator seeded with ``seed`` (the same interval for the same values, every time)."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def pooled(pairs: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The pooled difference: per scan, the mean over the seeds of ``pairs`` (on the scans every seed scored);
    its mean, median, wins (scans above 0) and the bootstrap interval of the mean over the scans."""
    if not pairs:
        return None
    cases = sorted(set.intersection(*(set(p["per_case_points"]) for p in pairs.values())))
    if not cases:
        return None
    per_case = {c: statistics.fmean(p["per_case_points"][c] for p in pairs.values()) for c in cases}
    values = list(per_case.values())
    return {"seeds": sorted(pairs), "n": len(values), "mean": statistics.fmean(values),
            "median": statistics.median(values), "wins": sum(v > 0 for v in values),
            "interval": bootstrap_interval(values), "per_case_points": per_case}


def verdict(seed_means: dict[int, float], pooled_stats: dict[str, Any] | None) -> tuple[str, str]:
    """The rule, as (pays / does not pay / open, why): every seed's mean ΔDice positive, seeds 0 and 1 run,
    seed 2 run where both were positive, pooled mean >= +1.0 point, interval's lower end above 0."""
    for seed, mean in sorted(seed_means.items()):
        if mean <= 0:
            return DOES_NOT_PAY, f"seed {seed} {mean:+.2f}"
    missing = [str(s) for s in SEEDS_FIRST if s not in seed_means]
    if missing:
        return OPEN, f"seed{'s' if len(missing) > 1 else ''} {' and '.join(missing)} to run"
    if SEED_OF_POSITIVE not in seed_means:
        return OPEN, f"seeds 0 and 1 positive: seed {SEED_OF_POSITIVE} to run"
    if pooled_stats is None:
        return OPEN, "no scan scored by every seed"
    if pooled_stats["mean"] < PAYS_POINTS:
        return DOES_NOT_PAY, f"{pooled_stats['mean']:+.2f} over the seeds, below +{PAYS_POINTS:.1f}"
    if pooled_stats["interval"][0] <= 0:
        return DOES_NOT_PAY, f"interval from {pooled_stats['interval'][0]:+.2f}, not above 0"
    return PAYS, ""


def evidence(runs: list[dict[str, Any]], pool: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the tables show of one setting (``runs``: its entries; ``pool``: every entry, baselines too)."""
    pairs = seed_pairs(runs, pool)
    stats = pooled(pairs)
    word, why = verdict({s: p["mean_dice_diff_points"] for s, p in pairs.items()}, stats)
    # pooled figures are shown for settings with more than one seed (one seed's are its own row's)
    return {"pairs": pairs, "pooled": stats if len(pairs) > 1 else None, "verdict": word, "why": why}


def positive_on_first_seeds(runs: list[dict[str, Any]], pool: list[dict[str, Any]]) -> bool:
    """Whether seeds 0 and 1 of the setting both beat nnUNetTrainer on average (seed 2 joins then)."""
    pairs = seed_pairs(runs, pool)
    return all(s in pairs and pairs[s]["mean_dice_diff_points"] > 0 for s in SEEDS_FIRST)


def setting_labels(entries: list[dict[str, Any]], current: dict[str, str] | None = None) -> dict[tuple, str]:
    """The name each setting is shown by. Settings of a trainer that are not its newest (:func:`newest_settings`:
    its class's defaults changed since) carry the date and commit of their last run, so that runs of one trainer
    with different settings are told apart; titles that already name their defaults stay as they are.
    """
    last: dict[tuple, dict[str, Any]] = {}  # (trainer group, settings id) -> its last entry
    for entry in entries:
        last[(_group(entry), entry["settings_id"])] = entry
    newest = newest_settings(entries, current)
    labels = {}
    for (group, settings), entry in last.items():
        title = entry["title"]
        if settings != newest[group] and "(defaults of " not in title:
            date = (entry.get("finished_utc") or entry["call"].get("started_utc") or "?")[:10]
            title += f" (settings of {date}, {(entry.get('commit') or '?')[:7]})"
        labels[(group, settings)] = title
    return {setting_key(e): labels[(_group(e), e["settings_id"])] for e in entries}


def _group(entry: dict[str, Any]) -> tuple:
    """A trainer as a run uses it, whatever its settings: kind, trainer, dataset, compile."""
    return entry["kind"], entry["trainer"], entry["data"], bool(entry["compile"])


def newest_settings(entries: list[dict[str, Any]], current: dict[str, str] | None = None) -> dict[tuple, str]:
    """For each trainer group, the settings id of its class as it is now: ``current`` (trainer -> settings id of
    the class this checkout defines) where it names the trainer, else that of the group's last recorded run."""
    current = current or {}
    return {_group(e): current.get(e["trainer"], e["settings_id"]) for e in entries}


def is_current(entry: dict[str, Any], newest: dict[tuple, str]) -> bool:
    """Whether the entry's settings are its trainer's newest recorded ones (``newest``: :func:`newest_settings`);
    runs imported with the defaults of an older commit are not."""
    return newest.get(_group(entry)) == entry["settings_id"] and "(defaults of " not in entry["title"]
