"""Shared fixtures: one real 2-rank cluster of the default model for every
test that needs it (starting one costs seconds on a 2-core machine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from clusterutil import Cluster


@pytest.fixture(scope="session")
def smollm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The default model (SmolLM2-135M-Instruct) on 2 ranks over loopback."""
    cluster = Cluster(2, tmp_path_factory.mktemp("smollm2"))
    cluster.start()
    try:
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def default_spec():
    from tpnet.model.loader import load_model

    return load_model(None)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path
