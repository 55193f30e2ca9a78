"""Run as: pytest runtime_tests --run-dir runs/quickstart

Checks every artifact of a run directory on its own runtime: integrity, I/O contract, parity with
the final PyTorch model, task metric, latency budget. Thresholds come from the run's recipe gates.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def pytest_addoption(parser):
    parser.addoption("--run-dir", action="store", default=None,
                     help="edgeprep run directory (holding artifacts/ and report.json)")


def _run_dir(config) -> Path:
    value = config.getoption("--run-dir")
    if not value:
        raise pytest.UsageError("runtime_tests need --run-dir RUN_DIR (e.g. runs/quickstart)")
    path = Path(value)
    if not (path / "artifacts").is_dir():
        raise pytest.UsageError(f"{path}: no artifacts/ folder; run `edgeprep run RECIPE` first")
    return path


def pytest_generate_tests(metafunc):
    if "artifact_dir" in metafunc.fixturenames:
        run_dir = _run_dir(metafunc.config)
        dirs = sorted(p.parent for p in (run_dir / "artifacts").glob("*/manifest.json"))
        if not dirs:
            raise pytest.UsageError(f"{run_dir}/artifacts holds no artifact with a manifest.json")
        metafunc.parametrize("artifact_dir", dirs, ids=[d.name for d in dirs])


@pytest.fixture(scope="session")
def run_dir(request) -> Path:
    return _run_dir(request.config)


@pytest.fixture(scope="session")
def gates(run_dir) -> dict:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    return recipe.get("gates") or {}


@pytest.fixture(scope="session")
def report(run_dir) -> dict:
    path = run_dir / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}
