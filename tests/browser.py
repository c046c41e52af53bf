"""Headless Chromium for the tests that look at what a user sees: the MLflow UI served by `mlflow ui` on
127.0.0.1, and report.html rendered at a given width. `.ci/run` installs Debian's chromium."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags that keep Chromium off the network on a machine without one (each start otherwise tries
# Google's hosts), and a fresh profile per call
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium(url: str, *, screenshot: Path | None = None, width: int = 1600, height: int = 1200) -> str:
    """The DOM of ``url`` after its scripts ran (``--dump-dom``); with ``screenshot``, also a PNG of it."""
    with tempfile.TemporaryDirectory() as profile:
        base = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        base.append("--virtual-time-budget=20000")
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
        done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(backend: str, artifacts: str | None = None) -> Iterator[str]:
    """``mlflow ui`` on 127.0.0.1 for ``backend``; yields its base URL and stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow ui did not start on {url}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# Injected into a copy of report.html: what a reader's browser laid out, written into the page for
# --dump-dom to return (each table's width against the page's, and whether its box scrolls; each
# image's decoded size)
MEASURE = """<script>
window.addEventListener("load", () => {
  const tables = [...document.querySelectorAll("table")].map((t) => {
    const box = t.closest(".scroll") || t.parentElement;
    return {width: Math.ceil(t.getBoundingClientRect().width), scrolls: box.scrollWidth > box.clientWidth,
            rows: t.tBodies[0] ? t.tBodies[0].rows.length : 0};
  });
  const images = [...document.querySelectorAll("img")].map((i) => (
    {alt: i.alt, width: i.naturalWidth, height: i.naturalHeight}));
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify({main: document.querySelector("main").clientWidth, tables, images});
  document.body.appendChild(out);
});
</script>"""


def measure_page(page: Path, width: int) -> dict:
    """Lay ``page`` out in Chromium ``width`` px wide; return its tables' and images' measures."""
    import html
    import json
    import re

    probe = page.with_name(f"measured-{page.name}")
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    dom = chromium(probe.as_uri(), width=width, height=900)
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, f"no measures from {probe}"
    return json.loads(html.unescape(found.group(1)))


def look_at_the_paper(uri: str, experiment: str, shots: Path) -> dict:
    """What a user of `mococxr paper` sees in the MLflow UI (screenshots under ``shots``): from a MoCo
    fine-tune run's page a link reaches its checkpoint's page, which lists the run back; the paper-chexpert
    report run shows report.html in MLflow's HTML viewer; that page, laid out at the artifact pane's width,
    shows Figure 3 as an image and Table 1 whole. Returns the measures for the caller's own checks."""
    import re
    import urllib.parse

    from mlflow.tracking import MlflowClient

    from mococxr.report.record import report_dir

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp], max_results=1000)
    moco = next(
        r
        for r in runs
        if r.data.tags.get("mococxr.kind") == "finetune" and r.data.tags["mococxr.init"] == "moco"
    )
    report = next(r for r in runs if r.info.run_name == "paper-chexpert")
    folder = report_dir(report.info.run_id)
    rid = moco.info.run_id
    with mlflow_ui(uri) as url:
        dom = chromium(f"{url}/#/experiments/{exp}/runs/{rid}", screenshot=shots / "finetune_run.png")
        links = [html_unescape(h) for h in re.findall(r'href="([^"]*#/experiments/\d+/models/m-[^"]+)"', dom)]
        assert links, f"no link to a checkpoint on the page of run {rid}"
        target = urllib.parse.urljoin(f"{url}/", links[0])
        checkpoint = chromium(target, screenshot=shots / "checkpoint.png")
        assert "m-" in target and rid in checkpoint, f"{target} does not list run {rid}"
        viewer = chromium(
            f"{url}/#/experiments/{exp}/runs/{report.info.run_id}/artifacts/{folder}/report.html",
            screenshot=shots / "report_in_mlflow.png",
        )
        assert "<iframe" in viewer, "MLflow did not show report.html in its HTML viewer"
    local = Path(client.download_artifacts(report.info.run_id, f"{folder}/report.html", str(shots)))
    measured = measure_page(local, width=1020)  # the artifact pane of a 1600 px window
    figure3 = [i for i in measured["images"] if i["alt"].startswith("Figure 3")]
    assert figure3 and figure3[0]["width"] > 0, measured["images"]
    assert measured["tables"] and not any(t["scrolls"] for t in measured["tables"]), measured
    assert all(t["width"] <= measured["main"] for t in measured["tables"]), measured
    return measured


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)
