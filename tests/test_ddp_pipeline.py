"""The same recipe under `torchrun --nproc-per-node 2` (gloo on CPU): ranks agree, rank 0 reports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

RECIPE = """\
name: ddp
model: {source: vit-tiny-digits}
data: {source: digits}
train: {steps: 30, batch_size: 64, lr: 0.003, warmup_steps: 5}
stages:
  - kind: finetune
export:
  - target: onnx
validate:
  profile: {warmup: 2, iters: 10}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_recipe_under_torchrun_matches_single_process(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                "-m", "edgeprep", "run", "r.yaml", "--out", "ddp"], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 ranks agree on the final weights" in ddp.stderr
    single = _run([sys.executable, "-m", "edgeprep", "run", "r.yaml", "--out", "single"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    # Each rank trains on its half of the same global batches: the 2-process model computes the
    # same function as the 1-process one up to float reduction order.
    a = json.loads((tmp_path / "ddp" / "report.json").read_text())["artifacts"][0]
    b = json.loads((tmp_path / "single" / "report.json").read_text())["artifacts"][0]
    assert abs(a["metric"]["value"] - b["metric"]["value"]) <= 1 / 270 + 1e-9  # at most one near-tie flips
    import numpy as np

    from edgeprep.manifest import load_reference

    ra, rb = load_reference(tmp_path / "ddp" / "artifacts" / "onnx"), load_reference(tmp_path / "single" / "artifacts" / "onnx")
    assert np.abs(ra.outputs[0] - rb.outputs[0]).max() < 1e-3  # measured ~1e-6
