"""A screenshot of `dvc plots show` as headless Chromium draws it offline, for the README.

    python tools/plots_screenshot.py [OUT.png]    # default docs/dvc_plots.png; needs Chromium

Every network request of the page fails on purpose (a proxy that does not exist), so the
picture shows what a machine without internet shows.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "dvc_plots.png"
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if browser is None:
        raise SystemExit("no Chromium on this machine (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", f"{tmp}/page"], cwd=ROOT, check=True,
                       capture_output=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp}/browser", "--proxy-server=http://127.0.0.1:9",
                        "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=20000", "--window-size=1280,2200",
                        "--hide-scrollbars", f"--screenshot={out}", (Path(tmp) / "page" / "index.html").as_uri()],
                       check=True, capture_output=True, timeout=180)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
