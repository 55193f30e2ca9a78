"""Shared fixtures: running the CLI in a subprocess, and one real quickstart-style run per session."""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_bert_classifier(vocab_size: int = 50):
    """A 2-layer BertForSequenceClassification (hidden 32, 4 heads, 3 labels), seed 0, eval mode,
    eager attention and no dropout: deterministic, for the QAT tests on BERT-style layers."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                  attn_implementation="eager", hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


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


# ----------------------------------------------------------------------------- a real sshd
# A real OpenSSH server on loopback for the remote-profiling tests (Debian's openssh-server). Each
# server gets its own host key, a user key made for the test, its own port and config, and runs as
# the current user (root in CI, where .ci/run installs openssh-server). Nothing is mocked: the
# client is the system `ssh`, exactly as a user's board would be reached.
SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def sshd_binary() -> str | None:
    found = shutil.which("sshd")
    return found or next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)), None)


def require_sshd() -> str:
    """The sshd binary; a skip with the fix where it is absent, a failure where CI promised it."""
    path = sshd_binary()
    if path is None:
        why = "OpenSSH server not installed (Debian: apt-get install openssh-server; .ci/run does this)"
        if os.environ.get("EDGEPREP_REQUIRE_SSHD") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SshServer:
    root: Path
    port: int
    user: str
    user_key: Path
    host_pub: str  # "ssh-ed25519 AAAA..."
    known_hosts: Path  # holds this server's host key
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def kill_all(self) -> None:
        """SIGKILL the listener and every sshd process under it (per-connection children rename
        themselves "sshd: user@notty"), leaving the commands they ran alone: what a device's sshd
        dying looks like to the client, and to the runner, whose connection is gone."""
        doomed = [pid for pid in _descendants(self.proc.pid) if _comm(pid) == "sshd"] + [self.proc.pid]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgeprep-test", "-f", str(path)],
                   check=True)


def start_sshd(root: Path) -> SshServer:
    sshd = require_sshd()
    root.mkdir(parents=True, exist_ok=True)
    _keygen(root / "host_key")
    _keygen(root / "user_key")
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    os.chmod(root / "authorized_keys", 0o600)
    port = _free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nMaxStartups 50\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir sshd checks for
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config"), "-E", str(root / "sshd.log")],
                            start_new_session=True)
    deadline = time.monotonic() + 15
    while True:  # ready when it answers with its banner
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (root / "sshd.log").read_text() if (root / "sshd.log").exists() else ""
            proc.kill()
            raise RuntimeError(f"sshd did not start: {log[-2000:]}")
        time.sleep(0.1)
    host_pub = " ".join((root / "host_key.pub").read_text().split()[:2])
    known = root / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    return SshServer(root=root, port=port, user=getpass.getuser(), user_key=root / "user_key",
                     host_pub=host_pub, known_hosts=known, proc=proc)


def stop_sshd(server: SshServer) -> None:
    server.kill_all()
