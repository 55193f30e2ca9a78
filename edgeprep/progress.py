"""Training progress on stderr: a live bar for a person, short periodic lines for a log.

A terminal or a notebook gets rich's transient bar (step, loss, time left; it disappears when the
loop ends). Anything else (CI logs, pipes, ``| tee``) gets one plain line at most every
``EDGEPREP_PROGRESS_INTERVAL_S`` seconds (default 30) and one when the loop finishes::

      finetune: step 120/400 (30%) loss 0.4312 elapsed 0:41 eta 1:36

Lines are throttled by time, not by step, so a 10-minute stage logs ~20 of them whatever its step
rate. The ETA extrapolates the mean step rate since the loop started.

Never both: a redrawn bar in a log file is a wall of control codes, and lines on a terminal would
scroll the bar away. The choice follows rich's detection, so its variables apply:
``TTY_INTERACTIVE=0`` gives the lines on a terminal, or in a CI that claims to be one
(``FORCE_COLOR``, ``TTY_COMPATIBLE``) for colours.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Callable, Iterator, Mapping, Optional

from edgeprep.errors import BadInputError

INTERVAL_ENV = "EDGEPREP_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0

# (steps done so far, 1-based; the loss of the last step)
ProgressUpdate = Callable[[int, float], None]


def interval_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds between two progress lines: ``EDGEPREP_PROGRESS_INTERVAL_S``, or 30 when unset."""
    raw = environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        interval_s = float(raw)
    except ValueError:
        interval_s = math.nan
    if not (math.isfinite(interval_s) and interval_s >= 0):
        raise BadInputError(f"{INTERVAL_ENV}={raw!r} is not a number of seconds >= 0; "
                            f"unset it (a line every {DEFAULT_INTERVAL_S:g} s) or set e.g. 60 (0: every step)")
    return interval_s


def format_duration(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on), rounded to the second."""
    total_s = max(0, round(seconds))
    hours, rest_s = divmod(total_s, 3600)
    minutes, secs = divmod(rest_s, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(label: str, steps_done: int, total_steps: int, loss: float, elapsed_s: float) -> str:
    """One log line; indented so it reads as part of the ``› stage N (kind): running`` above it."""
    eta_s = elapsed_s * (total_steps - steps_done) / steps_done if steps_done else math.nan
    eta = format_duration(eta_s) if math.isfinite(eta_s) else "?"
    percent = 100 * steps_done // total_steps if total_steps else 100
    return (f"  {label}: step {steps_done}/{total_steps} ({percent}%) loss {loss:.4f} "
            f"elapsed {format_duration(elapsed_s)} eta {eta}")


class Throttle:
    """Says yes at most once per ``interval_s``, counting from ``start_s`` (the loop's start, so a
    loop shorter than the interval prints only its final line)."""

    def __init__(self, interval_s: float, start_s: float):
        self.interval_s = interval_s
        self.last_s = start_s

    def due(self, now_s: float) -> bool:
        if now_s - self.last_s < self.interval_s:
            return False
        self.last_s = now_s
        return True


def _write_stderr(line: str) -> None:
    # sys.stderr looked up at each write: pytest and the CLI's test runner swap it after import.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()  # a CI log shows the line now, not when the buffer fills


class LineProgress:
    """The not-a-terminal report: throttled lines from ``update``, and a last one from ``finish``."""

    def __init__(self, label: str, total_steps: int, interval_s: float, *,
                 clock: Callable[[], float] = time.monotonic, write: Callable[[str], None] = _write_stderr):
        self.label, self.total_steps, self.clock, self.write = label, total_steps, clock, write
        self.start_s = clock()
        self.throttle = Throttle(interval_s, self.start_s)
        self.steps_done, self.loss, self.printed_steps = 0, math.nan, 0

    def update(self, steps_done: int, loss: float) -> None:
        self.steps_done, self.loss = steps_done, loss
        now_s = self.clock()
        if self.throttle.due(now_s):
            self._emit(now_s)

    def finish(self) -> None:
        """The final line, unless the last update already printed it (or no step ran)."""
        if self.steps_done and self.printed_steps != self.steps_done:
            self._emit(self.clock())

    def _emit(self, now_s: float) -> None:
        self.write(progress_line(self.label, self.steps_done, self.total_steps, self.loss, now_s - self.start_s))
        self.printed_steps = self.steps_done


def _ignore(steps_done: int, loss: float) -> None:
    pass


@contextlib.contextmanager
def training_progress(label: str, total_steps: int, enabled: bool,
                      interval_s: Optional[float] = None) -> Iterator[ProgressUpdate]:
    """Yields ``update(steps_done, loss)`` for the loop to call after each step.

    ``enabled`` False (``--quiet``, ``--json``, a non-zero DDP rank) shows nothing. The final line
    is printed only when the loop completes: a failing loop's error line says where it stopped.
    """
    # Read on every rank and even when disabled: a bad value fails every DDP rank alike, before
    # the first step, instead of rank 0 alone while the others wait in a collective.
    interval_s = interval_from_env() if interval_s is None else interval_s
    if not enabled:
        yield _ignore
        return
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_interactive or console.is_jupyter:  # a person watches: the live bar
        with _bar(console) as bar:
            task = bar.add_task(label, total=total_steps, loss=math.nan)
            yield lambda steps_done, loss: bar.update(task, completed=steps_done, loss=loss)
        return
    lines = LineProgress(label, total_steps, interval_s)
    yield lines.update
    lines.finish()


def _bar(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # Transient: the finished bar disappears instead of piling up above the stage's result line.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=True)
