"""A study's summary on disk: summary.md (tables and figures), summary.csv, and the figures.

- accuracy.png: test accuracy per group and model, mean with its 95% interval, and the
  paired ViT - CNN difference per group;
- curve.png, when one numeric param varies across groups (data.subset, train.epochs, ...):
  accuracy against that param, one line per model with its 95% band, and the paired
  difference against it; a log axis for training-set sizes.

summary.md reads the same offline and on GitHub (plain Markdown, figures beside it).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vitcnn.io import atomic_write  # noqa: E402
from vitcnn.study.experiments import SUMMARIZED  # noqa: E402
from vitcnn.study.summary import Estimate, Group, Summary  # noqa: E402
from vitcnn.visualize import color, label, save_figure  # noqa: E402

DIFF_COLOR = "tab:gray"
LOG_AXIS = {"data.subset"}  # params whose curves read best on a log axis
AXIS_LABELS = {"data.subset": "training images (data.subset)", "train.epochs": "epochs (train.epochs)"}
DPI = 120


def write(summary: Summary, out: Path, title: str) -> list[Path]:
    """Write summary.md, summary.csv and the figures into `out`; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.csv"]
    with atomic_write(written[0]) as tmp:
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


def table(summary: Summary) -> str:
    """The results as a Markdown table: one row per group."""
    models = _models(summary)
    head = ["group", "n", "seeds", *(f"{label(m)} test acc" for m in models)]
    if any(g.diff for g in summary.groups):
        head.append(f"{label(models[0])} − {label(models[1])} (paired)")
    rows = []
    for g in summary.groups:
        row = [group_label(g, summary), str(len(g.experiments)), " ".join(map(str, g.seeds))]
        row += [percent(g.metrics.get(m, {}).get("test_acc")) for m in models]
        if len(head) > 3 + len(models):
            row.append(percent(g.diff, signed=True))
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
    rows = [[group_label(g, summary), *(shown(g.metrics.get(m, {}).get(key)) for m in measured
                                        for key, (_, shown) in columns.items())]
            for g in summary.groups]
    return _markdown_table(head, rows)


def markdown(summary: Summary, title: str, figures: list[str]) -> str:
    n_runs = sum(len(g.experiments) for g in summary.groups)
    commits = sorted({g.baseline[:7] for g in summary.groups})
    lines = [f"# {title}", ""]
    lines.append(f"{_count(n_runs, 'successful run')} in {_count(len(summary.groups), 'group')}, from commit {', '.join(commits) or '—'}; "
                 f"summarized {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.")
    lines += ["", "Runs are grouped by every param except `seed`. Each cell: mean ± standard deviation over the seeds "
              "[95% Student t confidence interval of the mean], in accuracy points of the test split. The last column "
              "is the paired difference: per seed, one model's accuracy minus the other's (both trained with that "
              "seed), then the same statistics over the seeds.", ""]
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
    if summary.failed:
        lines += ["", "## Failed (left out)", ""] + [f"- `{e.name}`: {e.error}" for e in summary.failed]
    if summary.unfinished:
        lines += ["", "## Not finished (left out)", ""] + [f"- `{e.name}`: {e.state}" for e in summary.unfinished]
    return "\n".join(lines) + "\n"


def to_csv(summary: Summary) -> str:
    """One row per group and model: the varying params, n, seeds, every estimate, the paired difference."""
    metrics = list(SUMMARIZED)
    head = [*summary.varying, "commit", "model", "n", "seeds"]
    head += [f"{m}_{part}" for m in metrics for part in ("mean", "std", "ci95_low", "ci95_high")]
    head += ["diff_test_acc_mean", "diff_test_acc_ci95_low", "diff_test_acc_ci95_high"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for g in summary.groups:
        for model in g.models:
            row: list[Any] = [_value(g.params[k]) for k in summary.varying]
            row += [g.baseline, model, len(g.experiments), " ".join(map(str, g.seeds))]
            for metric in metrics:
                e = g.metrics[model].get(metric)
                row += [e.mean, e.std, *(e.ci95 or (None, None))] if e else [None] * 4
            row += [g.diff.mean, *(g.diff.ci95 or (None, None))] if g.diff else [None] * 3
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
    models = _models(summary)
    labels = [group_label(g, summary) for g in summary.groups]
    x = np.arange(len(labels))
    has_diff = any(g.diff for g in summary.groups)
    fig, axes = plt.subplots(1, 2 if has_diff else 1, figsize=(min(4 + 1.1 * len(labels), 16) * (1.6 if has_diff else 1), 4.2),
                             layout="constrained", squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        estimates = [g.metrics.get(model, {}).get("test_acc") for g in summary.groups]
        _points(ax, x + (i - (len(models) - 1) / 2) * width, estimates, color(model), label(model))
    ax.set(title="Test accuracy per group (mean, 95% CI)", ylabel="test accuracy (%)")
    _group_axis(ax, x, labels)
    ax.legend()
    if has_diff:
        ax = axes[0, 1]
        _points(ax, x, [g.diff for g in summary.groups], DIFF_COLOR, "paired difference")
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=f"{label(models[0])} − {label(models[1])}, paired over seeds (mean, 95% CI)",
               ylabel="difference (accuracy points)")
        _group_axis(ax, x, labels)
    save_figure(fig, path, DPI)


def curve_figure(summary: Summary, key: str, path: Path) -> None:
    models = _models(summary)
    xs = np.array([float(g.params[key]) for g in summary.groups])
    has_diff = any(g.diff for g in summary.groups)
    fig, axes = plt.subplots(1, 2 if has_diff else 1, figsize=(11 if has_diff else 6, 4.2), layout="constrained",
                             squeeze=False)
    ax = axes[0, 0]
    for model in models:
        _band(ax, xs, [g.metrics.get(model, {}).get("test_acc") for g in summary.groups], color(model), label(model))
    ax.set(title=f"Test accuracy against {key} (mean, 95% band)", ylabel="test accuracy (%)")
    ax.legend()
    axes_used = [ax]
    if has_diff:
        ax = axes[0, 1]
        _band(ax, xs, [g.diff for g in summary.groups], DIFF_COLOR, "paired difference")
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=f"{label(models[0])} − {label(models[1])}, paired over seeds", ylabel="difference (accuracy points)")
        axes_used.append(ax)
    for ax in axes_used:
        ax.set_xlabel(AXIS_LABELS.get(key, key))
        if key in LOG_AXIS and (xs > 0).all():
            ax.set_xscale("log")
        ax.set_xticks(xs, [_value(g.params[key]) for g in summary.groups])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    save_figure(fig, path, DPI)


def _points(ax, x, estimates: list[Estimate | None], color, name: str) -> None:
    """Means with 95% CI error bars; a group with one run shows its point without a bar."""
    means = np.array([100 * e.mean if e else np.nan for e in estimates])
    low = np.array([100 * (e.mean - e.ci95[0]) if e and e.ci95 else 0.0 for e in estimates])
    high = np.array([100 * (e.ci95[1] - e.mean) if e and e.ci95 else 0.0 for e in estimates])
    ax.errorbar(x, means, yerr=[low, high], fmt="o", color=color, capsize=4, label=name)


def _band(ax, xs, estimates: list[Estimate | None], color, name: str) -> None:
    means = np.array([100 * e.mean if e else np.nan for e in estimates])
    low = np.array([100 * e.ci95[0] if e and e.ci95 else np.nan for e in estimates])
    high = np.array([100 * e.ci95[1] if e and e.ci95 else np.nan for e in estimates])
    ax.plot(xs, means, "-o", color=color, label=name)
    ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)


def _group_axis(ax, x, labels: list[str]) -> None:
    ax.set_xticks(x, labels, rotation=20 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def _models(summary: Summary) -> list[str]:
    models: list[str] = []
    for g in summary.groups:
        models += [m for m in g.models if m not in models]
    return models


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _value(value: Any) -> str:
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


def _markdown_table(head: list[str], rows: list[list[str]]) -> str:
    escape: Callable[[str], str] = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)
