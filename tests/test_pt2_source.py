"""A torch.export .pt2 file as the model source: trained, evaluated, exported, judged on ORT."""
from __future__ import annotations

import json

import torch
from conftest import run_recipe_text, stderr_lines

from edgeprep.models import ZOO

RECIPE = ("name: pt2\nmodel: {source: vit.pt2}\ndata: {source: digits}\ntrain: {steps: 20}\n"
          "stages: [{kind: finetune}]\nexport: [{target: onnx}]\nvalidate: {profile: {warmup: 1, iters: 5}}\n"
          "gates: {min_sqnr_db: 40}\n")


def _save(path, dynamic: bool):
    model = ZOO["vit-tiny-digits"].factory().eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (torch.randn(2, 1, 8, 8),), dynamic_shapes=shapes), str(path))


def test_pt2_with_dynamic_batch_runs_end_to_end(tmp_path):
    _save(tmp_path / "vit.pt2", dynamic=True)
    proc = run_recipe_text(tmp_path, RECIPE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    onnx = report["artifacts"][0]
    assert onnx["parity"]["sqnr_db"] >= 40  # measured ~136 dB
    assert report["stages"][0]["details"]["steps"] == 20


def test_pt2_with_fixed_batch_is_refused_with_the_fix(tmp_path):
    _save(tmp_path / "vit.pt2", dynamic=False)
    proc = run_recipe_text(tmp_path, RECIPE)
    lines = stderr_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "fixed batch of 2" in lines[0] and "Dim('batch')" in lines[0]
