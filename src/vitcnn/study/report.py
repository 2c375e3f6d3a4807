"""A study's summary on disk: summary.md (tables and figures), summary.csv, runs.csv, and the figures.

- accuracy.png: test accuracy per group and model, every seed as a dot and the mean with its
  95% interval, and the paired difference of each pair of models per group;
- curve.png, when one numeric param varies across groups (data.subset, train.epochs, ...):
  accuracy against that param, the same marks at each measured value, and the paired
  difference against it; a log axis for training-set sizes. Only measured values are drawn:
  no line or band joins them, so nothing suggests values (or a crossing) between them.

summary.md reads the same offline and on GitHub (plain Markdown, figures beside it). Every file
is a function of the runs alone (runs.csv), so `vitcnn study summarize --from runs.csv` writes
it again, byte for byte, anywhere.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vitcnn.io import atomic_write  # noqa: E402
from vitcnn.study import runs  # noqa: E402
from vitcnn.study.experiments import SUMMARIZED, Baseline, Experiment  # noqa: E402
from vitcnn.study.summary import Estimate, Group, Summary  # noqa: E402
from vitcnn.models import color, label  # noqa: E402
from vitcnn.visualize import save_figure  # noqa: E402

DIFF_COLOR = "tab:gray"
LOG_AXIS = {"data.subset"}  # params whose curves read best on a log axis
AXIS_LABELS = {"data.subset": "training images (data.subset)", "train.epochs": "epochs (train.epochs)"}
DPI = 120


def write(summary: Summary, out: Path, title: str, experiments: list[Experiment] | None = None,
          baselines: list[Baseline] = ()) -> list[Path]:
    """Write summary.md, summary.csv, the figures and, given the `experiments` it was made from, runs.csv
    into `out`; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if experiments is not None:
        written.append(out / "runs.csv")
        runs.write(written[-1], experiments, list(baselines))
    written.append(out / "summary.csv")
    with atomic_write(written[-1]) as tmp:
        tmp.write_text(to_csv(summary))
    figures = []
    if summary.groups:
        figures.append(out / "accuracy.png")
        accuracy_figure(summary, figures[-1])
        curve_param = curve_axis(summary)
        if curve_param:
            figures.append(out / "curve.png")
            curve_figure(summary, curve_param, figures[-1])
    written += figures
    written.append(out / "summary.md")
    with atomic_write(written[-1]) as tmp:
        tmp.write_text(markdown(summary, title, [f.name for f in figures]))
    return written


# --- text ------------------------------------------------------------------------------------


def interval(e: Estimate | None, scale: float = 100.0, digits: int = 2, unit: str = "%", signed: bool = False) -> str:
    """'81.20% ± 0.35 [80.33, 82.07]': mean ± std [95% interval], here in accuracy points; '—' for the
    spread of one run."""
    if e is None:
        return "—"

    def shown(v: float) -> str:
        return f"{scale * v:{'+' if signed else ''}.{digits}f}"

    if e.std is None:
        return f"{shown(e.mean)}{unit} ± — [—]"
    return f"{shown(e.mean)}{unit} ± {scale * e.std:.{digits}f} [{shown(e.ci95[0])}, {shown(e.ci95[1])}]"


def percent(e: Estimate | None, signed: bool = False) -> str:
    return interval(e, signed=signed)


def fraction(e: Estimate | None) -> str:
    """'0.031 ± 0.004 [0.021, 0.041]': a value in [0, 1] such as an ECE."""
    return interval(e, scale=1.0, digits=3, unit="")


def plain(e: Estimate | None) -> str:
    """'512 ± 12.3': three significant digits."""
    if e is None:
        return "—"
    spread = "—" if e.std is None else f"{e.std:.3g}"
    return f"{e.mean:.3g} ± {spread}"


def group_label(group: Group, summary: Summary) -> str:
    parts = [f"{k}={_value(group.params[k])}" for k in summary.varying]
    if len({g.baseline for g in summary.groups}) > 1:
        parts.append(f"commit {group.baseline[:7]}")
    if len({g.models for g in summary.groups}) > 1:
        parts.append("models " + "+".join(group.models))
    return ", ".join(parts) or "all runs"


LABEL_CHARS = 32  # a figure's group labels longer than this become "G1", "G2", ... with a legend in the summary


def figure_labels(summary: Summary) -> list[str]:
    """Each group's label on a figure's axis: its varying params, when they fit; else G1, G2, ... (the
    summary's "Groups" table says which params each stands for)."""
    labels = [group_label(g, summary) for g in summary.groups]
    return labels if max(map(len, labels), default=0) <= LABEL_CHARS else [f"G{i + 1}" for i in range(len(labels))]


def legend_table(summary: Summary) -> str | None:
    """What G1, G2, ... stand for, where the figures use them."""
    labels = figure_labels(summary)
    if labels == [group_label(g, summary) for g in summary.groups]:
        return None
    return _markdown_table(["figure label", "group"], [[s, group_label(g, summary)]
                                                       for s, g in zip(labels, summary.groups)])


def table(summary: Summary) -> str:
    """The results as a Markdown table: one row per group, a column per model and per pair of models."""
    models = _models(summary)
    pairs = _pairs(summary)
    head = ["group", "n", "seeds", *(f"{label(m)} test acc" for m in models)]
    head += [f"{label(a)} − {label(b)} (paired)" for a, b in pairs]
    rows = []
    for g in summary.groups:
        row = [group_label(g, summary), str(len(g.experiments)), " ".join(map(str, g.seeds))]
        row += [percent(g.metrics.get(m, {}).get("test_acc")) for m in models]
        row += [percent(g.pairs.get(pair), signed=True) + _chance_mark(g, pair) for pair in pairs]
        rows.append(row)
    return _markdown_table(head, rows)


def cost_table(summary: Summary) -> str:
    models = _models(summary)
    head = ["group", *(f"{label(m)} {what}" for m in models for what in ("training s", "train images/s"))]
    rows = [[group_label(g, summary), *(plain(g.metrics.get(m, {}).get(metric))
                                       for m in models for metric in ("train_time_s", "train_images_per_s"))]
            for g in summary.groups]
    return _markdown_table(head, rows)


def robustness_table(summary: Summary) -> str | None:
    """Accuracy under corruption and ECE (as trained, and after temperature scaling where the runs measured it)
    per group and model, where the runs measured them."""
    models = _models(summary)
    measured = [m for m in models if any("corruption_acc" in g.metrics.get(m, {}) for g in summary.groups)]
    if not measured:
        return None
    columns = {"corruption_acc": ("acc. under corruption", percent), "ece": ("ECE", fraction),
               "ece_ts": ("ECE, temperature-scaled", fraction)}
    if not any("ece_ts" in g.metrics.get(m, {}) for g in summary.groups for m in measured):
        del columns["ece_ts"]  # runs from before temperature scaling was measured
    head = ["group", *(f"{label(m)} {what}" for m in measured for what, _ in columns.values())]
    rows = [[group_label(g, summary), *(AT_CHANCE if m in g.at_chance else shown(g.metrics.get(m, {}).get(key))
                                        for m in measured for key, (_, shown) in columns.items())]
            for g in summary.groups]
    return _markdown_table(head, rows)


AT_CHANCE = "— (at chance)"


def _chance_mark(group: Group, pair: tuple[str, ...]) -> str:
    """' (CNN at chance)' after a difference to a model that has not learnt: it is no verdict."""
    return "".join(f" ({label(m)} at chance)" for m in pair if m in group.at_chance)


def markdown(summary: Summary, title: str, figures: list[str]) -> str:
    n_runs = sum(len(g.experiments) for g in summary.groups)
    commits = sorted({g.baseline[:7] for g in summary.groups})
    stamps = sorted(e.timestamp[:16].replace("T", " ") for g in summary.groups for e in g.experiments if e.timestamp)
    when = f"; runs finished {stamps[0]} to {stamps[-1]}" if stamps else ""
    lines = [f"# {title}", ""]
    lines.append(f"{_count(n_runs, 'successful run')} in {_count(len(summary.groups), 'group')}, from commit "
                 f"{', '.join(commits) or '—'}{when}. The runs, one row each, are in `runs.csv`; "
                 "`vitcnn study summarize --from runs.csv` writes this summary again from them.")
    lines += ["", "Runs are grouped by every param except `seed`. Each cell: mean ± standard deviation over the seeds "
              "[95% Student t confidence interval of the mean], in accuracy points of the test split. The paired "
              "columns: per seed, one model's accuracy minus the other's (both trained with that seed), then the "
              "same statistics over the seeds. The intervals cover the variation between seeds (initialisation, "
              "batch order, augmentation, dropout) on one train/val split and one test split; they do not cover "
              "another split, another test set or another budget.", ""]
    lines += [f"- {note}" for note in summary.notes]
    if summary.shared:
        lines += ["", "Settings every run shares that differ from params.yaml: "
                  + ", ".join(f"`{k}={_value(v)}`" for k, v in summary.shared.items()) + "."]
    if summary.groups:
        lines += ["", "## Test accuracy", "", table(summary), "", "## Training cost", "", cost_table(summary)]
        robust = robustness_table(summary)
        if robust:
            lines += ["", "## Robustness and calibration", "", robust]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
        legend = legend_table(summary)
        if legend:
            lines += ["", "Groups on the figures:", "", legend]
    if summary.failed:
        lines += ["", "## Failed (left out)", ""] + [f"- `{e.name}`: {e.error}" for e in summary.failed]
    if summary.unfinished:
        lines += ["", "## Not finished (left out)", ""] + [f"- `{e.name}`: {e.state}" for e in summary.unfinished]
    return "\n".join(lines) + "\n"


PARTS = ("mean", "std", "ci95_low", "ci95_high")


def to_csv(summary: Summary) -> str:
    """One row per group and model: the varying params, n, seeds, every estimate, and the group's paired
    differences of test accuracy (`paired_<a>-<b>_test_acc_*`, one set per pair of models)."""
    metrics = list(SUMMARIZED)
    pairs = _pairs(summary)
    head = [*summary.varying, "commit", "model", "n", "seeds"]
    head += [f"{m}_{part}" for m in metrics for part in PARTS]
    head += [f"paired_{a}-{b}_test_acc_{part}" for a, b in pairs for part in PARTS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for g in summary.groups:
        for model in g.models:
            row: list[Any] = [_value(g.params[k]) for k in summary.varying]
            row += [g.baseline, model, len(g.experiments), " ".join(map(str, g.seeds))]
            for e in [g.metrics[model].get(metric) for metric in metrics] + [g.pairs.get(pair) for pair in pairs]:
                row += [e.mean, e.std, *(e.ci95 or (None, None))] if e else [None] * 4
            writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


# --- figures ---------------------------------------------------------------------------------


def curve_axis(summary: Summary) -> str | None:
    """The one numeric param that varies across groups (from one commit, same models), if any."""
    if len(summary.varying) != 1 or len(summary.groups) < 2:
        return None
    if len({(g.baseline, g.models) for g in summary.groups}) > 1:
        return None
    key = summary.varying[0]
    numeric = all(isinstance(g.params[key], (int, float)) and not isinstance(g.params[key], bool)
                  for g in summary.groups)
    return key if numeric else None


def accuracy_figure(summary: Summary, path: Path) -> None:
    """Per group: each seed's test accuracy as a dot, the mean and its 95% interval beside; and each pair's
    paired differences the same way."""
    models, pairs = _models(summary), _pairs(summary)
    labels = figure_labels(summary)
    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 1 + len(pairs), figsize=(min(4 + 1.1 * len(labels), 16) * (1 + 0.6 * len(pairs)), 4.2),
                             layout="constrained", squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        _marks(ax, x + (i - (len(models) - 1) / 2) * width, [_values(g, model) for g in summary.groups],
               [g.metrics.get(model, {}).get("test_acc") for g in summary.groups], color(model), label(model), width)
    ax.set(title="Test accuracy per group: each seed, mean and 95% CI", ylabel="test accuracy (%)")
    _group_axis(ax, x, labels)
    ax.legend(fontsize=8)
    for ax, (a, b) in zip(axes[0, 1:], pairs):
        _marks(ax, x, [_values(g, a, b) for g in summary.groups], [g.pairs.get((a, b)) for g in summary.groups],
               DIFF_COLOR, "paired difference", 0.8)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=f"{label(a)} − {label(b)}, paired per seed (mean, 95% CI)", ylabel="difference (accuracy points)")
        _group_axis(ax, x, labels)
    save_figure(fig, path, DPI)


def curve_figure(summary: Summary, key: str, path: Path) -> None:
    """Accuracy against `key` at each measured value: each seed as a dot, the mean with its 95% interval.
    No line joins the values: between them nothing was measured."""
    models, pairs = _models(summary), _pairs(summary)
    xs = np.array([float(g.params[key]) for g in summary.groups])
    log = key in LOG_AXIS and (xs > 0).all()
    fig, axes = plt.subplots(1, 1 + len(pairs), figsize=(6 + 5 * len(pairs), 4.2), layout="constrained",
                             squeeze=False)
    # Side by side at each value, each model a little apart: a fraction of the gap to the nearest value.
    positions = np.log(xs) if log else xs
    gap = np.diff(np.sort(positions)).min() if len(xs) > 1 else 1.0
    width = 0.5 * gap / max(1, len(models))
    ax = axes[0, 0]
    for i, model in enumerate(models):
        shift = (i - (len(models) - 1) / 2) * width
        at = np.exp(positions + shift) if log else positions + shift
        _marks(ax, at, [_values(g, model) for g in summary.groups],
               [g.metrics.get(model, {}).get("test_acc") for g in summary.groups], color(model), label(model),
               width, log)
    ax.set(title=f"Test accuracy against {key}: each seed, mean and 95% CI", ylabel="test accuracy (%)")
    ax.legend(fontsize=8)
    for ax, (a, b) in zip(axes[0, 1:], pairs):
        _marks(ax, xs, [_values(g, a, b) for g in summary.groups], [g.pairs.get((a, b)) for g in summary.groups],
               DIFF_COLOR, "paired difference", width, log)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=f"{label(a)} − {label(b)}, paired per seed", ylabel="difference (accuracy points)")
    for ax in axes[0]:
        ax.set_xlabel(AXIS_LABELS.get(key, key) + (" (log axis; only the marked values were run)" if log else ""))
        if log:
            ax.set_xscale("log")
        ax.set_xticks(xs, [_value(g.params[key]) for g in summary.groups])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    save_figure(fig, path, DPI)


def _values(group: Group, model: str, minus: str | None = None) -> list[float]:
    """Each seed's test accuracy of `model` in the group (minus `minus`'s, seed by seed)."""
    return [e.metrics[model]["test_acc"] - (e.metrics[minus]["test_acc"] if minus else 0.0)
            for e in group.experiments if "test_acc" in e.metrics.get(model, {})
            and (minus is None or "test_acc" in e.metrics.get(minus, {}))]


def _marks(ax, x, values: list[list[float]], estimates: list[Estimate | None], color, name: str, width: float,
           log: bool = False) -> None:
    """At each x: the seeds' values as small dots (spread a little sideways), and the mean with its 95% CI
    as a larger mark with error bars beside them; a group of one run shows its dot and its mean only."""
    offset = width * 0.25
    for xi, vals in zip(x, values):
        if vals:
            spread = np.linspace(-offset / 2, offset / 2, len(vals)) if len(vals) > 1 else np.zeros(1)
            at = xi * np.exp(spread - offset / 2) if log else xi + spread - offset / 2
            ax.scatter(at, 100 * np.asarray(vals), s=10, color=color, alpha=0.55, lw=0, zorder=2)
    means = np.array([100 * e.mean if e else np.nan for e in estimates])
    low = np.array([100 * (e.mean - e.ci95[0]) if e and e.ci95 else 0.0 for e in estimates])
    high = np.array([100 * (e.ci95[1] - e.mean) if e and e.ci95 else 0.0 for e in estimates])
    at = np.asarray(x, dtype=float) * (np.exp(offset / 2) if log else 1) + (0 if log else offset / 2)
    ax.errorbar(at, means, yerr=[low, high], fmt="o", ms=5, color=color, capsize=4, label=name, zorder=3)


def _group_axis(ax, x, labels: list[str]) -> None:
    ax.set_xticks(x, labels, rotation=20 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def _models(summary: Summary) -> list[str]:
    models: list[str] = []
    for g in summary.groups:
        models += [m for m in g.models if m not in models]
    return models


def _pairs(summary: Summary) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for g in summary.groups:
        pairs += [p for p in g.pairs if p not in pairs]
    return pairs


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _value(value: Any) -> str:
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    escape: Callable[[str], str] = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)
