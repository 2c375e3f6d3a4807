"""Many experiments -> one honest answer: groups of seeds, means, spreads and confidence intervals.

Experiments are grouped by everything they were run with except `seed`: the commit, the
models present, and every param. Within a group the runs differ only in the training
seed, so each is one sample of the same recipe. For each group and model the summary
gives n, the mean, the sample standard deviation and a 95% Student t interval for the
mean; and, because both models of an experiment are trained with the same seed on the
same split, the *paired* difference between the first two models (ViT - CNN) over the
seeds they share, with its own t interval. That interval is narrower than comparing two
unpaired means whenever the seed moves both models the same way, and it is the one that
answers "is the gap real".
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from scipy import stats

from vitcnn.study.experiments import CHANCE, SUMMARIZED, Baseline, Experiment

SEED = "seed"
CONFIDENCE = 0.95
UNIT = (0.0, 1.0)
POSITIVE = (0.0, math.inf)
# What each summarized metric can be: its interval is clipped to this range.
BOUNDS = {"test_acc": UNIT, "corruption_acc": UNIT, "ece": UNIT, "ece_ts": UNIT, "train_time_s": POSITIVE,
          "train_images_per_s": POSITIVE}
DIFF_BOUNDS = (-1.0, 1.0)  # a difference of two accuracies


@dataclass
class Estimate:
    """A sample's mean, standard deviation (n - 1) and 95% t interval; no spread from one value."""

    n: int
    mean: float
    std: float | None
    ci95: tuple[float, float] | None
    clipped: bool = False  # the t interval crossed what the quantity allows, and was cut there

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "ci95": list(self.ci95) if self.ci95 else None,
                "clipped": self.clipped}


def estimate(values: list[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
    """n, mean, sample std and the 95% Student t interval of the mean, clipped to `bounds`."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(n, mean, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    if std == 0:  # identical runs (deterministic training): the interval is the point
        return Estimate(n, mean, 0.0, (mean, mean))
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=std / math.sqrt(n))
    clipped = (max(float(low), bounds[0]), min(float(high), bounds[1]))
    return Estimate(n, mean, std, clipped, clipped != (float(low), float(high)))


@dataclass
class Group:
    params: dict[str, Any]  # the params that differ between groups (the commit too, if several)
    baseline: str
    models: tuple[str, ...]
    experiments: list[Experiment]  # successful, one per seed
    metrics: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # {model: {metric: estimate}}
    pairs: dict[tuple[str, str], Estimate] = field(default_factory=dict)  # paired a - b test accuracy, each pair
    duplicates: list[str] = field(default_factory=list)  # older runs of a seed already in the group
    at_chance: dict[str, int] = field(default_factory=dict)  # {model: runs in which it is not clearly above chance}

    @property
    def seeds(self) -> list[int]:
        return [e.params.get(SEED) for e in self.experiments]

    @property
    def diff(self) -> Estimate | None:
        """The paired difference of the first two models (ViT - CNN), the one most tables show."""
        return self.pairs.get(self.models[:2]) if len(self.models) >= 2 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "commit": self.baseline,
            "models": list(self.models),
            "n": len(self.experiments),
            "seeds": self.seeds,
            "experiments": [e.name for e in self.experiments],
            "metrics": {m: {k: e.as_dict() for k, e in values.items()} for m, values in self.metrics.items()},
            "diff_test_acc": self.diff.as_dict() if self.diff else None,
            "diff_models": list(self.models[:2]) if self.diff else None,
            "pairs": [{"a": a, "b": b, "diff_test_acc": e.as_dict()} for (a, b), e in self.pairs.items()],
            "duplicates": self.duplicates,
            "at_chance": self.at_chance,
        }


@dataclass
class Summary:
    groups: list[Group]
    varying: list[str]  # param keys whose values differ between groups, in params.yaml order
    shared: dict[str, Any]  # params every run shares that differ from its commit's params.yaml
    failed: list[Experiment]
    unfinished: list[Experiment]  # queued or running
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "groups": [g.as_dict() for g in self.groups],
            "varying": self.varying,
            "shared": self.shared,
            "failed": [{"name": e.name, "rev": e.rev, "error": e.error} for e in self.failed],
            "unfinished": [{"name": e.name, "rev": e.rev, "state": e.state} for e in self.unfinished],
            "notes": self.notes,
        }


def summarize(experiments: list[Experiment], baselines: list[Baseline], model_order: list[str]) -> Summary:
    """Group the successful experiments, estimate every metric; list the rest apart."""
    done = [e for e in experiments if e.state == "success"]
    failed = [e for e in experiments if e.state == "failed"]
    unfinished = [e for e in experiments if e.state not in ("success", "failed")]
    rank = {m: i for i, m in enumerate(model_order)}
    buckets: dict[str, list[Experiment]] = defaultdict(list)
    for e in done:
        models = tuple(sorted(e.metrics, key=lambda m: (rank.get(m, len(rank)), m)))
        buckets[_key(e.baseline, models, e.params)].append(e)

    varying = _varying([b[0] for b in buckets.values()])
    commits = {e.baseline for e in done}
    groups = []
    for members in buckets.values():
        first = members[0]
        models = tuple(sorted(first.metrics, key=lambda m: (rank.get(m, len(rank)), m)))
        kept, duplicates = _one_per_seed(members)
        group = Group(params={k: first.params.get(k) for k in varying}, baseline=first.baseline, models=models,
                      experiments=kept, duplicates=duplicates)
        for model in models:
            group.metrics[model] = {metric: estimate([e.metrics[model][metric] for e in kept], BOUNDS[metric])
                                    for metric in SUMMARIZED if all(metric in e.metrics[model] for e in kept)}
        for a, b in itertools.combinations(models, 2):
            if all("test_acc" in e.metrics[m] for e in kept for m in (a, b)):
                group.pairs[(a, b)] = estimate([e.metrics[a]["test_acc"] - e.metrics[b]["test_acc"] for e in kept],
                                               DIFF_BOUNDS)
        group.at_chance = {m: n for m in models
                           if (n := sum(e.metrics[m].get(CHANCE) == 0.0 for e in kept))}
        groups.append(group)
    groups.sort(key=lambda g: (g.baseline, g.models, [_sortable(g.params[k]) for k in varying]))

    notes = []
    if len(commits) > 1:
        notes.append(f"the experiments come from {len(commits)} commits; each commit's runs are grouped apart")
    model_sets = {g.models for g in groups}
    if len(model_sets) > 1:
        notes.append("some experiments lack a model's metrics (" + "; ".join(
            f"{', '.join(m)}" for m in sorted(model_sets)) + "); they are grouped apart")
    if any(len(g.experiments) == 1 for g in groups):
        notes.append("a group with one seed has a mean only: a standard deviation and a confidence interval need >= 2 seeds")
    estimates = [e for g in groups for e in [*(x for m in g.metrics.values() for x in m.values()), *g.pairs.values()]]
    if any(e.clipped for e in estimates):
        notes.append("some 95% t intervals reached beyond what the quantity allows (an accuracy below 0% or above "
                     "100%, a time below 0) and are clipped there; so few seeds say little about the spread")
    if any(g.duplicates for g in groups):
        notes.append("a seed run more than once in a group counts once (its latest run); the others are listed as duplicates")
    from vitcnn.models import label

    for g in groups:
        for model, n in g.at_chance.items():
            where = ", ".join(f"{k}={g.params[k]}" for k in varying) or "the runs"
            notes.append(f"{where}: the {label(model)} is not clearly above chance in {n} of {len(g.experiments)} runs (the "
                         "95% interval of its test accuracy reaches 1 / classes, or its temperature fit hit a bound); "
                         "its robustness and calibration say nothing, and a difference to it shows only that the "
                         "other model learnt")
    split_seeds = {e.params.get("data.split_seed") for e in done}
    if len(split_seeds) == 1 and None not in split_seeds:
        notes.append(f"every run trains on the same train/val split (data.split_seed = {split_seeds.pop()}): "
                     "the spread is training variance (initialisation, batch order, augmentation, dropout), "
                     "not the variance of the split")
    return Summary(groups, varying, _shared(done, baselines, varying), failed, unfinished, notes)


def _key(baseline: str, models: tuple[str, ...], params: dict[str, Any]) -> str:
    rest = {k: v for k, v in params.items() if k != SEED}
    return json.dumps([baseline, models, rest], sort_keys=True, default=str)


def _varying(representatives: list[Experiment]) -> list[str]:
    """Param keys (not the seed) whose values differ between the groups' experiments."""
    keys: list[str] = []
    for e in representatives:
        keys += [k for k in e.params if k not in keys and k != SEED]
    return [k for k in keys if len({json.dumps(e.params.get(k), default=str) for e in representatives}) > 1]


def _shared(done: list[Experiment], baselines: list[Baseline], varying: list[str]) -> dict[str, Any]:
    """Params all runs share that differ from their commit's params.yaml: what the study set with -S."""
    if not done:
        return {}
    base = {b.rev: b.params for b in baselines}
    shared = {}
    for key, value in done[0].params.items():
        if key == SEED or key in varying:
            continue
        if all(e.params.get(key) == value for e in done) and any(base.get(e.baseline, {}).get(key) != value for e in done):
            shared[key] = value
    return shared


def _one_per_seed(members: list[Experiment]) -> tuple[list[Experiment], list[str]]:
    """The latest run of each seed (sorted by seed), and the names of the earlier ones left out.

    Two runs of one seed are not two samples: on a CPU they are the same run twice.
    """
    latest: dict[Any, Experiment] = {}
    duplicates = []
    for e in sorted(members, key=lambda e: e.timestamp):
        if e.params.get(SEED) in latest:
            duplicates.append(latest[e.params.get(SEED)].name)
        latest[e.params.get(SEED)] = e
    return [latest[s] for s in sorted(latest, key=_sortable)], duplicates


def _sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))
