"""Stage evaluate: each trained model on the test split, once.

Writes metrics/evaluate.json (per model: test accuracy and loss, parameters, FLOPs per image,
inference images/s, batch-1 latency, the training time its model folder records, and the test-time
augmentation the accuracy was measured with),
plots/evaluate/predictions/<model>.csv (one row per test
image: the actual and predicted class names, which DVC's confusion template reads, their indices,
and the confidence, the softmax probability of the predicted class) and plots/evaluate/per_class.csv
(model, class, accuracy).
"""

import sys
from pathlib import Path

import torch

# This checkout's library first: a queued experiment runs in a copy of the project, and must run
# the code DVC hashed for it there, not the copy an editable install points to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitcnn import paths
from vitcnn.cli import run_stage
from vitcnn.config import load_params
from vitcnn.data import BatchLoader, load_meta, load_split
from vitcnn.evaluate import evaluate_model, flops_per_image, inference_speed
from vitcnn.io import write_csv, write_json
from vitcnn.models import MODELS
from vitcnn.models.store import count_params, load_model
from vitcnn.runtime import keep_freed_memory, resolve_device, resolve_precision


def main() -> None:
    params = load_params()
    cfg = params.evaluate
    device = resolve_device(params.device)
    keep_freed_memory()
    dtype = resolve_precision(cfg.precision, device)
    classes = load_meta(paths.PREPARED)["classes"]
    test = load_split(paths.PREPARED, "test")
    height, width, channels = test.images.shape[1:]

    metrics, per_class = {}, []
    for name in MODELS:
        model, config = load_model(paths.model_dir(name))
        model.to(device, memory_format=torch.channels_last)
        loader = BatchLoader(test, cfg.batch_size, device, config["mean"], config["std"])
        result = evaluate_model(model, loader, dtype, cfg.tta)
        speed = inference_speed(model, loader, dtype, cfg.throughput_batches, cfg.latency_runs)
        metrics[name] = {
            "test_acc": round(result["test_acc"], 6),
            "test_loss": round(result["test_loss"], 6),
            "params": count_params(model),
            "flops_per_image": flops_per_image(model, (channels, height, width)),
            **speed,
            "train_time_s": config["train_time_s"],
            "device": str(device),
            "precision": str(dtype).removeprefix("torch."),
            "tta": cfg.tta,
        }
        per_class += [[name, c, round(acc, 6)] for c, acc in zip(classes, result["per_class_acc"])]
        rows = [(classes[a], classes[p], a, p, round(c, 6)) for a, p, c in
                zip(result["actual"].tolist(), result["predicted"].tolist(), result["confidence"].tolist())]
        write_csv(paths.predictions(name), ["actual", "predicted", "actual_index", "predicted_index", "confidence"],
                  rows)
        print(f"evaluate: {name} test_acc {metrics[name]['test_acc']:.4f}, {metrics[name]['flops_per_image'] / 1e6:.1f} MFLOPs/image, "
              f"{speed['inference_images_per_s']:.0f} img/s, {speed['latency_ms']:.2f} ms at batch 1")

    write_csv(paths.PER_CLASS, ["model", "class", "accuracy"], per_class)
    write_json(paths.EVALUATE, metrics)


if __name__ == "__main__":
    run_stage("evaluate", main)
