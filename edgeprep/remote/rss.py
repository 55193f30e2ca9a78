"""Resident memory of this process image alone: the device runner's memory probe.

Why not ``ru_maxrss`` alone: Linux carries a process's RSS high-water mark across fork + exec (and
vfork + exec) into the new program, so a runner spawned by a large process (edgeprep judging
artifacts on this host: torch, the data, ~600 MB) reports its parent's peak, not its own.
``/proc/self/status`` ``VmHWM`` belongs to the current address space, which exec replaces, so it
starts at the new program's own pages; writing "5" to ``/proc/self/clear_refs`` (Linux 4.0+) resets
it to the current RSS, so the peak after that covers the next phase only (the model's load and run).
Where /proc is missing (macOS) ``ru_maxrss`` is the fallback: there a runner over SSH is started
by sshd's small shell, so the inherited mark is the shell's.

Standard library only, Python 3.8 syntax and no ``from __future__`` import: session.runner_source
sends this file's source to a device ahead of runner.py's, as it does edgeprep/cpu_flags.py.
"""
import sys

PROC_STATUS = "/proc/self/status"
PROC_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(key):
    """A ``<key>: <n> kB`` line of /proc/self/status as KiB, or None (no /proc, no such line)."""
    try:
        with open(PROC_STATUS) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_source():
    """Which counter peak_rss_bytes reads here: "VmHWM" (this image alone) or "ru_maxrss"."""
    return "VmHWM" if _status_kib("VmHWM") is not None else "ru_maxrss"


def peak_rss_bytes():
    """High-water mark of resident memory in bytes, since the program started or reset_peak_rss."""
    hwm_kib = _status_kib("VmHWM")
    if hwm_kib is not None:
        return hwm_kib * 1024
    try:
        import resource
    except ImportError:  # not on every platform
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # KiB on Linux, bytes on macOS


def reset_peak_rss():
    """Restart the high-water mark at the current RSS; False where the kernel does not allow it
    (then the mark so far stays, which the caller's "before" reading also includes)."""
    try:
        with open(PROC_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
