"""Build .dvc/plots/offline.html: the page template of `dvc plots show` / `dvc plots diff`, with vega,
vega-lite and vega-embed inlined, so that every chart draws without internet.

DVC's own page loads the three libraries from a CDN, so offline it shows no chart at all.
This fetches the versions DVC's renderer pins (dvc-render's vega.py) from the npm registry,
checks each tarball against the registry's sha512 integrity, and writes their minified
builds into the template with their BSD-3-Clause licence notices. `.dvc/config` names the
template (`plots.html_template`), so the plain commands use it.

    python tools/offline_plots.py            # rewrite .dvc/plots/offline.html (needs the npm registry)

To update: change VERSIONS (keep them those dvc-render's specs are written for) and rerun.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import urllib.request
from pathlib import Path

VERSIONS = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}  # as dvc-render's vega.py
REGISTRY = "https://registry.npmjs.org"
OUT = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {inlined}: the npm builds, inlined so that the charts draw offline
         (written by tools/offline_plots.py; their licences are at the end of this file) -->
{scripts}
    <style>
        table {{ border-spacing: 15px; }}
        img {{ max-width: 100%; height: auto; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
<!--
{licences}
-->
"""


def fetch(name: str, version: str) -> tuple[str, str]:
    """(the minified build, the licence text) of an npm package, its tarball checked against the registry."""
    with urllib.request.urlopen(f"{REGISTRY}/{name}/{version}", timeout=60) as response:
        dist = json.load(response)["dist"]
    with urllib.request.urlopen(dist["tarball"], timeout=120) as response:
        tarball = response.read()
    algorithm, _, expected = dist["integrity"].partition("-")
    if base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode() != expected:
        raise SystemExit(f"{name}@{version}: the tarball does not match the registry's {algorithm} integrity")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        build = tar.extractfile(f"package/build/{name}.min.js").read().decode()
        licence = tar.extractfile("package/LICENSE").read().decode()
    build = re.sub(r"\n?//# sourceMappingURL=\S+\s*$", "", build)  # the map is not shipped
    if "</script" in build.lower() or "<!--" in build:
        raise SystemExit(f"{name}@{version}: the build contains text that would end an inline <script>")
    return build, licence


def main() -> None:
    scripts, licences = [], []
    for name, version in VERSIONS.items():
        build, licence = fetch(name, version)
        scripts.append(f"    <script>/* {name} {version} */\n{build}\n    </script>")
        licences.append(f"{name} {version}\n\n{licence.strip()}")
    inlined = ", ".join(f"{name} {version}" for name, version in VERSIONS.items())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(PAGE.format(inlined=inlined, scripts="\n".join(scripts), licences="\n\n\n".join(licences)))
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB): {inlined}")


if __name__ == "__main__":
    main()
