"""Shared fixtures. Tests never need the network; real-data tests skip when the NIH sample is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NIH_SAMPLE = Path(os.environ.get("MOCOCXR_NIH_SAMPLE", REPO.parent / "shared" / "data" / "nih-cxr14-sample"))


@pytest.fixture(scope="session")
def nih_sample() -> Path:
    """The 1,000-image NIH ChestX-ray14 sample in ../shared/data; skips the test when it is absent."""
    if not (NIH_SAMPLE / "sample.csv").is_file():
        pytest.skip(f"NIH sample not found at {NIH_SAMPLE}")
    return NIH_SAMPLE


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store for one test (artifacts beside it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MOCOCXR_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    return uri


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path_factory, monkeypatch) -> None:
    """Each test's frozen-feature cache in its own temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("MOCOCXR_FEATURE_CACHE", str(tmp_path_factory.mktemp("features")))
