"""Stage robustness: each trained model under corruptions and occlusion, and its calibration.

Writes metrics/robustness.json (per model: accuracy on the clean subset, mean accuracy under
corruption, relative robustness, mean accuracy under occlusion, ECE, NLL, Brier score, and the
temperature fitted on the validation split with those three after scaling by it; whether the model
is clearly above chance; and which corruption parameters were used: CIFAR-10-C's, Tiny-ImageNet-C's
or ImageNet-C's, by image size, or the official files), the paired
differences between models in plots/robustness/paired.json and, for dvc plots, every model in one
CSV each under plots/robustness/: accuracy per severity (mean over the corruptions), per corruption
and severity, per occluded fraction, and the reliability bins before and after temperature scaling.
"""

import sys
from pathlib import Path

# This checkout's library first: a queued experiment runs in a copy of the project, and must run
# the code DVC hashed for it there, not the copy an editable install points to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

from vitcnn import paths
from vitcnn.cli import run_stage
from vitcnn.config import load_params
from vitcnn.corruptions import parameter_set
from vitcnn.data import load_split
from vitcnn.io import write_csv, write_json
from vitcnn.models import MODELS
from vitcnn.models.store import load_model
from vitcnn.robustness import compare, measure
from vitcnn.runtime import keep_freed_memory, resolve_device, resolve_precision

BIN_COLUMNS = ["confidence", "accuracy", "count", "lower", "upper"]


def main() -> None:
    params = load_params()
    cfg = params.robustness
    device = resolve_device(params.device)
    keep_freed_memory()
    dtype = resolve_precision(params.evaluate.precision, device)
    models = {name: load_model(paths.model_dir(name)) for name in MODELS}
    test = load_split(paths.PREPARED, "test")
    results = measure(models, test, load_split(paths.PREPARED, "val"), cfg, params.seed, device, dtype,
                      params.evaluate.tta)

    tables: dict[str, list[list]] = {"severity": [], "corruptions": [], "occlusion": [], "reliability": [],
                                     "reliability_ts": []}
    for name, r in results.items():
        tables["severity"] += [[name, 0, r.clean_acc]] + [
            [name, s, float(np.mean([r.corruption_acc[c][s] for c in cfg.corruptions]))] for s in cfg.severities]
        tables["corruptions"] += [[name, c, s, acc] for c, accs in r.corruption_acc.items() for s, acc in accs.items()]
        tables["occlusion"] += [[name, f, r.occlusion_acc["patches"][f], r.occlusion_acc["box"][f]]
                                for f in r.occlusion_acc["patches"]]
        for kind, calibrated in (("reliability", r.calibration), ("reliability_ts", r.calibrated)):
            tables[kind] += [[name, *(b[k] for k in BIN_COLUMNS)] for b in calibrated.bins]
        s = r.summary()
        kept = "not clearly above chance" if s["relative_robustness"] is None else \
            f"{s['relative_robustness']:.2f} of clean"
        print(f"robustness: {name} clean {s['subset_clean_acc']:.4f}, corrupted {s['corruption_acc']:.4f} "
              f"({kept}), ECE {s['ece']:.4f} ({s['ece_ts']:.4f} at temperature {s['temperature']:.3f})")
    headers = {"severity": ["severity", "accuracy"], "corruptions": ["corruption", "severity", "accuracy"],
               "occlusion": ["fraction", "patches", "box"], "reliability": BIN_COLUMNS, "reliability_ts": BIN_COLUMNS}
    for kind, rows in tables.items():
        write_csv(paths.robustness_table(kind), ["model", *headers[kind]], rows)
    write_json(paths.PAIRED, compare(results, cfg.calibration_bins, params.seed))
    # Which corruptions: the official CIFAR-10-C files, or generated with the parameter set for the image size.
    source = "cifar10-c files" if cfg.cifar10c else parameter_set(test.images.shape[1])
    write_json(paths.ROBUSTNESS, {name: {**r.summary(), "corruptions": source} for name, r in results.items()})


if __name__ == "__main__":
    run_stage("robustness", main)
