"""The README's results, generated from the files behind them: `results/<run>/` and `studies/<name>/`.

    python tools/readme_tables.py            # rewrite every generated block of README.md
    python tools/readme_tables.py --check    # exit 1, naming each block that differs or each unbacked number

A generated block sits between two comments, and its first names what it shows:

    <!-- generated: run strong-20 -->
    ...
    <!-- end generated -->

Blocks: `recipes` (every saved training run, a row per model), `run NAME` (one run in detail),
`robustness NAME` (its robustness and calibration, with paired intervals and what they cover),
`study NAME` (a study's table, from its runs.csv) and `benchmark NAME` (the training-speed
benchmark). Each ends with a line naming its files, the commit and the machine.

Outside the blocks a measured number (a percentage, a time, a speed, a ratio) may stand only
if it is cited: `CITED` lists the published numbers the README quotes, each with its source.
`--check` (and the test suite) fails on any other, so that no number in the README outlives
the file it came from.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vitcnn import results as saved  # noqa: E402
from vitcnn.models import REGISTRY  # noqa: E402

BLOCK = re.compile(r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
# A measured-looking number in prose: a percentage, a time, a speed, a size, a ratio.
MEASURED = re.compile(r"(?<![\w.\-/])[-+−]?\d[\d,]*(?:\.\d+)?(?:\s?(?:%|×|x(?!\w))|\s(?:images/s|img/s|ms|s|seconds|minutes|"
                      r"min|hours|h|GiB|MB|GB|GFLOP/s|MFLOPs|points|x)(?![\w/]))")
# Published numbers the README quotes, each with its source: the only measured numbers allowed outside
# the generated blocks.
CITED = {
    "93-95%": "CCT on CIFAR-10 (Hassani et al. 2021), 200-300 epochs",
    "94%": "ResNet-9 / cifar10-fast (Page 2018) and airbench94 (Jordan 2024), official CIFAR-10 files",
    "96.5%": "CCT-7/3x1 at 300 epochs (SHI-Labs/Compact-Transformers README)",
    "94.8%": "CCT-6/3x1 at 200 epochs (the same)",
    "91.4%": "ViT-Lite-7/4 (the same)",
    "94.5%": "SPT+LSA ViT in 100 epochs (Lee et al. 2021)",
    "94.01%": "airbench94, mean of 1,000 runs (Jordan 2024)",
    "1-2 points": "the JPEG copy against the official files (../shared/datasets/README.md)",
    "1–2 points": "the same",
}
# A confidence level is a choice, not a measurement: "95%" before the kind of interval it qualifies.
CONFIDENCE_LEVEL = re.compile(r"95%(?= (paired|Student|t |exact|confidence|CI|interval|bootstrap))")


# --- reading the files -------------------------------------------------------------------------


def run_info(name: str) -> dict[str, Any]:
    folder = ROOT / saved.RESULTS / name
    info = saved.load(folder)
    info["name"] = name
    info["paired"] = _json(folder / "plots" / "robustness" / "paired.json", [])
    info["history"] = {model: _csv(folder / "plots" / "train" / f"{model}.csv") for model in info["params"]
                       if (folder / "plots" / "train" / f"{model}.csv").is_file()}
    return info


def _json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def models_of(info: dict) -> list[str]:
    evaluated = info["metrics"].get("evaluate.json", {})
    return [m for m in REGISTRY if m in evaluated]


# --- formatting --------------------------------------------------------------------------------


def pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def points(diff: dict, digits: int = 1, scale: float = 100.0, unit: str = " points") -> str:
    """'+1.6 points [−1.9, +5.1]' from a paired.json entry."""
    text = f"{scale * diff['diff']:+.{digits}f}{unit}"
    if diff.get("ci95") is None:
        return text + " [too few images for an interval]"
    low, high = (f"{scale * v:+.{digits}f}" for v in diff["ci95"])
    return f"{text} [{low}, {high}]".replace("-", "−")


def seconds(value: float) -> str:
    return f"{value:,.0f} s" if value >= 100 else f"{value:.1f} s"


def machine_text(machine: dict) -> str:
    m = machine["machine"]
    features = f" ({', '.join(m['cpu_features'])})" if m.get("cpu_features") else ""
    gpu = ", ".join(m["gpus"]) if m.get("gpus") else "no GPU"
    return f"{m['cores']}-core {m['cpu']}{features}, {m['memory_gib']:g} GiB, {gpu}, torch {machine['software']['torch']}"


def provenance(info: dict) -> str:
    machine = info["machine"]
    changes = " (with uncommitted changes)" if machine.get("code_changes") else ""
    note = f"; {machine['note']}" if machine.get("note") else ""
    return (f"<sub>From [`results/{info['name']}/`](results/{info['name']}/): commit `{machine['commit'][:7]}`"
            f"{changes}, {machine_text(machine)}, run {machine['run_date'][:10]}{note}.</sub>")


def describe(model: str, params: dict) -> str:
    """A model's label and its variant, as the params give it: 'ViT (conv stem, seq pooling)'."""
    p = params[model]
    label = REGISTRY[model].label
    if model == "vit":
        parts = [f"{p['stem']} stem" if p["stem"] != "patch" else f"patch {p['patch_size']}",
                 f"{p['pooling']} pooling", f"dim {p['embed_dim']}, depth {p['depth']}"]
    elif model == "cnn":
        parts = [f"{p['block']} blocks", "-".join(map(str, p["channels"]))]
    else:
        parts = []
    return f"{label} ({', '.join(parts)})" if parts else label


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# --- the blocks ----------------------------------------------------------------------------------


def cifar10_runs() -> list[Path]:
    """The saved training runs on CIFAR-10 (your own images' runs have a block of their own)."""
    return [folder for folder in sorted((ROOT / saved.RESULTS).iterdir())
            if (folder / "metrics" / "evaluate.json").is_file()
            and run_info(folder.name)["params"]["data"]["dataset"] == "cifar10"]


def block_recipes() -> str:
    """Every saved training run on CIFAR-10, one row per model."""
    rows, notes = [], []
    for folder in cifar10_runs():
        info = run_info(folder.name)
        for model in models_of(info):
            trained, evaluated = info["metrics"][f"train_{model}.json"], info["metrics"]["evaluate.json"][model]
            rows.append([f"[`{folder.name}`](results/{folder.name}/)", describe(model, info["params"]),
                         f"**{pct(evaluated['test_acc'])}**", f"{pct(trained['val_acc'])} ({trained['best_epoch']})",
                         f"{evaluated['params']:,}", str(trained["epochs"]), seconds(trained["train_time_s"]),
                         f"{trained['train_images_per_s']:,.0f}"])
        notes.append(f"`{folder.name}`: {provenance(info).removeprefix('<sub>').removesuffix('</sub>')}")
    head = ["run", "model", "test accuracy", "best val. accuracy (epoch)", "parameters", "epochs", "training time",
            "train images/s"]
    return table(head, rows) + "\n\n" + "<sub>" + "<br>".join(notes) + "</sub>"


def block_run(name: str) -> str:
    """One run in detail: a column per model."""
    info = run_info(name)
    models = models_of(info)
    evaluated, robust = info["metrics"]["evaluate.json"], info["metrics"].get("robustness.json", {})
    trained = {m: info["metrics"][f"train_{m}.json"] for m in models}
    params = info["params"]
    rows = [
        ["test accuracy", *(f"**{pct(evaluated[m]['test_acc'])}**" for m in models)],
        ["best validation accuracy (epoch)", *(f"{pct(trained[m]['val_acc'])} ({trained[m]['best_epoch']})"
                                               for m in models)],
        ["parameters", *(f"{evaluated[m]['params']:,}" for m in models)],
        ["forward FLOPs per image", *(f"{evaluated[m]['flops_per_image'] / 1e6:,.0f} M" for m in models)],
        [f"training time, {trained[models[0]]['epochs']} epochs incl. validation",
         *(seconds(trained[m]["train_time_s"]) for m in models)],
        ["training images/s (median epoch)", *(f"{trained[m]['train_images_per_s']:,.0f}" for m in models)],
        [f"inference images/s (batch {params['evaluate']['batch_size']}, {evaluated[models[0]]['precision']})",
         *(f"{evaluated[m]['inference_images_per_s']:,.0f}" for m in models)],
        [f"latency at batch 1 (median of {params['evaluate']['latency_runs']})",
         *(f"{evaluated[m]['latency_ms']:.1f} ms" for m in models)],
    ]
    if robust:
        subset = params["robustness"]["subset"]
        rows += [
            [f"accuracy under corruption / clean ({f'{subset}-image subset' if subset else 'whole test split'})",
             *(f"{pct(robust[m]['corruption_acc'])} / {pct(robust[m]['subset_clean_acc'])}" for m in models)],
            ["expected calibration error", *(f"{robust[m]['ece']:.3f}" for m in models)],
            ["ECE after temperature scaling (T fitted on the validation split)",
             *(f"{robust[m]['ece_ts']:.3f} (T = {robust[m]['temperature']:.2f})" for m in models)],
        ]
    return table(["", *(describe(m, params) for m in models)], rows) + "\n\n" + provenance(info)


def block_robustness(name: str) -> str:
    """Robustness and calibration of one run, each difference with its paired interval, and what it covers."""
    info = run_info(name)
    models = models_of(info)
    robust = info["metrics"]["robustness.json"]
    pair = next((p for p in info["paired"] if [p["a"], p["b"]] == models[:2]), None)
    a, b = models[:2]
    la, lb = REGISTRY[a].label, REGISTRY[b].label
    subset = info["params"]["robustness"]["subset"]

    def diff(key: str, **kw: Any) -> str:
        return points(pair[key], **kw) if pair and key in pair else ""

    rows = [
        [f"clean accuracy, {subset}-image subset", pct(robust[a]["subset_clean_acc"]),
         pct(robust[b]["subset_clean_acc"]), ""],
        ["under corruption (mean of the corruptions and severities)", pct(robust[a]["corruption_acc"]),
         pct(robust[b]["corruption_acc"]), ""],
        ["relative robustness (corrupted / clean)", pct(robust[a]["relative_robustness"]),
         pct(robust[b]["relative_robustness"]), diff("relative_robustness")],
        ["random patches removed (mean over the fractions)", pct(robust[a]["occlusion_patches_acc"]),
         pct(robust[b]["occlusion_patches_acc"]), diff("occlusion_patches_acc")],
        ["central box removed (the same)", pct(robust[a]["occlusion_box_acc"]), pct(robust[b]["occlusion_box_acc"]),
         diff("occlusion_box_acc")],
        ["ECE (whole test split)", f"{robust[a]['ece']:.3f}", f"{robust[b]['ece']:.3f}",
         diff("ece", digits=3, scale=1.0, unit="")],
        ["temperature fitted on the validation split", f"{robust[a]['temperature']:.2f}",
         f"{robust[b]['temperature']:.2f}", ""],
        ["ECE after temperature scaling", f"{robust[a]['ece_ts']:.3f}", f"{robust[b]['ece_ts']:.3f}",
         diff("ece_ts", digits=3, scale=1.0, unit="")],
        ["NLL, as trained → temperature-scaled", f"{robust[a]['nll']:.3f} → {robust[a]['nll_ts']:.3f}",
         f"{robust[b]['nll']:.3f} → {robust[b]['nll_ts']:.3f}", ""],
        ["Brier score (summed over classes, 0–2), as trained → scaled",
         f"{robust[a]['brier']:.3f} → {robust[a]['brier_ts']:.3f}",
         f"{robust[b]['brier']:.3f} → {robust[b]['brier_ts']:.3f}", ""],
    ]
    head = ["", describe(a, info["params"]), describe(b, info["params"]), f"{la} − {lb} [95% paired CI]"]
    text = table(head, rows)
    if pair:
        text += "\n\n" + reading(pair, la, lb)
    return text + "\n\n" + provenance(info)


def reading(pair: dict, la: str, lb: str) -> str:
    """What the intervals allow one to say, and what they cover: test images, one training run per model."""
    said = []
    for key, what, above, below in (
            ("relative_robustness", "relative robustness", f"the {la} keeps more of its accuracy under corruption",
             f"the {lb} keeps more of its accuracy under corruption"),
            ("occlusion_patches_acc", "accuracy with random patches removed", f"the {la} is the more accurate",
             f"the {lb} is the more accurate"),
            ("occlusion_box_acc", "accuracy with a central box removed", f"the {la} is the more accurate",
             f"the {lb} is the more accurate"),
            ("ece", "ECE as trained", f"the {lb} is the better calibrated", f"the {la} is the better calibrated"),
            ("ece_ts", "ECE after temperature scaling", f"the {lb} is the better calibrated once rescaled",
             f"the {la} is the better calibrated once rescaled")):
        d = pair.get(key)
        if not d:
            continue
        ci = d.get("ci95")
        if ci is None or ci[0] <= 0 <= ci[1]:
            said.append(f"{what}: no clear difference")
        else:
            said.append(f"{what}: {above if ci[0] > 0 else below}")
    images = {pair[k]["images"] for k in ("relative_robustness", "ece") if k in pair}
    return (f"Read with the intervals ({'; '.join(said)}). Each interval is a 95% paired bootstrap over the "
            f"{' and '.join(f'{n:,}' for n in sorted(images))} test images both models saw: it covers which test "
            "images were drawn, not how another training run (another seed) of either model would do; each "
            "model here is one training run.")


def block_study(name: str) -> str:
    """A study's test-accuracy table, computed from its runs.csv, with its commit and machine."""
    from vitcnn.models import MODELS
    from vitcnn.study import report, runs
    from vitcnn.study.summary import summarize

    folder = ROOT / "studies" / name
    found, baselines = runs.read(folder / "runs.csv")
    summary = summarize(found, baselines, list(MODELS))
    commits = sorted({g.baseline[:7] for g in summary.groups})
    machine = _json(folder / "machine.json", None)
    where = f", {machine_text(machine)}" if machine else ""
    n = sum(len(g.experiments) for g in summary.groups)
    return (report.table(summary) + "\n\n" + f"<sub>From [`studies/{name}/`](studies/{name}/) ({n} runs in "
            f"`runs.csv`): commit `{', '.join(commits)}`{where}. Mean ± standard deviation over the seeds [95% t "
            "interval of the mean]; the intervals cover the variation between seeds on one split.</sub>")


def block_benchmark(name: str) -> str:
    """The training-speed benchmark of results/NAME/benchmark.json: this pipeline against the naive way."""
    folder = ROOT / saved.RESULTS / name
    machine = json.loads((folder / saved.MACHINE_FILE).read_text())
    runs = json.loads((folder / "benchmark.json").read_text())
    rows = []
    for model in REGISTRY:
        entries = [r for r in runs if r["model"] == model]
        if not entries:
            continue
        ratios = sorted(r["speedup"] for r in entries)
        median = statistics.median(ratios)
        ours = statistics.median(r["train_images_per_s"] for r in entries)
        naive = statistics.median(r["baseline_images_per_s"] for r in entries)
        rows.append([REGISTRY[model].label, f"{ours:,.0f} ({entries[0]['precision']})",
                     f"{naive:,.0f} ({entries[0].get('baseline_precision', 'float32')})", f"**{median:.2f}×**",
                     ", ".join(f"{r:.2f}" for r in ratios)])
    head = ["model", "this pipeline, images/s", "naive way, images/s", "speedup (median)", "each run"]
    return (table(head, rows) + "\n\n" + f"<sub>From [`results/{name}/benchmark.json`](results/{name}/benchmark.json)"
            f": commit `{machine['commit'][:7]}`, {machine_text(machine)}, {machine['run_date'][:10]}; "
            f"{len(runs) // max(1, len(rows))} runs per model, each the median of its windows.</sub>")


def block_image_sizes(name: str) -> str:
    """Training images/s of each model at each image size, from results/NAME/image_sizes.json (throughput.py
    --image-size, one JSON object per model and size)."""
    folder = ROOT / saved.RESULTS / name
    machine = json.loads((folder / saved.MACHINE_FILE).read_text())
    runs = json.loads((folder / "image_sizes.json").read_text())
    sizes = sorted({r["image_size"] for r in runs})
    rows = []
    for model in REGISTRY:
        rates = {size: statistics.median(r["train_images_per_s"] for r in runs
                                         if r["model"] == model and r["image_size"] == size) for size in sizes
                 if any(r["model"] == model and r["image_size"] == size for r in runs)}
        if len(rates) == len(sizes):
            rows.append([REGISTRY[model].label, *(f"{rates[size]:,.0f}" for size in sizes),
                         f"{rates[sizes[0]] / rates[sizes[-1]]:.1f}×"])
    head = ["model", *(f"{size} px, training images/s" for size in sizes), f"{sizes[0]} px / {sizes[-1]} px"]
    return (table(head, rows) + "\n\n" + f"<sub>From [`results/{name}/image_sizes.json`](results/{name}/image_sizes.json)"
            f" (`python benchmarks/throughput.py --image-size N`, random images, the default models and recipe): "
            f"commit `{machine['commit'][:7]}`, {machine_text(machine)}, {machine['run_date'][:10]}.</sub>")


def block_study_backends(name: str) -> str:
    """The same study on DVC's queue and on a local Dask cluster (benchmarks/study_backends.py)."""
    folder = ROOT / saved.RESULTS / name
    machine = json.loads((folder / saved.MACHINE_FILE).read_text())
    measured = json.loads((folder / "study_backends.json").read_text())
    labels = {"queue": f"DVC's queue, `-j {measured['workers']}`", "cluster": f"Dask, `--cluster local:{measured['workers']}`"}
    rows = []
    for b in measured["backends"]:
        accuracy = ", ".join(f"{REGISTRY[m].label} {pct(e['mean'])} ± {100 * (e['std'] or 0):.1f}"
                             for m, e in b["test_acc"].items() if m in REGISTRY)
        rows.append([labels[b["backend"]], seconds(b["wall_s"]), f"{b['completed']} of {b['runs']}",
                     str(b["failed"]), accuracy or "—"])
    head = ["back-end", "wall time", "runs completed", "failed", "test accuracy over the seeds (mean ± std)"]
    settings = " ".join(f"`-S {o}`" for o in measured["overrides"])
    return (table(head, rows) + "\n\n" + f"<sub>From [`results/{name}/`](results/{name}/) "
            f"(`python benchmarks/study_backends.py`): a {measured['seeds']}-seed study, {settings}, each back-end in "
            f"a fresh clone, one after the other; commit `{machine['commit'][:7]}`, {machine_text(machine)}, "
            f"{machine['date'][:10]}. One measurement each.</sub>")


# The validation accuracies whose time to reach the time-to-accuracy table gives: the same for every model, so
# that a row compares with every other; low enough for short CPU runs to reach.
TARGETS = (0.55, 0.75)


def block_time_to_accuracy() -> str:
    """For every saved CIFAR-10 run and model: the epoch and training time at which validation accuracy first reached
    each target, or that no epoch of the run did."""
    rows, notes = [], []
    for folder in cifar10_runs():
        info = run_info(folder.name)
        for model in models_of(info):
            history = info["history"][model]
            best = max(float(r["val_acc"]) for r in history)
            cells = []
            for target, found in saved.time_to_accuracy(history, list(TARGETS)).items():
                cells.append(f"epoch {found['epoch']}, {seconds(found['seconds'])}" if found
                             else f"not in {len(history)} epochs (best {pct(best)})")
            rows.append([f"[`{folder.name}`](results/{folder.name}/)", describe(model, info["params"]), *cells])
        notes.append(f"`{folder.name}`: {machine_text(info['machine'])}, commit `{info['machine']['commit'][:7]}`")
    head = ["run", "model", *(f"to {pct(t, 0)} validation accuracy" for t in TARGETS)]
    return (table(head, rows) + "\n\n<sub>The time is the epochs' own training time summed (validation and "
            "compilation left out), from each run's `plots/train/<model>.csv` (`python benchmarks/time_to_accuracy.py "
            "--from results/<run>`); a run's footnote above says whether other work shared its machine. "
            + "; ".join(notes) + ".</sub>")


BLOCKS = {"recipes": block_recipes, "run": block_run, "robustness": block_robustness, "study": block_study,
          "benchmark": block_benchmark, "time-to-accuracy": block_time_to_accuracy,
          "study-backends": block_study_backends, "image-sizes": block_image_sizes}


# --- the README --------------------------------------------------------------------------------


def render(spec: str) -> str:
    kind, *args = spec.split()
    if kind not in BLOCKS:
        raise SystemExit(f"README.md: unknown generated block '{kind}'; known: {', '.join(BLOCKS)}")
    return BLOCKS[kind](*args).rstrip("\n") + "\n"


def regenerate(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("spec")) + m.group(4), text)


def differing_blocks(text: str) -> list[str]:
    """The specs of the blocks whose text is not what the files give."""
    return [m.group("spec") for m in BLOCK.finditer(text) if m.group("body") != render(m.group("spec"))]


def unbacked_numbers(text: str) -> list[tuple[int, str]]:
    """(line, number) of every measured-looking number outside the generated blocks, code and cited sources."""
    stripped = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    stripped = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), stripped, flags=re.S)
    found = []
    for number, line in enumerate(stripped.splitlines(), start=1):
        if line.startswith("    "):  # an indented code block
            continue
        line = re.sub(r"`[^`]*`", "", line)  # inline code: commands, keys, values
        line = re.sub(r"\]\([^)]*\)", "]", line)  # link targets
        line = CONFIDENCE_LEVEL.sub("", line)
        for match in MEASURED.finditer(line):
            quoted = match.group(0).strip()
            if not any(quoted in cited and cited in line for cited in CITED):
                found.append((number, quoted))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if README.md differs")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    if args.check:
        problems = [f"generated block '{spec}' differs from what its files give (run tools/readme_tables.py)"
                    for spec in differing_blocks(text)]
        problems += [f"line {line}: '{number}' has no file behind it (put it in a generated block, or cite it)"
                     for line, number in unbacked_numbers(text)]
        for problem in problems:
            print(f"README.md: {problem}", file=sys.stderr)
        return 1 if problems else 0
    new = regenerate(text)
    if new != text:
        args.readme.write_text(new)
    print(f"README.md: {len(BLOCK.findall(new))} generated blocks, {'rewritten' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
