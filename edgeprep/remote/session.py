"""Host side of on-device profiling: one session per artifact and device, over SSH (ssh://) or
under QEMU on this host (emu://, emulate.py).

The session sends runner.py, then the artifact, the reference inputs and a job; it reads back the
device's description, latency samples, memory and outputs (see runner.py for the protocol). One
connection does everything, so the device's work dir lives exactly as long as the connection: the
runner deletes it when it finishes, fails, or sees the connection drop. If the host gives up first
(timeout), it kills ssh, which ends the connection and with it the runner. An emulated runner is
the same program on the same protocol; only the spawned command line differs (spawn_argv).
"""
from __future__ import annotations

import base64
import io
import json
import posixpath
import queue
import re
import shlex
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from edgeprep.errors import BadInputError, EdgeprepError, MissingDependencyError, RuntimeFailure
from edgeprep.remote.emu_cache import Prepared, clean_stderr
from edgeprep.remote.emulate import EmulatedDevice
from edgeprep.remote.ssh import Device, DeviceUnreachableError, classify, ssh_argv
from edgeprep.types import Artifact

AnyDevice = Union[Device, EmulatedDevice]

RUNNER = Path(__file__).with_name("runner.py")
CPU_FLAGS = Path(__file__).parents[1] / "cpu_flags.py"  # sent ahead of the runner: its ISA flag parser
RSS = Path(__file__).with_name("rss.py")  # and its memory probe (own RSS high-water mark)
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
    emulation: Optional[Prepared] = None  # the QEMU set-up an emu:// device ran under
    rss_source: Optional[str] = None  # "VmHWM" (the runner's own image) or "ru_maxrss" (rss.py)
    peak_reset: Optional[bool] = None  # whether the runner restarted its RSS mark right before the load


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
    """One spawned runner (``ssh`` to a device, or QEMU here) speaking the runner's protocol; lines
    from its stdout arrive on a queue.

    ``argv`` is the command line to spawn: ssh's for an ssh:// device, QEMU's + the guest Python's
    for an emu:// one (spawn_argv). Either way the process's stdin / stdout carry the protocol.
    The whole session has one deadline: a timer kills the process when it passes, whatever the host
    is doing then (waiting for an event, or blocked writing the artifact to a slow link)."""

    def __init__(self, device: AnyDevice, argv: Sequence[str], source: bytes, log: Callable[[str], None],
                 timeout_s: float, env: Optional[dict[str, str]] = None):
        self.device, self.log = device, log
        self.over_ssh = isinstance(device, Device)
        self.started = time.monotonic()
        self.expired = False
        self.saw_bye = False  # the runner reported its dir removed (or never made one)
        try:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env)
        except FileNotFoundError:
            if self.over_ssh:
                raise DeviceDependencyError("the OpenSSH client `ssh` is not installed on this machine; install it "
                                            "(Debian/Ubuntu: apt-get install openssh-client)") from None
            raise DeviceDependencyError(f"device {device.label}: {argv[0]} is gone; rerun `edgeprep devices setup` "
                                        "or apt-get install qemu-user-static mmdebstrap") from None
        self.events: "queue.Queue[Optional[dict[str, Any]]]" = queue.Queue()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._stderr_reader.start()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        self.send(source)

    def _expire(self) -> None:
        self.expired = True
        self.proc.kill()  # ends the connection (or QEMU); an ssh runner sees it and removes its dir

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

    def _timed_out(self, phase: str) -> DeviceUnreachableError:
        return DeviceUnreachableError(f"device {self.device.label}: {phase}: timed out after "
                                      f"{time.monotonic() - self.started:.0f} s; raise the device's timeout "
                                      "(--timeout, recipe timeout_s) or lower iters")

    def wait(self, phase: str, within_s: Optional[float] = None) -> dict[str, Any]:
        """The next event, or a typed error when ssh ends or a deadline passes."""
        try:
            event = self.events.get(timeout=within_s)
        except queue.Empty:
            self.kill()
            raise self._timed_out(phase) from None
        if event is None:
            self.proc.wait(timeout=30)
            if self.expired:
                raise self._timed_out(phase)
            self._stderr_reader.join(timeout=10)  # all of ssh's message, not a prefix of it
            stderr = clean_stderr(b"".join(self.stderr).decode(errors="replace"))  # minus QEMU's TCG warnings
            code = self.proc.returncode
            if code == 255 and self.over_ssh:  # ssh's own failure; anything else is the remote command's status
                raise classify(self.device, stderr, phase)
            lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
            why = f" (killed by signal {code - 128}{': out of memory?' if code == 137 else ''})" if code > 128 else ""
            hint = ("; check that --remote-python names the device's Python 3.8 or newer"
                    if phase == "connecting" and self.over_ssh else "")
            raise RuntimeFailure(f"device {self.device.label}: {phase}: the runner ({self.device.remote_python}) "
                                 f"ended with exit status {code}{why}{': ' + lines[-1] if lines else ''}{hint}")
        self.saw_bye = self.saw_bye or event["event"] == "bye"
        self.log(f"device {self.device.label}: {event['event']}")
        return event

    def close(self) -> None:
        self._timer.cancel()
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


def runner_source() -> bytes:
    """What the device executes: edgeprep/cpu_flags.py and edgeprep/remote/rss.py (stdlib only), then
    runner.py, as one program, so the device parses its ISA flags and reads its memory with the host's
    own code and nothing of edgeprep is imported."""
    return CPU_FLAGS.read_bytes() + b"\n\n" + RSS.read_bytes() + b"\n\n" + RUNNER.read_bytes()


def runner_args(source: bytes, runtime: str, remote_tmp: Optional[str]) -> list[str]:
    """The Python arguments that start the runner: bootstrap, then read ``source`` from stdin."""
    return ["-u", "-c", BOOTSTRAP, str(len(source)), runtime, remote_tmp or ""]


def spawn_argv(device: AnyDevice, source: bytes, runtime: str, emulation: Optional[Prepared]) -> list[str]:
    """The command line that starts the runner on ``device``."""
    if isinstance(device, EmulatedDevice):
        assert emulation is not None
        return emulation.argv(*runner_args(source, runtime, device.remote_tmp))
    # remote_python is the user's shell fragment (unquoted: "~/venv/bin/python" must expand there);
    # everything edgeprep adds is quoted
    return ssh_argv(device, device.remote_python + " " + shlex.join(runner_args(source, runtime, device.remote_tmp)))


WORKDIR_NAME = re.compile(r"edgeprep-[A-Za-z0-9_]+")  # what the runner's mkdtemp makes


def remove_remote_dir(device: Device, workdir: str) -> tuple[bool, str]:
    """Best effort, for a runner that died without cleaning up: ``rm -rf`` its work dir over a new
    connection. Returns (removed, why not). Only a dir the runner named is ever removed."""
    if not WORKDIR_NAME.fullmatch(posixpath.basename(workdir)):
        return False, f"{workdir!r} is not a runner work dir"
    argv = ssh_argv(device, f"rm -rf -- {shlex.quote(workdir)} && test ! -e {shlex.quote(workdir)}")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=device.connect_timeout_s + 20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, type(exc).__name__
    if done.returncode == 0:
        return True, ""
    lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"exit status {done.returncode}"


def remove_local_dir(workdir: str) -> tuple[bool, str]:
    """remove_remote_dir for an emulated runner: QEMU user mode shares this host's file system."""
    if not WORKDIR_NAME.fullmatch(posixpath.basename(workdir)):
        return False, f"{workdir!r} is not a runner work dir"
    shutil.rmtree(workdir, ignore_errors=True)
    return (not Path(workdir).exists()), "still there"


def supported_runtimes(device: AnyDevice) -> tuple[str, ...]:
    return device.family.runtimes if isinstance(device, EmulatedDevice) else tuple(sorted(INSTALL_HINT))


def run_on_device(artifact: Artifact, device: AnyDevice, inputs: Sequence[np.ndarray], *, warmup: int, iters: int,
                  threads: int, batch: int, parity: bool = True,
                  log: Callable[[str], None] = lambda m: None) -> RemoteResult:
    """Copy ``artifact`` to ``device``, run ``inputs`` through it (outputs come back when ``parity``),
    time ``iters`` calls at ``batch`` rows, and remove everything from the device again. An emu://
    device is prepared first (emu_cache.prepare: fetched once into the cache)."""
    runtimes = supported_runtimes(device)
    if artifact.runtime not in runtimes:
        how = f"emulated {device.family.name}" if isinstance(device, EmulatedDevice) else "profiling over SSH"
        raise BadInputError(f"{artifact.name}: {how} supports {', '.join(runtimes)} "
                            f"artifacts, not {artifact.runtime}; profile it on its host machine instead")
    emulation = None
    if isinstance(device, EmulatedDevice):
        from edgeprep.remote.emu_cache import prepare

        emulation = prepare(device.family, artifact.runtime, log)
    files = payload_files(artifact)
    npz = _npz_bytes(inputs)
    source = runner_source()
    session = _Session(device, spawn_argv(device, source, artifact.runtime, emulation), source, log,
                       timeout_s=device.timeout_s, env=emulation.env() if emulation else None)
    hello: dict[str, Any] = {}
    try:
        # handshake, then the device's Python imports numpy and the runtime
        hello = session.wait("connecting", within_s=device.connect_timeout_s + 60)
        _check_hello(session, hello, artifact, files, npz)
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
        result, bye = _collect(session, artifact, hello)
    except EdgeprepError as exc:
        workdir = hello.get("workdir")
        if not workdir or session.saw_bye:
            raise
        # The runner never said goodbye: it died, or the connection did. It removes its own dir
        # when the connection drops; a runner that was killed cannot, so try once more from here.
        removed, why = (remove_local_dir(workdir) if emulation else remove_remote_dir(device, workdir))
        note = (f"removed {workdir} on the device" if removed else
                f"could not confirm {workdir} is gone from the device ({why}); the runner deletes it when it "
                "sees the connection drop, but check and remove it by hand if the device was still running")
        raise type(exc)(f"{exc}; {note}") from None
    finally:
        session.close()
    outputs = [np.load(io.BytesIO(base64.b64decode(o)), allow_pickle=False) for o in result["outputs"]]
    rt = hello["runtime"]
    return RemoteResult(description=hello["device"], runtime_version=rt["version"], runtime_package=rt["package"],
                        samples_ns=[int(s) for s in result["samples_ns"]], batch=int(result["batch"]),
                        outputs=outputs, load_ms=float(result["load_ms"]), peak_rss_bytes=result["peak_rss_bytes"],
                        rss_before_load_bytes=result["rss_before_load_bytes"], workdir=hello["workdir"],
                        cleaned=bool(bye.get("cleaned")), emulation=emulation,
                        rss_source=result.get("rss_source"), peak_reset=result.get("peak_reset"))


def _cancel(session: _Session, reason: str) -> None:
    session.send(_frame(json.dumps({"cancel": reason}).encode()))
    session.wait("cancelling")  # the runner removes its dir and says bye


def _check_hello(session: _Session, hello: dict[str, Any], artifact: Artifact, files, npz: bytes) -> None:
    """Refuse before copying anything: no temp dir, no runtime, or no room on the device."""
    label = session.device.label
    if hello["event"] == "error":
        session.wait("connecting")
        raise RuntimeFailure(f"device {label}: {hello['message']}; pass --remote-tmp with a writable dir")
    rt = hello["runtime"]
    if not rt["ok"]:
        _cancel(session, "runtime missing")
        if not session.over_ssh:
            raise DeviceDependencyError(
                f"device {label}: {artifact.runtime} cannot be imported by {session.device.remote_python} "
                f"({rt['error']}); x86 families run this Python: install it here ("
                f"{INSTALL_HINT[artifact.runtime].replace('python3 -m ', '')}); arm64 ones: remove the cache dir "
                "and rerun `edgeprep devices setup`")
        raise DeviceDependencyError(
            f"device {label}: {artifact.runtime} cannot be imported by {session.device.remote_python} there "
            f"({rt['error']}); install it on the device: {INSTALL_HINT[artifact.runtime]}, or point "
            "--remote-python at a Python that has it")
    total = sum(p.stat().st_size for _, p in files) + len(npz)
    free = hello.get("free_bytes")
    if free is not None and free < total + FREE_SPACE_MARGIN_BYTES:
        _cancel(session, "no space")
        raise DeviceDiskFullError(f"device {label}: {hello['workdir']} has {free:,} bytes free, the artifact "
                                  f"needs {total:,}; free space there or pass --remote-tmp with a larger file system")


def _collect(session: _Session, artifact: Artifact, hello: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Events until the runner's bye: (result, bye), or the runner's error as a typed one."""
    label, rt = session.device.label, hello["runtime"]
    result: Optional[dict[str, Any]] = None
    while True:
        event = session.wait("copying and measuring")
        if event["event"] == "result":
            result = event
        elif event["event"] == "error":
            bye = session.wait("cleaning up")
            note = "" if bye.get("cleaned") else f"; could not remove {hello['workdir']} on the device"
            disk = event["kind"] == "disk"
            cls = DeviceDiskFullError if disk else RuntimeFailure
            raise cls(f"device {label}: {artifact.runtime} {rt.get('version')} failed: {event['message']}"
                      f"{'; free space there or pass --remote-tmp' if disk else ''}{note}")
        elif event["event"] == "bye":
            if result is None:
                raise RuntimeFailure(f"device {label}: the runner ended without a result")
            if not event.get("cleaned"):
                raise RuntimeFailure(f"device {label}: could not remove {hello['workdir']} on the device")
            return result, event
