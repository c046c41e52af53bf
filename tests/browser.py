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
