"""A screenshot of the whole page of `dvc plots show` as headless Chromium draws it offline.

    python tools/plots_screenshot.py OUT.png           # needs Chromium; e.g. docs/dvc_plots.png for the README

Every network request of the page fails on purpose (a proxy that does not exist), so the
picture shows what a machine without internet shows. The page is drawn in a window taller
than it, then cut below its last chart, so nothing is cut off.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH, TALLEST = 1280, 40000  # pixels: the window, taller than any page of this project's plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where the PNG goes (docs/dvc_plots.png is the README's)")
    out = parser.parse_args().out
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if browser is None:
        raise SystemExit("no Chromium on this machine (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", f"{tmp}/page"], cwd=ROOT, check=True,
                       capture_output=True)
        shot = Path(tmp) / "page.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp}/browser", "--proxy-server=http://127.0.0.1:9",
                        "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=20000",
                        f"--window-size={WIDTH},{TALLEST}", "--hide-scrollbars", f"--screenshot={shot}",
                        (Path(tmp) / "page" / "index.html").as_uri()], check=True, capture_output=True, timeout=300)
        out.parent.mkdir(parents=True, exist_ok=True)
        crop_below_content(shot, out)
    print(f"wrote {out}")


def crop_below_content(shot: Path, out: Path, margin: int = 24) -> None:
    """Save `shot` cut just below its last non-white row (the page ends well above the window's bottom)."""
    from PIL import Image, ImageChops

    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, "white")).getbbox()
        if box is None:
            raise SystemExit("the page drew nothing")
        if box[3] >= rgb.height - 1:
            raise SystemExit(f"the page is taller than {TALLEST} pixels; raise TALLEST")
        rgb.crop((0, 0, rgb.width, min(rgb.height, box[3] + margin))).save(out, optimize=True)


if __name__ == "__main__":
    main()
