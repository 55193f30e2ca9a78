"""SIGKILL a run mid-way, then `edgeprep run --resume` continues after the last completed stage."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import run_cli

from edgeprep.fsutil import sha256_file

RECIPE = """\
name: resumable
model: {source: vit-tiny-digits}
data: {source: digits}
train: {steps: 40, batch_size: 32, lr: 0.003, warmup_steps: 5}
stages:
  - kind: finetune
  - kind: finetune
    train: {steps: STAGE1_STEPS}
  - kind: finetune
    train: {steps: 10}
export:
  - target: onnx
validate:
  profile: {warmup: 2, iters: 10}
"""
STAGE1_STEPS = 600  # long enough to be killed inside, short enough to rerun in seconds
RECIPE = RECIPE.replace("STAGE1_STEPS", str(STAGE1_STEPS))


def test_sigkill_then_resume(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgeprep", "run", str(recipe), "--out", str(run_dir), "--quiet"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    marker0 = run_dir / "stages" / "0-finetune" / "done.json"
    deadline = time.monotonic() + 240
    while not marker0.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "stage 0 never completed"
        time.sleep(0.1)
    time.sleep(1.0)  # inside stage 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "stages" / "1-finetune" / "done.json").exists()
    assert not (run_dir / "report.json").exists()
    ckpt0 = run_dir / "stages" / "0-finetune" / "checkpoint" / "model.safetensors"
    sha0 = sha256_file(ckpt0)

    # Without --resume the run directory is protected.
    again = run_cli("run", str(recipe), "--out", str(run_dir), cwd=tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr

    # A changed recipe cannot resume this run ...
    changed = tmp_path / "changed.yaml"
    changed.write_text(RECIPE.replace("steps: 10}", "steps: 11}"))
    again = run_cli("run", str(changed), "--out", str(run_dir), "--resume", cwd=tmp_path)
    assert again.returncode == 2 and "recipe changed" in again.stderr

    # ... the same recipe does; stage 0 is loaded from its checkpoint, not retrained.
    resumed = run_cli("run", str(recipe), "--out", str(run_dir), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 0 (finetune): done in an earlier run" in resumed.stderr
    assert "stage 1 (finetune): running" in resumed.stderr
    assert sha256_file(ckpt0) == sha0
    for i in range(3):
        assert (run_dir / "stages" / f"{i}-finetune" / "done.json").exists()
    assert (run_dir / "report.json").exists()
    # No temporary leftovers look like results.
    assert not [p for p in run_dir.rglob(".*.tmp")], "atomic_dir left a temporary directory behind"
