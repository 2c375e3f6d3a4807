"""Beyond clean accuracy: accuracy under corruptions and occlusion, and calibration, per model.

- Corruptions: a fixed, seeded, stratified subset of the test split under CIFAR-10-C's
  corruptions (vitcnn.corruptions) at severities 1-5, or the official CIFAR-10-C files when
  given. Each (corruption, severity) is generated once, from its own seed, and every model
  sees the very same images.
- Occlusion: a growing fraction of each image removed — random square patches on a grid
  (the ViT's patch size at the defaults) or one central box — replaced by the dataset's
  mean colour (0 after normalisation), the same pixels for every model.
- Calibration, on the whole clean test split: expected calibration error over equal-width
  confidence bins (Guo et al. 2017), negative log-likelihood and the Brier score, and the
  reliability diagram's bins; then the same after temperature scaling (Guo et al. 2017): one
  temperature per model, fitted on the validation split, divides the logits. It leaves every
  prediction as it is and takes away what a training choice such as label smoothing does to
  confidence alone, so that models can be compared on what their scores rank, not how they are
  scaled (Minderer et al. 2021 compare both).
- Comparisons between models: the difference of relative robustness and of ECE, with a 95%
  paired bootstrap interval over the images (every model saw the same ones), so that a
  report says "more robust" only where the difference is more than the images' noise.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy import optimize, stats

from vitcnn.config import RobustnessConfig
from vitcnn.corruptions import CORRUPTIONS, corrupt
from vitcnn.data import BatchLoader, Split, stratified_split
from vitcnn.errors import DataError
from vitcnn.runtime import autocast, predict, tta_logits


@dataclass
class Calibration:
    ece: float
    nll: float
    brier: float
    bins: list[dict[str, float]]  # per bin: lower and upper confidence, mean confidence, accuracy, count
    confidence: np.ndarray  # (N,) per test image: the top class's probability
    correct: np.ndarray  # (N,) bool: whether the top class is the label


@dataclass
class ModelRobustness:
    clean_acc: float  # on the subset
    corruption_acc: dict[str, dict[int, float]] = field(default_factory=dict)  # {corruption: {severity: acc}}
    occlusion_acc: dict[str, dict[float, float]] = field(default_factory=dict)  # {"patches"|"box": {fraction: acc}}
    calibration: Calibration | None = None
    temperature: float | None = None  # fitted on the validation split; > 1: the model was overconfident
    calibrated: Calibration | None = None  # `calibration` of the logits divided by `temperature`
    clean_correct: np.ndarray | None = None  # (n,) bool per subset image
    corrupted_share: np.ndarray | None = None  # (n,) per subset image: share of (corruption, severity) it is right on
    occluded_share: dict[str, np.ndarray] = field(default_factory=dict)  # {kind: (n,) share of fractions right on}
    chance: dict | None = None  # `above_chance` of its accuracy on the whole test split

    @property
    def learnt(self) -> bool:
        """Whether the model is clearly above chance (and its temperature fit found a minimum): else comparing
        its robustness or calibration with another's says nothing."""
        return self.chance is None or self.chance["above"]

    def mean_corruption_acc(self) -> float:
        return float(np.mean([acc for severities in self.corruption_acc.values() for acc in severities.values()]))

    def summary(self) -> dict[str, float | None]:
        """The numbers for metrics/robustness.json (dvc metrics diff, dvc exp show, study summaries). A model
        not clearly above chance has no relative robustness (a ratio of two chance-level accuracies)."""
        mean = self.mean_corruption_acc()
        out = {
            "subset_clean_acc": round(self.clean_acc, 6),
            "corruption_acc": round(mean, 6),
            "relative_robustness": round(mean / self.clean_acc, 6) if self.clean_acc and self.learnt else None,
        }
        if self.chance is not None:
            out["above_chance"] = self.chance["above"]
        for kind, by_fraction in self.occlusion_acc.items():
            out[f"occlusion_{kind}_acc"] = round(float(np.mean(list(by_fraction.values()))), 6)
        if self.calibration:
            out |= {"ece": round(self.calibration.ece, 6), "nll": round(self.calibration.nll, 6),
                    "brier": round(self.calibration.brier, 6)}
        if self.calibrated:
            out |= {"temperature": round(self.temperature, 6), "ece_ts": round(self.calibrated.ece, 6),
                    "nll_ts": round(self.calibrated.nll, 6), "brier_ts": round(self.calibrated.brier, 6)}
        return out


def pick_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of a stratified, seeded subset of `size` test images (all when 0 or larger)."""
    n = len(labels)
    if size == 0 or size >= n:
        return torch.arange(n)
    taken, _ = stratified_split(labels.numpy(), size, np.random.default_rng(seed))
    return torch.from_numpy(taken)


def correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: dict, device: torch.device,
            dtype: torch.dtype, batch_size: int, tta: str = "none", occlude: torch.Tensor | None = None) -> np.ndarray:
    """(N,) bool: whether `model` classifies each uint8 image (N, H, W, C) right, normalised as it was
    trained, under test-time augmentation `tta` (as evaluate measures accuracy); `occlude` (N, 1, H, W) bool
    marks pixels replaced by the mean colour (0 after normalisation)."""
    loader = BatchLoader(Split(images, labels), batch_size, device, config["mean"], config["std"])
    keep = None if occlude is None else (~occlude).to(device)
    model.eval()
    hits = []
    with torch.no_grad(), autocast(device, dtype):
        for start, (x, y) in zip(range(0, len(labels), batch_size), loader):
            if keep is not None:
                x = x * keep[start : start + len(x)]
            hits.append(tta_logits(model, x, tta).argmax(1) == y)
    return torch.cat(hits).cpu().numpy()


def corrupted_images(images: torch.Tensor, name: str, severity: int, seed: int, cfg: RobustnessConfig,
                     official: dict[str, np.ndarray] | None, subset: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8: the subset's images under `name` at `severity`, generated from a seed of
    their own, or read from the official CIFAR-10-C arrays."""
    if official is not None:
        n_test = official[name].shape[0] // 5
        return torch.from_numpy(official[name][(severity - 1) * n_test + subset.numpy()])
    generator = torch.Generator(device=images.device).manual_seed(seed * 1000 + CORRUPTIONS.index(name) * 10 + severity)
    out = []
    for start in range(0, len(images), cfg.batch_size):
        batch = images[start : start + cfg.batch_size].permute(0, 3, 1, 2)  # (B, C, H, W)
        out.append(corrupt(batch, name, severity, generator).permute(0, 2, 3, 1))
    return torch.cat(out)


def occlusion_masks(n: int, size: int, fraction: float, kind: str, patch: int, seed: int) -> torch.Tensor:
    """(n, 1, size, size) bool: True where removed. `patches`: round(fraction * cells) random cells of
    a patch x patch grid per image (seeded); `box`: one centred square of that area fraction."""
    if kind == "box":
        side = round(size * math.sqrt(fraction))
        lo = (size - side) // 2
        mask = torch.zeros(1, 1, size, size, dtype=torch.bool)
        mask[..., lo : lo + side, lo : lo + side] = True
        return mask.expand(n, 1, size, size)
    grid = size // patch
    cells = grid * grid
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(n, cells, generator=generator).argsort(1)
    dropped = order < round(fraction * cells)  # (n, cells): the first k of a random order
    mask = dropped.view(n, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return mask


def calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int) -> Calibration:
    """ECE over `bins` equal-width confidence bins (the gap between confidence and accuracy, weighted by
    each bin's share of images), NLL and the Brier score: the squared error of the probability vector
    against the one-hot label, summed over the classes (0 to 2; scikit-learn's multiclass convention)
    and averaged over the images."""
    probs = logits.float().softmax(1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    index = torch.bucketize(confidence.cpu(), edges[1:-1], right=True)  # bin i holds [edge_i, edge_i+1); the last, 1 too
    ece, rows = 0.0, []
    for i in range(bins):
        inside = index == i
        count = int(inside.sum())
        if count:
            conf, acc = confidence.cpu()[inside].mean().item(), correct.cpu()[inside].mean().item()
            ece += count / len(labels) * abs(conf - acc)
            rows.append({"lower": edges[i].item(), "upper": edges[i + 1].item(), "confidence": conf,
                         "accuracy": acc, "count": count})
    nll = torch.nn.functional.cross_entropy(logits.float(), labels).item()
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).float()
    brier = ((probs - onehot) ** 2).sum(1).mean().item()
    return Calibration(ece, nll, brier, rows, confidence.cpu().numpy(), correct.cpu().numpy().astype(bool))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T that minimises the negative log-likelihood of softmax(logits / T) (Guo et al.
    2017's temperature scaling), searched in [0.05, 20]. The NLL is convex in 1 / T, so a bounded scalar
    search (scipy's) finds the one minimum; float64 keeps the search's small steps visible."""
    logits, labels = logits.detach().double().cpu(), labels.cpu()

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels).item()

    found = optimize.minimize_scalar(nll, bounds=tuple(math.log(b) for b in TEMPERATURE_BOUNDS), method="bounded",
                                     options={"xatol": 1e-5})
    return math.exp(found.x)


TEMPERATURE_BOUNDS = (0.05, 20.0)  # the search's; a fit that ends at one found no minimum


def above_chance(correct: np.ndarray, classes: int, temperature: float | None = None) -> dict:
    """Whether accuracy `correct.mean()` over these images is clearly above chance (1 / classes): the lower end
    of its 95% exact (Clopper-Pearson) interval above it, and a temperature fit, if given, not at a bound of its
    search. A model at chance predicts little beyond one class; its robustness and calibration compare with
    nothing."""
    n, hits = len(correct), int(np.sum(correct))
    low, high = stats.binomtest(hits, n).proportion_ci(0.95, method="exact") if n else (0.0, 1.0)
    at_bound = temperature is not None and any(math.isclose(temperature, b, rel_tol=1e-3) for b in TEMPERATURE_BOUNDS)
    return {"accuracy": hits / n if n else 0.0, "ci95": [float(low), float(high)], "images": n, "chance": 1 / classes,
            "temperature_at_bound": at_bound, "above": bool(low > 1 / classes and not at_bound)}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int, axis: int = -1) -> np.ndarray:
    """ECE along `axis` (any leading axes are separate samples): the sum over equal-width confidence bins
    of |sum of (confidence - correct) in the bin| / N, which is `calibration`'s count-weighted gap."""
    index = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence, side="right")  # as torch.bucketize(right)
    gap = confidence - correct
    total = sum(np.abs(np.where(index == b, gap, 0.0).sum(axis)) for b in range(bins))
    return total / confidence.shape[axis]


def compare(results: dict[str, ModelRobustness], bins: int, seed: int, resamples: int = 2000) -> list[dict]:
    """For each pair of models (a, b): a's relative robustness, mean accuracy under each occlusion and ECE
    (before and after temperature scaling) minus b's, each with a 95% paired bootstrap interval
    (percentile; scipy) over the images both saw: the subset for robustness and occlusion, the test split
    for ECE. An interval that contains 0 means the images cannot tell the two apart; an interval of None,
    that there are too few images for one. `at_chance` lists a model of the pair that is not clearly above
    chance (`above_chance`), of which nothing should be concluded."""
    def relative(clean, share, axis=-1):
        return share.mean(axis) / clean.mean(axis)

    def ece_of(a: Calibration, b: Calibration) -> tuple:  # (the data, the statistic) of a's ECE - b's
        return ((a.confidence, a.correct, b.confidence, b.correct),
                lambda fa, ka, fb, kb, axis=-1: (expected_calibration_error(fa, ka, bins, axis)
                                                 - expected_calibration_error(fb, kb, bins, axis)))

    pairs = []
    for a, b in itertools.combinations(results, 2):
        ra, rb = results[a], results[b]
        robust = ((ra.clean_correct, ra.corrupted_share, rb.clean_correct, rb.corrupted_share),
                  lambda ca, sa, cb, sb, axis=-1: relative(ca, sa, axis) - relative(cb, sb, axis))
        differences = {"relative_robustness": robust, "ece": ece_of(ra.calibration, rb.calibration)}
        if ra.calibrated and rb.calibrated:
            differences["ece_ts"] = ece_of(ra.calibrated, rb.calibrated)
        for kind in ra.occluded_share:  # mean accuracy over the occluded fractions, as occlusion_<kind>_acc
            differences[f"occlusion_{kind}_acc"] = ((ra.occluded_share[kind], rb.occluded_share[kind]),
                                                    lambda sa, sb, axis=-1: sa.mean(axis) - sb.mean(axis))
        row = {"a": a, "b": b, "at_chance": {m: results[m].chance for m in (a, b) if not results[m].learnt}}
        for key, (data, statistic) in differences.items():
            data = tuple(np.asarray(d, dtype=np.float64) for d in data)
            # A resample with no clean hit has no ratio (few images, a model near chance): the interval is
            # then None, which the report says, rather than a warning.
            with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", stats.DegenerateDataWarning)
                ci = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                                     batch=50, method="percentile", rng=np.random.default_rng(seed)).confidence_interval
            bounds = [float(ci.low), float(ci.high)]
            row[key] = {"diff": round(float(statistic(*data)), 6),
                        "ci95": [round(v, 6) for v in bounds] if np.isfinite(bounds).all() else None,
                        "images": len(data[0])}
        pairs.append(row)
    return pairs


def load_official(folder: Path, corruptions: list[str], test_labels: torch.Tensor,
                  image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The official CIFAR-10-C arrays for `corruptions`, checked against the test split (its labels, and its
    images' shape: CIFAR-10-C is 32 x 32, the official test split at data.image_size 32)."""
    n = len(test_labels)
    labels_path = folder / "labels.npy"
    if not labels_path.is_file():
        raise DataError(f"robustness.cifar10c: {labels_path} not found; point it at the folder of the "
                        "CIFAR-10-C .npy files (labels.npy and one <corruption>.npy each)")
    labels = np.load(labels_path)
    if labels.shape != (5 * n,):
        raise DataError(f"{labels_path}: {labels.shape[0]} labels, expected 5 x {n} (5 severities of the test split)")
    expected = np.tile(test_labels.numpy(), 5)
    if not np.array_equal(labels.astype(np.int64), expected):
        raise DataError(f"{labels_path}: the labels do not follow the test split's order; CIFAR-10-C follows the "
                        "official test batch: use data.source download or the official archive")
    arrays = {}
    for name in corruptions:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"robustness.cifar10c: {path} not found; the folder must hold one .npy per corruption")
        array = np.load(path, mmap_mode="r")
        if array.shape != (5 * n, *image_shape) or array.dtype != np.uint8:
            raise DataError(f"{path}: shape {array.shape} {array.dtype}, expected ({5 * n}, "
                            f"{', '.join(map(str, image_shape))}) uint8: the test split's images (data.image_size)")
        arrays[name] = array
    return arrays


def measure(models: dict[str, tuple[nn.Module, dict]], test: Split, val: Split, cfg: RobustnessConfig, seed: int,
            device: torch.device, dtype: torch.dtype, tta: str = "none") -> dict[str, ModelRobustness]:
    """Every measurement of this module for every model, each on the same images; `val` (the validation
    split) only fits each model's temperature. Accuracies are under test-time augmentation `tta`, as
    evaluate's; calibration is of the model's own logits."""
    if cfg.subset > len(test):
        raise DataError(f"robustness.subset: {cfg.subset} is not allowed; the test split has {len(test)} images "
                        "(use at most that, or 0 for all)")
    official = (load_official(Path(cfg.cifar10c), cfg.corruptions, test.labels, tuple(test.images.shape[1:]))
                if cfg.cifar10c else None)
    subset = pick_subset(test.labels, cfg.subset, seed)
    images, labels = test.images[subset].to(device), test.labels[subset]
    results = {}
    for name, (model, config) in models.items():
        model.to(device, memory_format=torch.channels_last)
        hits = correct(model, images, labels, config, device, dtype, cfg.batch_size, tta)
        results[name] = ModelRobustness(clean_acc=float(hits.mean()), clean_correct=hits,
                                        corrupted_share=np.zeros(len(hits)))
    conditions = len(cfg.corruptions) * len(cfg.severities)
    for corruption in cfg.corruptions:
        for severity in cfg.severities:
            corrupted = corrupted_images(images, corruption, severity, seed, cfg, official, subset)
            for name, (model, config) in models.items():
                hits = correct(model, corrupted, labels, config, device, dtype, cfg.batch_size, tta)
                results[name].corruption_acc.setdefault(corruption, {})[severity] = float(hits.mean())
                results[name].corrupted_share += hits / conditions
    fractions = [0.0, *cfg.occlusion_fractions]
    for kind in ("patches", "box"):
        for fraction in fractions:
            mask = occlusion_masks(len(labels), images.shape[1], fraction, kind, cfg.occlusion_patch, seed)
            for name, (model, config) in models.items():
                hits = correct(model, images, labels, config, device, dtype, cfg.batch_size, tta, occlude=mask)
                results[name].occlusion_acc.setdefault(kind, {})[fraction] = float(hits.mean())
                share = results[name].occluded_share.setdefault(kind, np.zeros(len(hits)))
                share += hits / len(fractions)
    for name, (model, config) in models.items():
        def logits_of(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
            loader = BatchLoader(split, cfg.batch_size, device, config["mean"], config["std"])
            return predict(model, loader, dtype), loader.labels

        logits, labels_on_device = logits_of(test)
        temperature = fit_temperature(*logits_of(val))
        r = results[name]
        r.calibration = calibration(logits, labels_on_device, cfg.calibration_bins)
        r.temperature = temperature
        r.calibrated = calibration(logits / temperature, labels_on_device, cfg.calibration_bins)
        r.chance = above_chance(r.calibration.correct, logits.shape[1], temperature)
    return results
