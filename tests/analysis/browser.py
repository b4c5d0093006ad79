"""Render an HTML page in headless Chromium and report what a reader would see go wrong.

The page is copied with a small probe script in front (the reports themselves carry no script): it
records error events (script errors and resources that fail to load, caught in the capture phase),
``console.error`` calls, and after the load event every ``<img>`` that did not decode and how many
pixels the page is wider than the window (``overflow``: > 0 means a horizontal scroll bar on the
page itself; tables should scroll inside their own box instead). Chromium runs
with the flags of a clean, offline, sandbox-less CI container and a fresh profile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-dev-shm-usage", "--virtual-time-budget=10000", "--window-size=1280,1000"]

_PROBE = """<script>
window.__probe={errors:[],console:[]};
addEventListener('error',function(e){__probe.errors.push(e.message||('failed to load '+(e.target&&(e.target.src||e.target.href))));},true);
var _ce=console.error;console.error=function(){__probe.console.push([].slice.call(arguments).join(' '));_ce.apply(console,arguments);};
addEventListener('load',function(){
  var imgs=[].slice.call(document.images);
  __probe.images=imgs.length;
  __probe.broken=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);}).map(function(i){return i.alt||i.src.slice(0,40);});
  var de=document.documentElement;__probe.overflow=Math.max(de.scrollWidth,document.body.scrollWidth)-de.clientWidth;
  var pre=document.createElement('pre');pre.id='__probe';pre.textContent=JSON.stringify(__probe);document.body.appendChild(pre);
});
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def render(page: Path, chromium: str, timeout: float = 90.0) -> dict:
    """``{"images": n, "broken": [...], "errors": [...], "console": [...], "overflow": px}`` of ``page``
    in Chromium (a 1280 x 1000 window)."""
    text = page.read_text()
    probed = re.sub(r"<head>", "<head>" + _PROBE, text, count=1)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / page.name
        copy.write_text(probed)
        profile = Path(tmp) / "profile"
        r = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", copy.as_uri()],
                           capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="__probe">(.*?)</pre>', r.stdout, re.S)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"chromium exit {r.returncode}, no probe result; stderr: {r.stderr[-1500:]}")
    import html

    return json.loads(html.unescape(m.group(1)))


def check_page(page: Path) -> dict:
    """Render ``page`` and assert what a reader needs: at least one image, every image decoded, no
    error events, no console errors, no horizontal overflow of the page body. Skips (with the
    reason) where no Chromium is installed."""
    import pytest

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium with apt-get where it can)")
    got = render(page, chromium)
    assert got["images"] > 0 and got["broken"] == [], got
    assert got["errors"] == [] and got["console"] == [], got
    assert got["overflow"] <= 0, got
    return got
