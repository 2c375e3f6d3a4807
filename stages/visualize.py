"""Stage visualize: figures under plots/images/, a one-row trade-off table per model under
plots/compare/ (for `dvc plots`), and the one-page report plots/report.md.

Everything runs on the CPU in fp32, on a fixed, seeded set of test images and on the test
images each model gets wrong most confidently (by evaluate's predictions and confidences).
"""

import sys
from pathlib import Path

# This checkout's library first: a queued experiment runs in a copy of the project, and must run
# the code DVC hashed for it there, not the copy an editable install points to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitcnn.cli import run_stage
from vitcnn.compare import Figures, read_results, tradeoff_tables, write_report
from vitcnn.config import load_params
from vitcnn.data import load_meta, load_split
from vitcnn.errors import ConfigError

PREPARED = Path("data/prepared")
OUT = Path("plots/images")
COMPARE = Path("plots/compare")  # per model: tradeoff/<model>.csv (one row), for dvc plots
REPORT = Path("plots/report.md")


def main() -> None:
    params = load_params()
    meta = load_meta(PREPARED)
    unknown = sorted(set(params.visualize.classes) - set(meta["classes"]))
    if unknown:
        raise ConfigError(f"visualize.classes: {unknown} not in the dataset; allowed: {', '.join(meta['classes'])}")
    results = read_results(meta["classes"], load_split(PREPARED, "test"), Path("plots"), Path("metrics"), Path("models"))
    tradeoff_tables(results.metrics, COMPARE)
    figures = Figures(results, params.visualize, params.seed, OUT)
    figures.draw()
    write_report(results, figures, meta["dataset"], REPORT)
    print(f"visualize: wrote {REPORT}, {len(list(OUT.rglob('*.png')))} figures under {OUT}/ "
          f"and the data under {COMPARE}/")


if __name__ == "__main__":
    run_stage("visualize", main)
