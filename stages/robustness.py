"""Stage robustness: each trained model under corruptions and occlusion, and its calibration.

Writes metrics/robustness.json (per model: accuracy on the clean subset, mean accuracy under
corruption, relative robustness, mean accuracy under occlusion, ECE, NLL, Brier score, and the
temperature fitted on the validation split with those three after scaling by it), the paired
differences between models in plots/robustness/paired.json and, per model, CSVs for dvc plots
under plots/robustness/: accuracy per severity (mean over the corruptions), per corruption and
severity, per occluded fraction, and the reliability bins before and after temperature scaling.
"""

import sys
from pathlib import Path

# This checkout's library first: a queued experiment runs in a copy of the project, and must run
# the code DVC hashed for it there, not the copy an editable install points to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np

from vitcnn.cli import run_stage
from vitcnn.config import load_params
from vitcnn.data import load_split
from vitcnn.io import write_csv, write_json
from vitcnn.models import MODELS
from vitcnn.models.store import load_model
from vitcnn.robustness import compare, measure
from vitcnn.runtime import keep_freed_memory, resolve_device, resolve_precision

PREPARED = Path("data/prepared")
PLOTS = Path("plots/robustness")


def main() -> None:
    params = load_params()
    cfg = params.robustness
    device = resolve_device(params.device)
    keep_freed_memory()
    dtype = resolve_precision(params.evaluate.precision, device)
    models = {name: load_model(Path("models") / name) for name in MODELS}
    results = measure(models, load_split(PREPARED, "test"), load_split(PREPARED, "val"), cfg, params.seed, device,
                      dtype)

    for name, r in results.items():
        by_severity = [[0, r.clean_acc]] + [[s, float(np.mean([r.corruption_acc[c][s] for c in cfg.corruptions]))]
                                            for s in cfg.severities]
        write_csv(PLOTS / "severity" / f"{name}.csv", ["severity", "accuracy"], by_severity)
        write_csv(PLOTS / "corruptions" / f"{name}.csv", ["corruption", "severity", "accuracy"],
                  [[c, s, acc] for c, accs in r.corruption_acc.items() for s, acc in accs.items()])
        fractions = list(r.occlusion_acc["patches"])
        write_csv(PLOTS / "occlusion" / f"{name}.csv", ["fraction", "patches", "box"],
                  [[f, r.occlusion_acc["patches"][f], r.occlusion_acc["box"][f]] for f in fractions])
        for folder, calibrated in (("reliability", r.calibration), ("reliability_ts", r.calibrated)):
            write_csv(PLOTS / folder / f"{name}.csv", ["confidence", "accuracy", "count", "lower", "upper"],
                      [[b["confidence"], b["accuracy"], b["count"], b["lower"], b["upper"]] for b in calibrated.bins])
        s = r.summary()
        print(f"robustness: {name} clean {s['subset_clean_acc']:.4f}, corrupted {s['corruption_acc']:.4f} "
              f"({s['relative_robustness']:.2f} of clean), ECE {s['ece']:.4f} "
              f"({s['ece_ts']:.4f} at temperature {s['temperature']:.3f})")
    write_json(PLOTS / "paired.json", compare(results, cfg.calibration_bins, params.seed))
    write_json(Path("metrics/robustness.json"), {name: r.summary() for name, r in results.items()})


if __name__ == "__main__":
    run_stage("robustness", main)
