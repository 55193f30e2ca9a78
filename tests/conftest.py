"""Shared fixtures: running the CLI in a subprocess, and one real quickstart-style run per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """`python -m edgeprep ARGS` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeprep", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def stderr_lines(proc) -> list[str]:
    """Non-empty stderr lines of a CLI call (a bad input must produce exactly one)."""
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def error_lines(proc) -> list[str]:
    """The stderr lines that report an error (progress lines start with "›")."""
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


def run_recipe_text(tmp_path: Path, text: str, *args: str):
    """Write ``text`` as tmp_path/r.yaml and `edgeprep run` it into tmp_path/run."""
    (tmp_path / "r.yaml").write_text(text)
    return run_cli("run", "r.yaml", "--out", "run", *args, cwd=tmp_path)


def finished_run(tmp_path_factory, name: str, text: str) -> Path:
    """A fresh work dir where `edgeprep run --quiet` ran ``text`` successfully (into <dir>/run)."""
    work = tmp_path_factory.mktemp(name)
    proc = run_recipe_text(work, text, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


# The e2e stage tests' recipe: vit-tiny-digits fine-tuned 250 steps, then their stages, exported to
# ONNX and validated on the test split.
TINY_VIT_HEAD = """\
seed: 0
model: {source: vit-tiny-digits}
data: {source: digits, calibration_samples: 64}
train: {steps: 250, batch_size: 64, lr: 0.003, warmup_steps: 20}
stages:
  - kind: finetune
"""
ONNX_TEST_TAIL = """\
export:
  - target: onnx
validate:
  split: test
  profile: {warmup: 5, iters: 30}
"""


def tiny_vit_recipe(name: str, stages: str, extra: str = "") -> str:
    """A recipe: the shared head, ``stages`` (YAML list items after the finetune stage), the ONNX
    export and validation, then ``extra`` (e.g. gates)."""
    return f"name: {name}\n{TINY_VIT_HEAD}{stages}{ONNX_TEST_TAIL}{extra}"


# A quickstart with a smaller budget: the same stages, export, peers and gates, in seconds.
FAST_RECIPE = """\
name: fast
seed: 0
model: {source: vit-tiny-digits}
data: {source: digits, calibration_samples: 64}
train: {steps: 300, batch_size: 64, lr: 0.003, warmup_steps: 20}
stages:
  - kind: finetune
export:
  - target: onnx
    ptq: [dynamic, static]
validate:
  split: test
  profile: {warmup: 5, iters: 30, threads: 1, batch: 1}
gates:
  max_metric_drop: 0.01
  min_sqnr_db: 40
  max_size_bytes: 2000000
"""


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory) -> Path:
    """A complete run directory produced once per test session by `edgeprep run`."""
    work = tmp_path_factory.mktemp("fast-run")
    (work / "fast.yaml").write_text(FAST_RECIPE)
    proc = run_cli("run", str(work / "fast.yaml"), "--out", str(work / "run"), "--quiet", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run"


@pytest.fixture(scope="session")
def digits_mlp():
    """A small MLP trained on scikit-learn's digits (64 features, 10 classes), so int8 agreement is
    judged on real decision margins: (model, x_train, x_test, y_test). Shared: do not modify it."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    x_train, y_train, x_test, y_test = x[:1400], d.target[:1400], x[1400:], d.target[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xb, yb = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert float((model(torch.from_numpy(x_test)).argmax(-1).numpy() == y_test).mean()) > 0.9
    return model, x_train, x_test, y_test
