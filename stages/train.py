"""Stage train_vit / train_cnn: `python stages/train.py vit|cnn`.

Writes models/<model>/ (safetensors weights + config), plots/train/<model>.csv (one row
per epoch) and metrics/train_<model>.json. After every epoch a resume checkpoint goes to
checkpoints/<model>/last.pt; rerunning an interrupted stage goes on from it.
"""

import sys
from pathlib import Path

import torch

# This checkout's library first: a queued experiment runs in a copy of the project, and must run
# the code DVC hashed for it there, not the copy an editable install points to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitcnn import paths
from vitcnn.checkpoint import fingerprint
from vitcnn.cli import run_stage
from vitcnn.config import load_params, params_dict, recipe_for, recipe_key
from vitcnn.data import load_meta, load_split, normalization
from vitcnn.errors import UserError
from vitcnn.io import write_csv, write_json
from vitcnn.models import MODELS
from vitcnn.models.store import build_model, count_params, model_params, save_model
from vitcnn.runtime import keep_freed_memory, resolve_device, seed_everything, use_deterministic
from vitcnn.train import check_recipe_fits, fit


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in MODELS:
        raise UserError(f"usage: python stages/train.py {{{'|'.join(MODELS)}}}")
    name = sys.argv[1]
    params = load_params(models=[name])  # this model's section only: another model's is its own stages' business
    device = resolve_device(params.device)
    keep_freed_memory()
    meta = load_meta(paths.PREPARED)
    train, val = load_split(paths.PREPARED, "train"), load_split(paths.PREPARED, "val")

    recipe = recipe_for(params, name)  # train.*, with this model's own recipe keys
    mean, std = normalization(meta, recipe.normalization)
    use_deterministic(recipe.deterministic)
    seed_everything(params.seed)
    section = getattr(params, name)
    image_size = meta["image_shape"][0]
    model = build_model(name, len(meta["classes"]), section, image_size)
    check_recipe_fits(model, recipe, recipe_key(params, name))  # before any work: airbench's options fit the model
    n_params = count_params(model)
    print(f"train_{name}: {n_params:,} parameters, {len(train)} train / {len(val)} val images on {device}")

    def report(row: dict) -> None:
        print(f"train_{name}: epoch {row['epoch']}/{recipe.epochs} loss {row['train_loss']:.4f} "
              f"acc {row['train_acc']:.4f} val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f} "
              f"({row['epoch_time_s']:.1f}s, {row['images_per_s']:.0f} img/s)", flush=True)

    checkpoint = paths.checkpoint(name)
    run_id = fingerprint(params.seed, params.device, recipe, section,
                         files=(paths.PREPARED / "train.safetensors", paths.PREPARED / "val.safetensors"))
    try:
        result = fit(model, train, val, recipe, mean, std, device, params.seed, name=name, on_epoch=report,
                     checkpoint=checkpoint, fingerprint=run_id)
    except torch.OutOfMemoryError:
        key = f"{name}.recipe.batch_size" if section.recipe.batch_size is not None else "train.batch_size"
        raise UserError(f"{device} ran out of memory at {key} {recipe.batch_size}; "
                        f"try {max(1, recipe.batch_size // 2)}, or a smaller model") from None
    model.load_state_dict(result.state)

    config = {"name": name, "num_classes": len(meta["classes"]), "image_size": image_size,
              "params": params_dict(model_params(name, section)), "classes": meta["classes"], "mean": mean, "std": std,
              "best_epoch": result.best_epoch, "train_time_s": round(result.train_time_s, 2),
              "recipe": params_dict(recipe)}  # what this model was trained with: train.*, with its own recipe keys
    save_model(model, paths.model_dir(name), config)
    history = result.history
    write_csv(paths.history(name), list(history[0]), [list(r.values()) for r in history])
    speeds = sorted(r["images_per_s"] for r in history)
    write_json(paths.train_metrics(name), {
        "val_acc": history[result.best_epoch - 1]["val_acc"],
        "best_epoch": result.best_epoch,
        "final_val_acc": history[-1]["val_acc"],
        "train_time_s": round(result.train_time_s, 2),
        "setup_time_s": round(result.setup_time_s, 2),  # compilation + CUDA graph capture, part of train_time_s
        "cuda_graphs": result.cuda_graphs,
        "train_images_per_s": speeds[len(speeds) // 2],
        "params": n_params,
        "epochs": len(history),
        "device": str(device),
        "precision": result.precision,
        "torch": torch.__version__,
        # Only what this model's own recipe sets apart from train.* (params.yaml's columns show the rest, and
        # models/<name>/config.json the whole recipe): dvc exp show gets no column per model per recipe key.
        # None at all when it sets nothing: DVC drops an empty mapping, and the file should read as it shows.
        **({"recipe": own} if (own := {k: v for k, v in params_dict(section.recipe).items() if v is not None}) else {}),
    })
    checkpoint.unlink()  # every output is written: nothing left to resume


if __name__ == "__main__":
    run_stage(f"train_{sys.argv[1] if len(sys.argv) > 1 else ''}", main)
