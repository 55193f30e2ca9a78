"""The device side of `edgeprep profile --device ssh://...`: a self-contained runner.

This file is sent over SSH (or to a QEMU-emulated Python) and executed by the device's Python, right
after edgeprep/cpu_flags.py's and edgeprep/remote/rss.py's source (session.runner_source); it must
not import edgeprep there, only
the standard library, numpy and the artifact's runtime (onnxruntime, ai-edge-litert / tflite-runtime,
or executorch). It keeps to Python 3.8 syntax (JetPack 5 ships 3.8).

Protocol (the host side is edgeprep/remote/session.py):
  argv: RUNNER_BYTES RUNTIME [REMOTE_TMP]   (the host's bootstrap read RUNNER_BYTES of the source)
  device -> host, stdout, one JSON object per line with an "event" key:
    hello     device description, the runtime's availability and version, the work dir, free bytes
    received  all files written          loaded  model loaded      measuring  timing started
    result    latency samples (ns), outputs (base64 .npy), memory  error  {"kind", "message"}
    bye       {"cleaned": bool}, always the last line
  host -> device, stdin, after the source: frames of an 8-byte big-endian length and a payload:
    a JSON job (or {"cancel": reason}), then the bytes of each file the job lists, in order.
    A job with "model_path" (the host's own subprocess, edgeprep/measure/memory.py: same file
    system) loads the model there in place instead of from a copy in the work dir.
The host keeps stdin open until "bye". End of stdin before that means the host or the connection
is gone: a watchdog thread then deletes the work dir and exits, so nothing half-copied is left.
"""
import base64
import io
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import threading
import time

PROTOCOL = 1
CHUNK_BYTES = 1 << 20
PARITY_BATCH = 256  # rows per call for the reference inputs, as the host's validate.run_batched
STATE = {"workdir": None, "done": False}
LOCK = threading.Lock()


def emit(event, **fields):
    fields["event"] = event
    try:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):  # the host is gone; the watchdog cleans up
        pass


def cleanup():
    """Delete the work dir once (main thread or watchdog, whichever comes first)."""
    with LOCK:
        workdir, STATE["workdir"] = STATE["workdir"], None
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
        return not os.path.exists(workdir)
    return True


def read_exact(stream, n):
    parts, left = [], n
    while left:
        part = stream.read(min(left, CHUNK_BYTES))
        if not part:
            raise EOFError("the host closed the connection")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_frame(stream):
    (n,) = struct.unpack(">Q", read_exact(stream, 8))
    return read_exact(stream, n)


def watchdog(stream):
    """Block on stdin; its end before the job is done means the connection dropped."""
    try:
        while stream.read(4096):
            pass
    except (OSError, ValueError):
        pass
    if not STATE["done"]:
        cleanup()
        os._exit(3)


# ----------------------------------------------------------------------------- device description
# The kernel-relevant ISA flags: a runtime picks its int8 / fp16 kernels per CPU family, so an
# on-device number means little without them. On a device, session.py sends edgeprep/cpu_flags.py's
# source ahead of this file, so device_isa is already defined; imported on the host, it comes from
# the package. One parser for both sides.
if "device_isa" not in globals():
    from edgeprep.cpu_flags import device_isa


def _first_line_value(path, keys):
    try:
        with open(path, errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


def describe_device():
    cpu = _first_line_value("/proc/cpuinfo", ("model name", "Hardware", "Processor", "cpu model"))
    board = None
    try:  # Raspberry Pi, Jetson and most ARM boards name themselves in the device tree
        with open("/proc/device-tree/model", "rb") as f:
            board = f.read().rstrip(b"\0").decode(errors="replace").strip() or None
    except OSError:
        board = _first_line_value("/proc/cpuinfo", ("Model",))
    if cpu is None and sys.platform == "darwin":
        try:
            import subprocess
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5).stdout.strip() or None
        except Exception:
            cpu = None
    mem_kib = _first_line_value("/proc/meminfo", ("MemTotal",))
    os_name = _first_line_value("/etc/os-release", ()) or None
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    return {"hostname": platform.node(), "cpu": cpu or platform.processor() or platform.machine(),
            "board": board, "cores": os.cpu_count(), "machine": platform.machine(),
            "arch": platform.machine() or None, "isa": device_isa(),
            "os": os_name or platform.platform(), "kernel": platform.release(),
            "memory_bytes": int(mem_kib.split()[0]) * 1024 if mem_kib else None,
            "python": platform.python_version(), "numpy": numpy_version}


# The memory probe (this process image's own RSS high-water mark, and its reset) is
# edgeprep/remote/rss.py, sent ahead like cpu_flags.py; imported from the package on the host.
if "peak_rss_bytes" not in globals():
    from edgeprep.remote.rss import peak_rss_bytes, reset_peak_rss, rss_source


# ----------------------------------------------------------------------------- runtimes
# Each mirrors how edgeprep runs the same artifact on the host (exporters/*.py), so a number
# measured on the device means the same thing: same session options, same input quantization.
def _litert_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime"
    except ImportError:
        pass
    from tensorflow.lite import Interpreter  # noqa: F401  (raises ImportError when absent)
    return Interpreter, "tensorflow"


def runtime_version(runtime):
    """(version string, package) of the runtime, or raise ImportError."""
    if runtime == "onnxruntime":
        import onnxruntime
        return onnxruntime.__version__, "onnxruntime"
    if runtime == "litert":
        _, package = _litert_interpreter_class()
        return _distribution_version(package), package
    if runtime == "executorch":
        import executorch.runtime  # noqa: F401  (raises ImportError when absent)
        return _distribution_version("executorch"), "executorch"
    raise ImportError("runtime %r cannot run over SSH" % runtime)


def _distribution_version(package):
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # an install without metadata (a vendor build): the runtime still runs
        return "unknown"


class OrtRunner:
    TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
             "tensor(uint8)": "uint8", "tensor(bool)": "bool"}

    def __init__(self, path, threads, info, input_names):
        import numpy as np
        import onnxruntime as ort
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[info.get("optimize") or "extended"]
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        for key, value in (info.get("session_config") or {}).items():
            so.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        dtypes = {i.name: np.dtype(self.TYPES.get(i.type, "float32")) for i in self.session.get_inputs()}
        self.names = list(input_names) or list(dtypes)
        self.dtypes = [dtypes[n] for n in self.names]
        first = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = first if isinstance(first, int) and first > 0 else None

    def prepare(self, inputs):
        import numpy as np
        return {n: np.ascontiguousarray(x, dtype=d) for n, x, d in zip(self.names, inputs, self.dtypes)}

    def call(self, prepared):
        return self.session.run(None, prepared)

    def outputs(self, raw):
        return list(raw)


class LiteRTRunner:
    INTEGER = ("int8", "uint8", "int16")

    def __init__(self, path, threads, info, input_names):
        cls, _ = _litert_interpreter_class()
        self.it = cls(model_path=path, num_threads=int(threads))
        self.it.allocate_tensors()
        self.ins, self.outs = self.it.get_input_details(), self.it.get_output_details()
        self.fixed_batch = int(self.ins[0]["shape"][0]) if self.ins else None

    def prepare(self, inputs):
        import numpy as np
        for x, d in zip(inputs, self.ins):
            dtype = np.dtype(d["dtype"])
            if dtype.name in self.INTEGER:  # the tensor's own scale / zero point, half to even, clipped
                scale, zero = d["quantization"]
                lim = np.iinfo(dtype)
                x = np.clip(np.round(np.asarray(x, dtype=np.float32) / scale) + zero, lim.min, lim.max)
            self.it.set_tensor(d["index"], np.ascontiguousarray(x, dtype=dtype))
        return None

    def call(self, prepared):
        self.it.invoke()

    def outputs(self, raw):
        import numpy as np
        result = []
        for d in self.outs:
            y = self.it.get_tensor(d["index"])
            if np.dtype(d["dtype"]).name in self.INTEGER:
                scale, zero = d["quantization"]
                y = ((y.astype(np.float32) - zero) * scale).astype(np.float32)
            result.append(np.array(y))
        return result


class ExecuTorchRunner:
    def __init__(self, path, threads, info, input_names):
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
        portable_lib._unsafe_reset_threadpool(int(threads))  # XNNPACK's pool: the threads asked for
        self.method = Runtime.get().load_program(path).load_method("forward")
        self.dtypes = info.get("input_dtypes") or []
        batch = info.get("static_batch")
        self.fixed_batch = int(batch) if batch else None

    def prepare(self, inputs):
        import numpy as np
        import torch
        return [torch.from_numpy(np.ascontiguousarray(x, dtype=d)) for x, d in zip(inputs, self.dtypes)]

    def call(self, prepared):
        return self.method.execute(prepared)

    def outputs(self, raw):
        return [o.numpy().copy() for o in raw]


RUNNERS = {"onnxruntime": OrtRunner, "litert": LiteRTRunner, "executorch": ExecuTorchRunner}


def run_all(runner, inputs):
    """Outputs over the reference inputs; a fixed-batch model gets exact chunks, the last padded."""
    import numpy as np
    n = len(inputs[0])
    step = runner.fixed_batch or min(n, PARITY_BATCH)
    pieces = None
    for i in range(0, n, step):
        chunk = [x[i:i + step] for x in inputs]
        pad = step - len(chunk[0])
        if pad:
            chunk = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
        outs = runner.outputs(runner.call(runner.prepare(chunk)))
        outs = [o[:step - pad] for o in outs]
        pieces = [[o] for o in outs] if pieces is None else [p + [o] for p, o in zip(pieces, outs)]
    return [np.concatenate(p, axis=0) for p in pieces]


def encode_npy(array):
    import numpy as np
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def measure(job, workdir):
    """Load, time ``iters`` calls at the profile batch, then run the reference inputs. Timing comes
    first so the peak RSS reported is the deployment's (load + inference at that batch), not the
    parity pass's, which runs up to 256 rows at a time."""
    import gc

    import numpy as np
    # The mark restarts here, so peak - before is the load and the timed calls alone (Python, numpy
    # and the runtime are already imported); where it cannot restart, before is the mark so far.
    peak_reset = reset_peak_rss()
    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    model = job.get("model_path") or os.path.join(workdir, job["model"])
    runner = RUNNERS[job["runtime"]](model, job["threads"], job.get("info") or {}, job.get("input_names") or [])
    load_ms = (time.perf_counter() - t0) * 1e3
    emit("loaded", load_ms=load_ms)
    with np.load(os.path.join(workdir, job["inputs"]), allow_pickle=False) as z:
        inputs = [z["input_%d" % i] for i in range(len([k for k in z.files if k.startswith("input_")]))]
    batch = runner.fixed_batch or int(job["batch"])
    reps = -(-batch // len(inputs[0]))
    timed = [np.ascontiguousarray(np.concatenate([x] * reps, axis=0)[:batch]) for x in inputs]
    prepared = runner.prepare(timed)
    runner.call(prepared)  # fail here, not inside the timing loop
    emit("measuring", warmup=job["warmup"], iters=job["iters"], batch=batch)
    for _ in range(int(job["warmup"])):
        runner.call(prepared)
    samples = []
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()  # as on the host: no collection lands inside a timed call
    try:
        for _ in range(int(job["iters"])):
            start = clock()
            runner.call(prepared)
            samples.append(clock() - start)
    finally:
        gc.enable()
    peak = peak_rss_bytes()
    outputs = run_all(runner, inputs) if job.get("parity", True) else []
    return {"samples_ns": samples, "batch": batch, "load_ms": load_ms, "outputs": [encode_npy(o) for o in outputs],
            "rss_before_load_bytes": rss_before, "peak_rss_bytes": peak, "rss_source": rss_source(),
            "peak_reset": peak_reset}


def free_bytes(path):
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except (AttributeError, OSError):
        return None


def main():
    stdin = sys.stdin.buffer
    runtime = sys.argv[2] if len(sys.argv) > 2 else "onnxruntime"
    remote_tmp = os.path.expanduser(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
    try:
        version, package = runtime_version(runtime)
        rt = {"name": runtime, "ok": True, "version": version, "package": package}
    except Exception as exc:  # ImportError, or a broken install raising something else
        rt = {"name": runtime, "ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}
    try:
        import numpy  # noqa: F401
    except ImportError as exc:
        rt = {"name": runtime, "ok": False, "error": "ImportError: %s" % exc}
    try:
        workdir = tempfile.mkdtemp(prefix="edgeprep-", dir=remote_tmp)
    except OSError as exc:
        emit("error", kind="tmp", message="cannot create a temp dir in %s: %s" % (remote_tmp or tempfile.gettempdir(), exc))
        emit("bye", cleaned=True)
        return 2
    STATE["workdir"] = workdir
    emit("hello", protocol=PROTOCOL, device=describe_device(), runtime=rt, workdir=workdir,
         free_bytes=free_bytes(workdir), python=sys.executable)
    code = 0
    try:
        job = json.loads(read_frame(stdin).decode())
        if "cancel" in job:
            return 0
        written = 0
        for f in job["files"]:
            dest = os.path.join(workdir, f["name"])
            if not os.path.abspath(dest).startswith(os.path.abspath(workdir) + os.sep):
                raise ValueError("file name %r leaves the work dir" % f["name"])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            left = int(f["bytes"])
            with open(dest, "wb") as out:
                while left:
                    chunk = read_exact(stdin, min(left, CHUNK_BYTES))
                    out.write(chunk)
                    left -= len(chunk)
            written += int(f["bytes"])
        emit("received", bytes=written)
        threading.Thread(target=watchdog, args=(stdin,), daemon=True).start()
        emit("result", **measure(job, workdir))
    except EOFError:
        code = 3  # the host went away mid-transfer
    except OSError as exc:
        kind = "disk" if getattr(exc, "errno", None) in (28, 122) else "os"  # ENOSPC, EDQUOT
        emit("error", kind=kind, message="%s: %s" % (type(exc).__name__, exc))
        code = 3
    except Exception as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        emit("error", kind="runtime", message="%s: %s" % (type(exc).__name__, first))
        code = 3
    finally:
        STATE["done"] = True
        emit("bye", cleaned=cleanup())
    return code


if __name__ in ("__main__", "__edgeprep_device__"):
    sys.exit(main())
