"""Stage visualize: figures under plots/images/ (and the attention per head under plots/heads/), every
model's learning curves and costs in one file each under plots/compare/ (for `dvc plots`), and the
one-page report plots/report.md.

Everything runs on the CPU in fp32, on a fixed, seeded set of test images and on the test
images each model gets wrong most confidently (by evaluate's predictions and confidences).
"""

import sys
from pathlib import Path

# This checkout's library first: a queued experiment runs in a copy of the project, and must run
# the code DVC hashed for it there, not the copy an editable install points to.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vitcnn import paths
from vitcnn.cli import run_stage
from vitcnn.compare import Figures, read_results, write_plot_data
from vitcnn.config import load_params
from vitcnn.errors import ConfigError
from vitcnn.report import write_report


def main() -> None:
    params = load_params()
    results = read_results()
    unknown = sorted(set(params.visualize.classes) - set(results.classes))
    if unknown:
        raise ConfigError(f"visualize.classes: {unknown} not in the dataset; allowed: {', '.join(results.classes)}")
    write_plot_data(results, Path("."), paths.COMPARE)
    figures = Figures(results, params.visualize, params.seed, paths.IMAGES, paths.HEADS)
    figures.draw()
    write_report(results, figures, paths.REPORT)
    print(f"visualize: wrote {paths.REPORT}, {len(list(paths.IMAGES.rglob('*.png')))} figures under {paths.IMAGES}/ "
          f"and the data under {paths.COMPARE}/")


if __name__ == "__main__":
    run_stage("visualize", main)
