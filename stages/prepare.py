"""Stage prepare: read data.source, split train/val/test, write data/prepared/."""

import sys
from pathlib import Path

# This checkout's library first: a queued experiment runs in a copy of the project, and must run
# the code DVC hashed for it there, not the copy an editable install points to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitcnn import paths
from vitcnn.cli import run_stage
from vitcnn.config import load_params
from vitcnn.io import project_root
from vitcnn.prepare import prepare


def main() -> None:
    params = load_params(models=[])  # the models' sections are their stages' business
    # The download cache is the project's, shared with queued experiments (which run in copies).
    meta = prepare(params, out_dir=paths.PREPARED, download_dir=project_root() / paths.DOWNLOADS)
    counts = ", ".join(f"{split} {n}" for split, n in meta["counts"].items())
    print(f"prepare: {meta['dataset']} from {meta['source']} ({meta['layout']}): {counts}")


if __name__ == "__main__":
    run_stage("prepare", main)
