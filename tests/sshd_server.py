"""A real OpenSSH server on loopback for the remote-profiling tests (Debian's openssh-server).

Each server gets its own host key, a user key made for the test, its own port and config, and runs
as the current user (root in CI, where .ci/run installs openssh-server). Nothing is mocked: the
client is the system `ssh`, exactly as a user's board would be reached.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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
