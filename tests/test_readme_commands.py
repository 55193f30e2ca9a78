"""Every shell command the README shows runs as shown after `make demo`.

The README's fenced blocks are parsed (``$ `` prompt lines, and every line of ``bash`` blocks); a
command that starts with edgeprep / make / pytest / torchrun is either run here, in a directory laid
out like a fresh clone after `make demo`, or listed in SKIPPED with the reason it cannot run in a
test. A new README command that is neither fails the test, so the README cannot drift again.

`make demo` itself is replicated, not invoked: it is `edgeprep devices setup` plus
`edgeprep run recipes/quickstart.yaml --force`; the test runs that recipe with its emulated-device
list dropped (tests/test_emulate.py covers those; each family costs ~20 s) and checks with
`make -n` that the target still runs exactly that command.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

COMMAND_START = re.compile(r"(\.venv/bin/)?(edgeprep|make|pytest|torchrun)\b")

# (pattern, why it is not run here). Everything else the README shows runs.
SKIPPED = [
    (r"^make (demo|test)\b", "replicated below (make demo) / this suite itself (make test)"),
    (r"torchrun ", "two training processes; tests/test_ddp_pipeline.py runs the same recipe path under torchrun"),
    (r"ssh://", "needs a real SSH device; tests/test_remote.py profiles on a loopback sshd"),
    (r"runs/(my-model|ci|q)\b|recipes/my-model\.yaml", "a placeholder for the user's own run"),
]


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, the output lines the README shows under it) for every shell command in a fence."""
    found: list[tuple[str, list[str]]] = []
    for lang, body in re.findall(r"^```([a-z]*)\n(.*?)^```", text, flags=re.S | re.M):
        lines = body.splitlines()
        prompted = any(line.startswith("$ ") for line in lines)
        if not prompted and lang not in ("bash", "sh", "shell"):
            continue  # output listings, YAML, Python
        pending, shown = "", None  # shown: the output list of the last kept prompted command
        for line in lines:
            if prompted and not line.startswith("$ ") and not pending:
                if shown is not None:
                    shown.append(line)
                continue
            pending += line[2:] if line.startswith("$ ") else line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            command, pending, shown = " ".join(pending.split("#")[0].split()), "", None
            if COMMAND_START.match(command):
                shown = []
                found.append((command, shown))
    return found


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED if re.search(pattern, command)), None)


def test_extraction_sees_every_block_kind():
    sample = ("```bash\nmake demo   # comment\nedgeprep profile a \\\n    --iters 3\n```\n"
              "```\n$ .venv/bin/edgeprep validate x\nonnx (onnxruntime): ok\n$ cat f\nnot shown\n```\n"
              "```yaml\nedgeprep: not a command\n```\n")
    assert readme_commands(sample) == [("make demo", []), ("edgeprep profile a --iters 3", []),
                                       (".venv/bin/edgeprep validate x", ["onnx (onnxruntime): ok"])]


def test_every_readme_command_is_run_or_has_a_reason():
    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) >= 15  # the tour, CI, devices and emulation sections
    unclassified = [c for c, _ in commands if skip_reason(c) is None and not _runnable(c)]
    assert not unclassified, f"README commands neither run by this test nor skipped with a reason: {unclassified}"


def _runnable(command: str) -> bool:
    return bool(re.match(r"(\.venv/bin/)?(edgeprep|pytest)\b", command))


@pytest.fixture(scope="module")
def demo_clone(tmp_path_factory) -> Path:
    """A directory laid out like a clone after `make demo`: .venv, recipes/, runtime_tests/, runs/quickstart/."""
    root = tmp_path_factory.mktemp("clone")
    for name in (".venv", "runtime_tests", "Makefile", "pyproject.toml", "constraints.txt"):
        (root / name).symlink_to(REPO / name)
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["validate"].pop("devices", None)
    (root / "recipes").mkdir()
    (root / "recipes" / "quickstart.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = _shell(".venv/bin/edgeprep run recipes/quickstart.yaml --force", root)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return root


def _shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="200")
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)


def test_make_demo_runs_the_quickstart_recipe():
    proc = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ".venv/bin/edgeprep run recipes/quickstart.yaml --force" in proc.stdout.splitlines()


def test_readme_commands_run_as_shown(demo_clone):
    ran = []
    for command, shown in readme_commands((REPO / "README.md").read_text()):
        if skip_reason(command) is not None:
            continue
        proc = _shell(command, demo_clone)
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"
        if shown:  # the first line the README shows under it starts the same way here (numbers differ)
            lead = " ".join(shown[0].split()[:3])
            assert lead in proc.stdout + proc.stderr, f"`{command}`: README shows {shown[0]!r}; got {proc.stdout[:500]!r}"
        ran.append(command)
    assert any("--save-baseline" in c for c in ran) and any(c.endswith("--junit results.xml") for c in ran)
    assert (demo_clone / "baselines" / "quickstart.json").is_file() and (demo_clone / "results.xml").is_file()
