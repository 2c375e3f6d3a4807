"""The one-page report's text (plots/report.md): the metrics as written, how the models differ, per-class
accuracy, robustness and calibration with what their intervals allow one to say, and each figure with
its caption. The figures themselves are `vitcnn.visualize`'s; which images they show is `vitcnn.compare`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitcnn.io import atomic_write
from vitcnn.models import MODELS, REGISTRY, label
from vitcnn.models.spec import Attention, GradCam, ModelSpec
from vitcnn.visualize import FEW_IMAGES

METRIC_LABELS = {
    "test_acc": "test accuracy",
    "test_loss": "test loss, cross-entropy",
    "params": "parameters",
    "flops_per_image": "forward FLOPs per image",
    "inference_images_per_s": "inference images/s",
    "latency_ms": "latency at batch 1, ms",
    "train_time_s": "training time, s",
    "device": "evaluated on",
    "precision": "evaluation precision",
    "subset_clean_acc": "accuracy on the clean subset",
    "corruption_acc": "accuracy under corruption",
    "relative_robustness": "relative robustness (corrupted / clean)",
    "occlusion_patches_acc": "accuracy, random patches removed",
    "occlusion_box_acc": "accuracy, a central box removed",
    "ece": "expected calibration error",
    "nll": "negative log-likelihood",
    "brier": "Brier score (squared error summed over the classes, 0–2)",
    "temperature": "temperature fitted on the validation split",
    "ece_ts": "ECE after temperature scaling",
    "nll_ts": "NLL after temperature scaling",
    "brier_ts": "Brier score after temperature scaling (0–2)",
    "above_chance": "clearly above chance (95% interval of test accuracy above 1 / classes)",
    "tta": "test-time augmentation",
    "corruptions": "corruption parameters (by image size: CIFAR-10-C's, Tiny-ImageNet-C's, ImageNet-C's)",
}


def figure_captions(specs: Sequence[ModelSpec]) -> dict[str, tuple[str, str]]:
    """The figures the report shows, in its order: file stem -> (heading, what it shows)."""
    looks = "; ".join(f"the {s.label}'s {how.title}" + (" of its predicted class" if isinstance(how, GradCam) else "")
                      for s in specs for how in s.explains)
    captions = {
        "compare_sample": ("Where each model looks", (
            f"Fixed, seeded test images: {looks}. Under each panel, that model's prediction and confidence "
            "(✓ right, ✗ wrong).")),
        "per_class": ("Per-class accuracy", "Test accuracy of each class, per model."),
        "tradeoffs": ("Accuracy against cost", (
            "Test accuracy against parameters, forward FLOPs per image, training time and inference images/s; "
            "one point per model.")),
        "mistakes": ("Confident mistakes", (
            "The test images each model gets wrong with the highest confidence: index in the test split, true "
            "class, predicted class and confidence.")),
    }
    for s in specs:
        captions[f"compare_{s.name}_mistakes"] = (f"Where they look on the {s.label}'s confident mistakes",
                                                  f"As above, on the images the {s.label} gets wrong most confidently.")
    for s in specs:
        if any(isinstance(how, Attention) for how in s.explains):
            captions[f"{s.name}_attention"] = (f"{s.label} attention per layer", (
                "The readout's attention over the patch grid in each layer (mean over heads; the CLS token's "
                "attention when there is one), and the rollout across all layers."))
        if any(isinstance(how, GradCam) for how in s.explains):
            captions[f"{s.name}_features"] = (f"{s.label} feature maps and Grad-CAM", (
                "The strongest channels of each block's output, and Grad-CAM of the predicted class on the last "
                "block (its low resolution makes it coarse)."))
    captions["robustness"] = ("Accuracy under corruption", (
        "Test accuracy on a fixed subset of the test split under CIFAR-10-C's corruptions at severities 1-5 "
        "(0: clean), per corruption and averaged."))
    captions["occlusion"] = ("Accuracy under occlusion", (
        "Test accuracy as a growing fraction of each image is removed: random patches, or one central box."))
    captions["reliability"] = ("Calibration", (
        "Accuracy per confidence bin against the diagonal of perfect calibration, each bar labelled with its "
        f"number of images (hatched and pale: fewer than {FEW_IMAGES}, too few to read), and the expected "
        "calibration error (equal-width bins): as trained (top), and after dividing the logits by the "
        "temperature T fitted on the validation split (bottom; T > 1 softens an overconfident model, T < 1 "
        "sharpens an underconfident one; the predictions are the same)."))
    captions["learning_curves"] = ("Learning curves", "Loss and accuracy per epoch, train and validation.")
    captions["confusion"] = ("Confusion matrices", (
        "Columns: the actual class, rows: the predicted one (as in `dvc plots show`); each column sums to 1."))
    return captions


def as_written(value: Any) -> str:
    """A value as JSON writes it (numbers and lists exactly as in the metrics file), strings bare; a missing
    value (a relative robustness of a model at chance) as a dash."""
    if value is None:
        return "— (not clearly above chance)"
    return value if isinstance(value, str) else json.dumps(value)


FRACTIONS = {"test_acc", "subset_clean_acc", "corruption_acc", "relative_robustness", "occlusion_patches_acc",
             "occlusion_box_acc"}  # shown as percentages


def readable(key: str, value: Any) -> str:
    """A metric for reading, with the value as written beside it where reading rounds it: '81.25% (0.8125)',
    '167.1 M (167122432)', '1,205,898', '0.016 (0.016028)'."""
    if value is None or isinstance(value, (str, bool)) or not isinstance(value, (int, float)):
        return as_written(value)
    written = as_written(value)
    if key in FRACTIONS:
        shown = f"{100 * value:.2f}%"
    elif key == "flops_per_image":
        shown = f"{value / 1e6:,.1f} M"
    elif isinstance(value, int):
        return f"{value:,}"
    elif key.endswith("_s") or key.endswith("_ms") or key.endswith("images_per_s"):
        shown = f"{value:,.1f}"
    else:
        shown = f"{value:.4f}".rstrip("0").rstrip(".")
    return shown if shown.replace(",", "") == written else f"{shown} ({written})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def robustness_reading(robustness: dict[str, dict], paired: list[dict]) -> list[str]:
    """What metrics/robustness.json shows, pair by pair: who keeps more of its accuracy under corruption, who
    is more accurate under occlusion and who is better calibrated, said only where the pair's 95% paired
    interval excludes zero."""
    lines = []
    for pair in paired:
        a, b = pair["a"], pair["b"]
        la, lb = label(a), label(b)
        if pair.get("at_chance"):
            lines += [at_chance(name, chance) + f"; no verdict on robustness or calibration between the {la} and "
                      f"the {lb}." for name, chance in pair["at_chance"].items()]
            continue
        robust, ece = pair["relative_robustness"], pair["ece"]
        lines.append(
            f"Under corruption the {la} keeps {100 * robustness[a]['relative_robustness']:.0f}% of its clean accuracy "
            f"and the {lb} {100 * robustness[b]['relative_robustness']:.0f}%: {la} − {lb} "
            f"{_difference(robust, scale=100, unit=' points')} (paired bootstrap over the {robust['images']} images)"
            + _verdict(robust, f"the {la} degrades more gracefully", f"the {lb} degrades more gracefully",
                       "neither degrades clearly more gracefully"))
        for kind, what in (("patches", "random patches"), ("box", "a central box")):
            occluded = pair.get(f"occlusion_{kind}_acc")
            if occluded:
                lines.append(
                    f"With {what} removed (accuracy averaged over the fractions): {la} − {lb} "
                    f"{_difference(occluded, scale=100, unit=' points')} over the {occluded['images']} images"
                    + _verdict(occluded, f"the {la} is the more accurate", f"the {lb} is the more accurate",
                               "neither is clearly more accurate"))
        lines.append(
            f"Expected calibration error (lower: confidence closer to accuracy): {la} {robustness[a]['ece']:.3f}, "
            f"{lb} {robustness[b]['ece']:.3f}; {la} − {lb} {_difference(ece, scale=1, unit='', digits=3)} over the "
            f"{ece['images']} test images"
            + _verdict(ece, f"the {lb} is the better calibrated", f"the {la} is the better calibrated",
                       "neither is clearly better calibrated"))
        scaled = pair.get("ece_ts")
        if scaled:
            lines.append(
                f"After temperature scaling (fitted on the validation split: T = {robustness[a]['temperature']:.2f} "
                f"for the {la}, {robustness[b]['temperature']:.2f} for the {lb}; the predictions are unchanged), "
                f"ECE {la} {robustness[a]['ece_ts']:.3f}, {lb} {robustness[b]['ece_ts']:.3f}; {la} − {lb} "
                f"{_difference(scaled, scale=1, unit='', digits=3)}"
                + _verdict(scaled, f"the {lb}'s scores are the better calibrated once rescaled",
                           f"the {la}'s scores are the better calibrated once rescaled",
                           "neither is clearly better calibrated once rescaled"))
    if paired:
        lines.append("Each interval is a 95% paired bootstrap over the test images both models saw: it covers which "
                     "test images were drawn, not how another training run (another seed) of either model would do. "
                     "Each model here is one training run; `vitcnn study run seeds` measures the spread between "
                     "seeds.")
    return lines


def at_chance(name: str, chance: dict) -> str:
    """'The CNN is not clearly above chance (...)': why a model's robustness and calibration say nothing."""
    low, high = chance["ci95"]
    why = f"test accuracy {100 * chance['accuracy']:.1f}% [95% CI {100 * low:.1f}, {100 * high:.1f}] over " \
          f"{chance['images']:,} images, chance {100 * chance['chance']:.1f}%"
    if chance.get("temperature_at_bound"):
        why += "; its temperature fit stopped at the search's bound, finding no minimum"
    return f"The {label(name)} is not clearly above chance ({why})"


def _difference(difference: dict, scale: float, unit: str, digits: int = 1) -> str:
    """'+1.6 points [95% CI -1.9, +5.1]': a difference and its interval, scaled (100: fractions to points)."""
    text = f"{scale * difference['diff']:+.{digits}f}{unit}"
    if difference["ci95"] is None:
        return text + " [too few images for an interval]"
    low, high = (f"{scale * v:+.{digits}f}" for v in difference["ci95"])
    return f"{text} [95% CI {low}, {high}]"


def _verdict(difference: dict, above: str, below: str, neither: str) -> str:
    """`above` when the interval of a − b lies above 0, `below` when below, else `neither`."""
    if difference["ci95"] is None:
        return f"; {neither} (too few images to tell)."
    low, high = difference["ci95"]
    verdict = above if low > 0 else below if high < 0 else f"{neither} (the interval includes no difference)"
    return f"; {verdict}."


def report(
    title: str,
    intro: str,
    metrics: dict[str, dict],
    setups: dict[str, dict[str, Any]],
    classes: list[str],
    per_class: dict[str, Sequence[str]],
    robustness: dict[str, dict],
    paired: list[dict],
    figures: Sequence[tuple[str, str, str]],
) -> str:
    """The one-page Markdown report.

    metrics: model -> its entry of metrics/evaluate.json (shown exactly as written); robustness:
    the same of metrics/robustness.json; paired: plots/robustness/paired.json.
    setups: model -> {setting (Markdown): value}; the settings on which the models differ
    make a table, the rest one list. per_class: model -> accuracy per
    class as written. figures: (heading, relative path, what it shows).
    """
    models = list(metrics)
    names = [label(m) for m in models]
    keys = list(dict.fromkeys(k for m in models for k in metrics[m]))
    lines = [f"# {title}", "", intro, "", "## Test metrics", "",
             "From `metrics/evaluate.json`, each value as written there in brackets where it is rounded here "
             "(FLOPs count a multiply-add as 2).", ""]
    lines += _table(["metric", *names], [[f"{METRIC_LABELS.get(k, k)} (`{k}`)",
                                          *(readable(k, metrics[m].get(k, "—")) for m in models)] for k in keys])

    settings = list(dict.fromkeys(k for m in models for k in setups[m]))
    shown = {k: [as_written(setups[m][k]) if k in setups[m] else "—" for m in models] for k in settings}
    differ = [k for k in settings if len(set(shown[k])) > 1]
    differ.sort(key=lambda k: all(k in setups[m] for m in models))  # one model's own settings first
    same = {k: setups[models[0]][k] for k in settings if k not in differ}
    lines += ["", "## How the models differ", ""]
    lines += _table(["setting", *names], [[k, *shown[k]] for k in differ])
    lines += ["", "Shared by all: " + "; ".join(f"{k} = {as_written(v)}" for k, v in same.items()) + "."]

    lines += ["", "## Per-class test accuracy", ""]
    lines += _table(["class", *names], [[c, *(per_class[m][i] for m in models)] for i, c in enumerate(classes)])

    lines += ["", "## Robustness and calibration", "", "From `metrics/robustness.json`: accuracy on a "
              "fixed test subset, clean and under CIFAR-10-C's corruptions (mean over corruptions and severities) "
              "and occlusion (mean over the fractions removed); calibration on the whole test split.", ""]
    keys = list(dict.fromkeys(k for m in models for k in robustness[m]))
    lines += _table(["metric", *names], [[f"{METRIC_LABELS.get(k, k)} (`{k}`)",
                                          *(readable(k, robustness[m].get(k, "—")) for m in models)] for k in keys])
    lines += ["", *robustness_reading(robustness, paired)]

    lines += ["", "## Figures", ""]
    for heading, link, caption in figures:
        lines += [f"### {heading}", "", caption, "", f"![{heading}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"


COPIED_TO_EVALUATE = ("params", "train_time_s")  # training metrics that metrics/evaluate.json repeats
RECIPE_SHOWN = ("batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup", "label_smoothing",
                "ema", "augment", "cutout", "mixup", "cutmix")  # the recipe keys the report's opening names


def what_is_compared(meta: dict, trained: dict[str, dict], configs: dict[str, dict]) -> str:
    """The report's opening: the data (name, source, classes, size, images per split) and each model's budget
    and recipe (from its models/<name>/config.json), so that the numbers below are read for what they are."""
    counts = meta["counts"]
    shape = meta["image_shape"]
    source = meta.get("source", "")
    data = (f"**Data**: {meta.get('name', meta['dataset'])} (`data.source`: `{source}`), {len(meta['classes'])} classes, "
            f"images of {shape[0]}×{shape[1]} px"
            + (f" (brought to that size by `{meta['resize']}`)" if meta.get("resize") and meta.get("stored_sizes", {})
               not in ({}, {f"{shape[1]}x{shape[0]}": sum(counts.values())}) else "")
            + f"; {counts['train']:,} training, {counts['val']:,} validation and {counts['test']:,} test images.")
    models = []
    for name, metrics in trained.items():
        recipe = configs[name].get("recipe", {})
        keys = ", ".join(f"{k} {recipe[k]}" for k in RECIPE_SHOWN if k in recipe and recipe[k] not in (0, 0.0, "none"))
        models.append(f"the {label(name)} {metrics.get('epochs', '?')} epochs ({keys})")
    return data + "\n\n**Training**: " + "; ".join(models) + "."


def write_report(results: Any, figures: Any, path: Path) -> None:
    """The one-page report of `results` (compare.Results) and its `figures` (compare.Figures): metrics, how
    the models were set up and trained, per-class accuracy, robustness and calibration, figures."""
    setups = {}
    for name in MODELS:
        config, trained = results.models[name][1], results.train_metrics[name]
        setup = {f"`{name}.{k}`": v for k, v in config["params"].items()}
        setup |= {f"`{k}` (recipe)": v for k, v in config.get("recipe", {}).items()}
        setup |= {f"`{k}` (training)": v for k, v in trained.items() if k not in (*COPIED_TO_EVALUATE, "recipe")}
        setup |= {"input mean": config["mean"], "input std": config["std"]}
        setups[name] = setup

    def link(p: Path) -> str:
        return Path(os.path.relpath(p, path.parent)).as_posix()

    out = figures.out
    captions = figure_captions([REGISTRY[n] for n in MODELS])
    listed = [(heading, link(out / f"{stem}.png"), text) for stem, (heading, text) in captions.items()
              if (out / f"{stem}.png").is_file()]
    for name, heads in figures.head_figures.items():
        listed.append((f"{label(name)} attention per head", link(heads[0]),
                       "The readout's attention in every layer and head, one figure per seeded image: "
                       + ", ".join(f"[{p.stem}]({link(p)})" for p in heads) + ". The first:"))
    dataset = results.meta.get("name", results.meta["dataset"])
    configs = {name: results.models[name][1] for name in MODELS}
    intro = "\n".join([what_is_compared(results.meta, results.train_metrics, configs), "",
                        "Written by the `visualize` stage of `dvc repro` from `metrics/`, `models/*/config.json` and "
                        f"`plots/evaluate/`; every figure is in `{out.as_posix()}/`."])
    title = f"{' vs '.join(label(n) for n in MODELS)} on {dataset}"
    text = report(title, intro, results.metrics, setups, results.classes, results.per_class, results.robustness,
                  results.paired, listed)
    with atomic_write(path) as tmp:
        tmp.write_text(text)
