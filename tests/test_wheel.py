"""A plain (non-editable) wheel carries the exporters and recipes inside the edgeprep namespace."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_contents_and_install(tmp_path):
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(dist.glob("edgeprep-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    top_level = {n.split("/")[0] for n in names}
    # Only our own name: "exporters" (and "recipes") are owned by other PyPI projects.
    assert top_level == {"edgeprep", f"{wheels[0].name.split('-')[0]}-{wheels[0].name.split('-')[1]}.dist-info"}
    for required in ("edgeprep/exporters/__init__.py", "edgeprep/exporters/onnx.py",
                     "edgeprep/exporters/onnxruntime_rt.py", "edgeprep/recipes/quickstart.yaml",
                     "edgeprep/exporters/data/tensorrt_onnx_ops.json",
                     "edgeprep/cli/__init__.py", "edgeprep/stages/finetune.py", "edgeprep/pruning/surgery.py"):
        assert required in names, required
    # every package of the source tree ships (a package left out of pyproject's list imports only
    # from an editable install)
    for init in sorted((REPO / "edgeprep").rglob("__init__.py")):
        rel = init.relative_to(REPO).as_posix()
        if "__pycache__" not in rel:
            assert rel in names, f"{rel} is not in the wheel: add its package to pyproject.toml"

    # Install it (no deps: they come from this venv) and use it from outside the repo.
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                           str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import edgeprep, edgeprep.exporters as ex; from edgeprep.recipes_index import bundled_recipes; "
            "print(edgeprep.__file__); print(ex.__file__); from edgeprep.registry import target_specs; print(sorted(target_specs())); "
            "print([r['name'] for r in bundled_recipes()])")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pkg_file, ex_file, exporters, recipes = proc.stdout.splitlines()
    assert pkg_file.startswith(str(target)) and ex_file.startswith(str(target))
    assert "onnx" in exporters
    assert "quickstart" in recipes
