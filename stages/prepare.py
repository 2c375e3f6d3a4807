"""Stage prepare: read data.source, split train/val/test, write data/prepared/."""

from pathlib import Path

from vitcnn.cli import run_stage
from vitcnn.config import load_params
from vitcnn.prepare import prepare


def main() -> None:
    params = load_params()
    meta = prepare(params, out_dir=Path("data/prepared"), download_dir=Path("data/raw"))
    counts = ", ".join(f"{split} {n}" for split, n in meta["counts"].items())
    print(f"prepare: {meta['dataset']} from {meta['source']} ({meta['layout']}): {counts}")


if __name__ == "__main__":
    run_stage("prepare", main)
