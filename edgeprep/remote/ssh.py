"""Reaching a device over SSH with the system's OpenSSH client.

Why the system `ssh` and not a Python SSH library (paramiko, asyncssh): the user's board is already
set up for it. Their ~/.ssh/config (host aliases, ProxyJump through a bastion, ports), their agent,
hardware keys and known_hosts all apply unchanged, and nothing more is installed on the host. The
price is that failures come back as exit status 255 plus a message on stderr; `classify` turns the
messages OpenSSH prints into our typed one-line errors.

Host keys are always verified. `StrictHostKeyChecking=yes` refuses a host missing from known_hosts;
`accept_new_host_key` switches to `accept-new`, which records a new host's key but still refuses a
changed one. BatchMode means ssh never prompts: a key that does not work is an error, not a hang.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

from edgeprep.errors import BadInputError, EdgeprepError, RuntimeFailure

DEFAULT_CONNECT_TIMEOUT_S = 10
DEFAULT_TIMEOUT_S = 600


class DeviceAccessError(BadInputError):
    """Authentication or host-key verification failed: fix keys or known_hosts (exit 2)."""


class DeviceUnreachableError(RuntimeFailure):
    """The device could not be reached, timed out, or dropped the connection (exit 3)."""


@dataclass(frozen=True)
class Device:
    """One device to profile on. ``url`` is ssh://[user@]host[:port]; the rest are ssh options."""

    url: str
    name: str = ""
    identity: Optional[Path] = None  # private key file (-i); default: the agent and ~/.ssh
    remote_python: str = "python3"
    known_hosts: Optional[Path] = None  # default: ~/.ssh/known_hosts (the user's own)
    accept_new_host_key: bool = False
    connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S
    timeout_s: int = DEFAULT_TIMEOUT_S  # whole remote run: copy, load, measure
    remote_tmp: Optional[str] = None  # where the work dir goes (default: the device's temp dir)
    ssh_options: tuple[str, ...] = ()  # extra -o KEY=VALUE, e.g. ProxyJump=bastion

    def __post_init__(self) -> None:
        parse_url(self.url)  # raises BadInputError early
        if not shlex.split(self.remote_python):
            raise BadInputError(f"device {self.url}: remote_python is empty; give the device's Python, e.g. python3")
        if self.identity is not None and not Path(self.identity).expanduser().is_file():
            raise BadInputError(f"device {self.url}: identity file {self.identity} does not exist")
        for opt in self.ssh_options:
            if "=" not in opt or opt.split("=", 1)[0].strip().lower() in {"stricthostkeychecking", "batchmode"}:
                raise BadInputError(f"device {self.url}: ssh option {opt!r} must be KEY=VALUE and may not change "
                                    "host-key checking or batch mode (use accept_new_host_key)")

    @property
    def label(self) -> str:
        return self.name or self.destination

    @property
    def destination(self) -> str:
        user, host, port = parse_url(self.url)
        return f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"


def parse_url(url: str) -> tuple[Optional[str], str, Optional[int]]:
    """ssh://[user@]host[:port] -> (user, host, port); anything else is a one-line BadInputError."""
    fix = "write it as ssh://user@host[:port], e.g. ssh://pi@raspberrypi.local:22"
    parts = urlsplit(str(url))
    if parts.scheme != "ssh" or not parts.hostname:
        raise BadInputError(f"device {url!r}: not an ssh:// URL; {fix}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password:
        raise BadInputError(f"device {url!r}: only user, host and port are allowed; {fix}")
    try:
        port = parts.port
    except ValueError:
        raise BadInputError(f"device {url!r}: the port is not a number in 1-65535; {fix}") from None
    host = parts.hostname
    if host.startswith("-") or not re.fullmatch(r"[A-Za-z0-9._:%-]+", host):
        raise BadInputError(f"device {url!r}: {host!r} is not a host name or address; {fix}")
    user = unquote(parts.username) if parts.username else None
    if user is not None and (user.startswith("-") or not re.fullmatch(r"[A-Za-z0-9._-]+", user)):
        raise BadInputError(f"device {url!r}: {user!r} is not a user name; {fix}")
    return user, host, port


def ssh_argv(device: Device, remote_command: str) -> list[str]:
    """The `ssh` command line that runs ``remote_command`` (a shell string) on the device."""
    user, host, port = parse_url(device.url)
    argv = ["ssh", "-T", "-o", "BatchMode=yes",
            "-o", f"StrictHostKeyChecking={'accept-new' if device.accept_new_host_key else 'yes'}",
            "-o", f"ConnectTimeout={int(device.connect_timeout_s)}",
            # a device that dies mid-run is noticed within ~15 s instead of a TCP timeout
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR"]
    if port:
        argv += ["-p", str(port)]
    if user:
        argv += ["-l", user]
    if device.identity is not None:
        argv += ["-i", str(Path(device.identity).expanduser()), "-o", "IdentitiesOnly=yes"]
    if device.known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={Path(device.known_hosts).expanduser()}"]
    for opt in device.ssh_options:
        argv += ["-o", opt]
    return argv + ["--", host, remote_command]


# OpenSSH's own wording (ssh.c, sshconnect.c, sshconnect2.c), first match wins.
_ACCESS = (
    (re.compile(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|No \S+ host key is known"),
     "host key not verified ({detail}); check the device's fingerprint and add it to known_hosts "
     "(ssh-keyscan, or connect once with ssh), or pass --accept-new-host-key to record a new host's key"),
    (re.compile(r"Permission denied|Too many authentication failures|no mutual signature"),
     "authentication failed ({detail}); check the user name and --identity key, and that its public key is in "
     "the device's ~/.ssh/authorized_keys"),
)
_UNREACHABLE = (
    (re.compile(r"Could not resolve hostname|Name or service not known|nodename nor servname"),
     "host name not found ({detail}); check the address in the device URL"),
    (re.compile(r"Connection refused"),
     "connection refused ({detail}); is sshd running on the device, and is the port right?"),
    (re.compile(r"Connection timed out|Operation timed out|No route to host|Network is unreachable|"
                r"Timeout, server .* not responding|banner exchange"),
     "device unreachable ({detail}); check it is on, on the network, and the address and port"),
    (re.compile(r"closed by remote host|Connection reset|Broken pipe|Connection closed|client_loop"),
     "connection lost ({detail}); the device or its sshd went away"),
)


def classify(device: Device, stderr: str, phase: str) -> EdgeprepError:
    """A typed one-line error for a failed ssh invocation, from OpenSSH's stderr. The last matching
    line wins: ssh's own message comes last, after anything the remote command printed."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    for line in reversed(lines):
        for pattern, text in _ACCESS:
            if pattern.search(line):
                return DeviceAccessError(f"device {device.label}: {text.format(detail=line)}")
        for pattern, text in _UNREACHABLE:
            if pattern.search(line):
                return DeviceUnreachableError(f"device {device.label}: {phase}: {text.format(detail=line)}")
    if not lines:  # OpenSSH exits 255 silently when the remote command dies of a signal
        return DeviceUnreachableError(f"device {device.label}: {phase}: the connection ended without a message: "
                                      "the runner was killed on the device (a signal, e.g. the out-of-memory "
                                      "killer) or the link dropped")
    return DeviceUnreachableError(f"device {device.label}: {phase}: ssh failed: {lines[-1]}")
