"""Training progress (issue 22.8): periodic one-line reports when stderr is not a terminal, rich's
bar when it is, never both, nothing under --quiet; the time throttle, with an injected clock."""
from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import run_cli

from edgeprep.data import Split
from edgeprep.errors import BadInputError, TrainingDivergedError
from edgeprep.progress import (
    DEFAULT_INTERVAL_S,
    INTERVAL_ENV,
    LineProgress,
    Throttle,
    format_duration,
    interval_from_env,
    progress_line,
)
from edgeprep.recipe import TrainConfig
from edgeprep.train import train

_DURATION = r"\d+:\d\d(?::\d\d)?"
LINE = re.compile(rf"^  (?P<label>.+): step (?P<step>\d+)/(?P<total>\d+) \((?P<percent>\d+)%\) "
                  rf"loss (?P<loss>-?\d+\.\d{{4}}) elapsed (?P<elapsed>{_DURATION}) eta (?P<eta>{_DURATION})$")


def blobs() -> Split:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (64,), generator=g)
    return Split(x=torch.randn(64, 16, generator=g) + y[:, None].float(), y=y)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def progress_lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def seconds_of(duration: str) -> int:
    total = 0
    for part in duration.split(":"):
        total = total * 60 + int(part)
    return total


@pytest.fixture(autouse=True)
def plain_stderr(monkeypatch):
    """rich's terminal detection reads these; a CI that sets them must not change what is tested."""
    for name in (INTERVAL_ENV, "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- the loop, not a terminal
def test_lines_report_every_step_with_interval_0(monkeypatch, capfd):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    result = train(mlp(), blobs(), TrainConfig(steps=5, batch_size=16), description="finetune")
    out, err = capfd.readouterr()
    assert out == ""
    lines = progress_lines(err)
    assert len(lines) == len(err.splitlines()) == 5  # every stderr line is a progress line; no final duplicate
    assert [int(m["step"]) for m in lines] == [1, 2, 3, 4, 5]
    assert {m["label"] for m in lines} == {"finetune"} and {int(m["total"]) for m in lines} == {5}
    assert [int(m["percent"]) for m in lines] == [20, 40, 60, 80, 100]
    # the loss printed is the step's logged loss
    assert [float(m["loss"]) for m in lines] == [round(h["loss"], 4) for h in result.history]
    elapsed = [seconds_of(m["elapsed"]) for m in lines]
    assert elapsed == sorted(elapsed)
    assert seconds_of(lines[-1]["eta"]) == 0  # the final line: step == total, nothing left


def test_default_interval_gives_a_short_loop_only_its_final_line(capfd):
    """Throttled by time: a loop shorter than 30 s logs one line, the final one."""
    result = train(mlp(), blobs(), TrainConfig(steps=3, batch_size=16))
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    (line,) = progress_lines(err)
    assert (line["label"], line["step"], line["total"], line["percent"]) == ("train", "3", "3", "100")
    assert float(line["loss"]) == round(result.final_loss, 4) and line["eta"] == "0:00"


def test_progress_false_prints_nothing(monkeypatch, capfd):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    train(mlp(), blobs(), TrainConfig(steps=3, batch_size=16), progress=False)
    assert capfd.readouterr() == ("", "")


def test_a_diverging_loop_prints_no_final_line(monkeypatch, capfd):
    """The error says where training stopped; a "step N/N (100%)" line would contradict it."""
    monkeypatch.setenv(INTERVAL_ENV, "0")

    def nan_at_step_3(state):
        return {"boom": torch.tensor(math.nan if state.step == 2 else 0.0)}

    with pytest.raises(TrainingDivergedError, match="diverged at step 3/5"):
        train(mlp(), blobs(), TrainConfig(steps=5, batch_size=16), loss_hooks=[nan_at_step_3])
    assert [int(m["step"]) for m in progress_lines(capfd.readouterr().err)] == [1, 2]


def test_a_terminal_gets_the_bar_with_loss_and_no_lines(monkeypatch, capfd):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich's own switch: treat stderr as a terminal
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv(INTERVAL_ENV, "0")
    train(mlp(), blobs(), TrainConfig(steps=3, batch_size=16), description="finetune")
    err = capfd.readouterr().err
    assert "finetune" in err and "3/3" in err and "loss " in err  # rich drew the bar
    assert progress_lines(err) == [] and "step 3/3" not in err


def test_tty_interactive_0_gives_a_terminal_the_lines_instead(monkeypatch, capfd):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "0")
    train(mlp(), blobs(), TrainConfig(steps=3, batch_size=16))
    err = capfd.readouterr().err
    assert [int(m["step"]) for m in progress_lines(err)] == [3] and "\x1b" not in err


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_a_bad_interval_is_refused_before_the_first_step(monkeypatch, capfd, value):
    monkeypatch.setenv(INTERVAL_ENV, value)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BadInputError, match=rf"{INTERVAL_ENV}='{re.escape(value)}' is not a number of seconds"):
        train(model, blobs(), TrainConfig(steps=3, batch_size=16), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- units
def test_interval_from_env():
    assert interval_from_env({}) == DEFAULT_INTERVAL_S == 30.0
    assert interval_from_env({INTERVAL_ENV: " "}) == DEFAULT_INTERVAL_S
    assert interval_from_env({INTERVAL_ENV: "0"}) == 0.0
    assert interval_from_env({INTERVAL_ENV: "2.5"}) == 2.5


def test_throttle_says_yes_at_most_once_per_interval_from_the_start():
    throttle = Throttle(interval_s=30.0, start_s=100.0)
    due = [t for t in (101.0, 129.9, 130.0, 131.0, 175.0, 190.0, 204.9, 205.0, 500.0) if throttle.due(t)]
    # 130: 30 s after the start; then 30 s after the last yes (175 + 30 = 205), not on a fixed
    # 30 s grid (which would say yes at 190): never two within 30 s
    assert due == [130.0, 175.0, 205.0, 500.0]
    always = Throttle(interval_s=0.0, start_s=0.0)
    assert all(always.due(t) for t in (0.0, 0.0, 1.0))


class FakeClock:
    def __init__(self):
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_line_progress_throttles_by_time_and_ends_with_the_final_step():
    clock, written = FakeClock(), []
    lines = LineProgress("qat int8", total_steps=400, interval_s=30.0, clock=clock, write=written.append)
    for step in range(1, 401):
        clock.now_s += 0.25  # 4 steps/s: a line every 120 steps
        lines.update(step, loss=1.0 / step)
    lines.finish()
    assert written[0] == "  qat int8: step 120/400 (30%) loss 0.0083 elapsed 0:30 eta 1:10"
    assert [int(m["step"]) for m in map(LINE.match, written)] == [120, 240, 360, 400]
    assert written[-1] == "  qat int8: step 400/400 (100%) loss 0.0025 elapsed 1:40 eta 0:00"


def test_line_progress_final_line_is_not_repeated_or_invented():
    clock, written = FakeClock(), []
    lines = LineProgress("x", total_steps=2, interval_s=0.0, clock=clock, write=written.append)
    lines.update(1, 0.5)
    lines.update(2, 0.25)
    lines.finish()  # step 2 was just printed
    assert [m["step"] for m in map(LINE.match, written)] == ["1", "2"]
    never = LineProgress("x", total_steps=2, interval_s=0.0, clock=clock, write=written.append)
    never.finish()  # no step ran: nothing to report
    assert len(written) == 2


def test_formatting():
    assert [format_duration(s) for s in (0, 0.4, 41, 59.6, 95, 3599, 3600, 3725.2)] == \
        ["0:00", "0:00", "0:41", "1:00", "1:35", "59:59", "1:00:00", "1:02:05"]
    # ETA from the mean rate so far: 120 steps in 41 s, 280 to go
    assert progress_line("prune", 120, 400, 0.43121, 41.0) == \
        "  prune: step 120/400 (30%) loss 0.4312 elapsed 0:41 eta 1:36"


# ----------------------------------------------------------------------------- the CLI
RECIPE = """\
name: progress
model: {source: vit-tiny-digits}
train: {steps: 4, batch_size: 16}
stages: [{kind: finetune}]
"""


def test_cli_run_logs_progress_lines_inside_each_stage_and_none_with_quiet(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    proc = run_cli("run", "r.yaml", "--out", "run", cwd=tmp_path, env={INTERVAL_ENV: "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr.splitlines()
    start = err.index("› stage 0 (finetune): running")
    assert err[start + 1:start + 5] == [ln for ln in err if LINE.match(ln)]  # in the stage, before its result
    assert [LINE.match(ln)["step"] for ln in err[start + 1:start + 5]] == ["1", "2", "3", "4"]
    assert err[start + 5].startswith("› stage 0 (finetune): accuracy")
    assert not any(LINE.match(ln) for ln in proc.stdout.splitlines())  # stdout stays for results

    quiet = run_cli("run", "r.yaml", "--out", "run", "--force", "--quiet", cwd=tmp_path, env={INTERVAL_ENV: "0"})
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]
