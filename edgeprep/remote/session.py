"""Host side of on-device profiling: one SSH session per artifact and device.

The session sends runner.py, then the artifact, the reference inputs and a job; it reads back the
device's description, latency samples, memory and outputs (see runner.py for the protocol). One
connection does everything, so the device's work dir lives exactly as long as the connection: the
runner deletes it when it finishes, fails, or sees the connection drop. If the host gives up first
(timeout), it kills ssh, which ends the connection and with it the runner.
"""
from __future__ import annotations

import base64
import io
import json
import queue
import shlex
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from edgeprep.errors import BadInputError, MissingDependencyError, RuntimeFailure
from edgeprep.remote.ssh import Device, DeviceUnreachableError, classify, ssh_argv
from edgeprep.types import Artifact

RUNNER = Path(__file__).with_name("runner.py")
# What the device's Python runs first: read the runner's source from stdin and execute it. The
# runner then keeps reading stdin for its job, so nothing is written to the device but its work dir.
BOOTSTRAP = ("import sys;n=int(sys.argv[1]);src=sys.stdin.buffer.read(n);"
             "exec(compile(src,'edgeprep-device-runner','exec'),{'__name__':'__edgeprep_device__'})")
# What to install on the device when its Python lacks the runtime (runner.runtime_version).
INSTALL_HINT = {"onnxruntime": "python3 -m pip install onnxruntime numpy",
                "litert": "python3 -m pip install ai-edge-litert numpy (or tflite-runtime)",
                "executorch": "python3 -m pip install executorch numpy"}
FREE_SPACE_MARGIN_BYTES = 1 << 20  # file system blocks and metadata on top of the payload


class DeviceDependencyError(MissingDependencyError):
    """The device's Python lacks the runtime (or numpy) (exit 4)."""

    def __init__(self, message: str):  # MissingDependencyError's message names a host extra; this is the device
        Exception.__init__(self, message)


class DeviceDiskFullError(RuntimeFailure):
    """The device's temp dir has no room for the artifact (exit 3)."""


@dataclass(frozen=True)
class RemoteResult:
    description: dict[str, Any]
    runtime_version: str
    runtime_package: str
    samples_ns: list[int]
    batch: int
    outputs: list[np.ndarray]
    load_ms: float
    peak_rss_bytes: Optional[int]
    rss_before_load_bytes: Optional[int]
    workdir: str
    cleaned: bool


def payload_files(artifact: Artifact) -> list[tuple[str, Path]]:
    """(name on the device, local path) of the model: a file, or every file of a package dir."""
    path = Path(artifact.path)
    if path.is_dir():
        return [(str(p.relative_to(path.parent)), p) for p in sorted(path.rglob("*")) if p.is_file()]
    return [(path.name, path)]


def runtime_info(artifact: Artifact) -> dict[str, Any]:
    """The facts the runner needs to run the artifact exactly as the host's runtime does."""
    info: dict[str, Any] = {}
    if artifact.runtime == "onnxruntime":
        from edgeprep.exporters.onnxruntime_rt import DEFAULT_OPTIMIZE
        from edgeprep.quant.nbits import DEFAULT_ACCURACY_LEVEL, session_config_for_nbits

        info["optimize"] = str(artifact.info.get("optimize") or DEFAULT_OPTIMIZE)
        info["session_config"] = session_config_for_nbits(DEFAULT_ACCURACY_LEVEL)
    if artifact.runtime == "executorch":
        info["input_dtypes"] = [s.dtype for s in artifact.inputs]
        first = artifact.inputs[0].shape[0] if artifact.inputs else None
        info["static_batch"] = first if isinstance(first, int) else None
    return info


def _npz_bytes(inputs: Sequence[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{f"input_{i}": np.ascontiguousarray(x) for i, x in enumerate(inputs)})
    return buf.getvalue()


def _frame(payload: bytes) -> bytes:
    return struct.pack(">Q", len(payload)) + payload


class _Session:
    """One ssh process speaking the runner's protocol; lines from its stdout arrive on a queue."""

    def __init__(self, device: Device, runtime: str, log: Callable[[str], None]):
        self.device, self.log = device, log
        self.started = time.monotonic()
        source = RUNNER.read_bytes()
        # remote_python is the user's shell fragment (unquoted: "~/venv/bin/python" must expand there);
        # everything edgeprep adds is quoted
        command = device.remote_python + " " + shlex.join(["-u", "-c", BOOTSTRAP, str(len(source)), runtime,
                                                           device.remote_tmp or ""])
        try:
            self.proc = subprocess.Popen(ssh_argv(device, command), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise DeviceDependencyError("the OpenSSH client `ssh` is not installed on this machine; install it "
                                        "(Debian/Ubuntu: apt-get install openssh-client)") from None
        self.events: "queue.Queue[Optional[dict[str, Any]]]" = queue.Queue()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._stderr_reader.start()
        self.send(source)

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:  # a login banner or a stray print on the device: not ours
                continue
            if isinstance(event, dict) and "event" in event:
                self.events.put(event)
        self.events.put(None)  # stdout closed: ssh ended

    def send(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # ssh is gone; the next wait() reports why from its stderr

    def wait(self, deadline: float, phase: str) -> dict[str, Any]:
        """The next event, or a typed error when ssh ends or the deadline passes."""
        try:
            event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.kill()
            raise DeviceUnreachableError(f"device {self.device.label}: {phase}: timed out after "
                                         f"{time.monotonic() - self.started:.0f} s; raise the device's "
                                         "timeout (timeout_s) or lower iters") from None
        if event is None:
            self.proc.wait(timeout=30)
            self._stderr_reader.join(timeout=10)  # all of ssh's message, not a prefix of it
            stderr = b"".join(self.stderr).decode(errors="replace")
            if self.proc.returncode == 255 or not stderr.strip():
                raise classify(self.device, stderr or "Connection closed", phase)
            last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
            raise RuntimeFailure(f"device {self.device.label}: {self.device.remote_python} failed while {phase} "
                                 f"(exit {self.proc.returncode}): {last.strip()}; check that --remote-python names "
                               "the device's Python 3.8 or newer")
        self.log(f"device {self.device.label}: {event['event']}")
        return event

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_on_device(artifact: Artifact, device: Device, inputs: Sequence[np.ndarray], *, warmup: int, iters: int,
                  threads: int, batch: int, parity: bool = True,
                  log: Callable[[str], None] = lambda m: None) -> RemoteResult:
    """Copy ``artifact`` to ``device``, run ``inputs`` through it (outputs come back when ``parity``),
    time ``iters`` calls at ``batch`` rows, and remove everything from the device again."""
    if artifact.runtime not in INSTALL_HINT:
        raise BadInputError(f"{artifact.name}: profiling over SSH supports {', '.join(sorted(INSTALL_HINT))} "
                            f"artifacts, not {artifact.runtime}; profile it on its host machine instead")
    files = payload_files(artifact)
    npz = _npz_bytes(inputs)
    total = sum(p.stat().st_size for _, p in files) + len(npz)
    start = time.monotonic()
    connect_deadline = start + device.connect_timeout_s + 60  # handshake, then Python and runtime import
    deadline = start + device.timeout_s
    session = _Session(device, artifact.runtime, log)
    try:
        hello = session.wait(min(connect_deadline, deadline), "connecting")
        if hello["event"] == "error":
            session.wait(deadline, "connecting")
            raise RuntimeFailure(f"device {device.label}: {hello['message']}; pass --remote-tmp with a writable dir")
        rt = hello["runtime"]
        where = f"{device.remote_python} on {device.label}"
        if not rt["ok"]:
            session.send(_frame(json.dumps({"cancel": "runtime missing"}).encode()))
            session.wait(deadline, "cancelling")
            raise DeviceDependencyError(f"device {device.label}: {artifact.runtime} cannot be imported by {where} "
                                        f"({rt['error']}); install it on the device: {INSTALL_HINT[artifact.runtime]}, "
                                        "or point --remote-python at a Python that has it")
        free = hello.get("free_bytes")
        if free is not None and free < total + FREE_SPACE_MARGIN_BYTES:
            session.send(_frame(json.dumps({"cancel": "no space"}).encode()))
            session.wait(deadline, "cancelling")
            raise DeviceDiskFullError(f"device {device.label}: {hello['workdir']} has {free:,} bytes free, the "
                                      f"artifact needs {total:,}; free space there or pass --remote-tmp with "
                                      "a larger file system")
        job = {"runtime": artifact.runtime, "model": files[0][0] if len(files) == 1 else Path(artifact.path).name,
               "inputs": "reference_inputs.npz", "warmup": int(warmup), "iters": int(iters),
               "threads": int(threads), "batch": int(batch), "parity": bool(parity),
               "input_names": [s.name for s in artifact.inputs], "info": runtime_info(artifact),
               "files": [{"name": n, "bytes": p.stat().st_size} for n, p in files]
               + [{"name": "reference_inputs.npz", "bytes": len(npz)}]}
        session.send(_frame(json.dumps(job).encode()))
        for _, path in files:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    session.send(chunk)
        session.send(npz)
        result: Optional[dict[str, Any]] = None
        while True:
            event = session.wait(deadline, "copying and measuring")
            if event["event"] == "result":
                result = event
            elif event["event"] == "error":
                bye = session.wait(deadline, "cleaning up")
                note = "" if bye.get("cleaned") else f"; could not remove {hello['workdir']} on the device"
                cls = DeviceDiskFullError if event["kind"] == "disk" else RuntimeFailure
                hint = "; free space there or pass --remote-tmp" if event["kind"] == "disk" else ""
                raise cls(f"device {device.label}: {artifact.runtime} {rt.get('version')} failed: "
                          f"{event['message']}{hint}{note}")
            elif event["event"] == "bye":
                break
        if result is None:
            raise RuntimeFailure(f"device {device.label}: the runner ended without a result")
        if not event.get("cleaned"):
            raise RuntimeFailure(f"device {device.label}: could not remove {hello['workdir']} on the device")
    finally:
        session.close()
    outputs = [np.load(io.BytesIO(base64.b64decode(o)), allow_pickle=False) for o in result["outputs"]]
    return RemoteResult(description=hello["device"], runtime_version=rt["version"], runtime_package=rt["package"],
                        samples_ns=[int(s) for s in result["samples_ns"]], batch=int(result["batch"]),
                        outputs=outputs, load_ms=float(result["load_ms"]), peak_rss_bytes=result["peak_rss_bytes"],
                        rss_before_load_bytes=result["rss_before_load_bytes"], workdir=hello["workdir"],
                        cleaned=bool(event.get("cleaned")))
