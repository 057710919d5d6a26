"""Shared fixtures. Integration fixtures (real Kafka broker, DuckDB file) live here so every
test module uses the same ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave things a person may want to look at (screenshots, reports)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never let a test read the developer's linewatch.toml or write to ~/.linewatch."""
    home = tmp_path_factory.mktemp("lwhome")
    monkeypatch.setenv("LINEWATCH_HOME", str(home))
    monkeypatch.delenv("LINEWATCH_CONFIG", raising=False)
    for key in list(os.environ):
        if key.startswith("LINEWATCH_") and key not in ("LINEWATCH_HOME", "LINEWATCH_CACHE"):
            monkeypatch.delenv(key, raising=False)
