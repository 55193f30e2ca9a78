"""Atomic writes leave files and directories with the mode a plain open() / mkdir() would give
(mkstemp / mkdtemp alone make 0600 / 0700: unreadable report files for a CI upload or a teammate)."""
from __future__ import annotations

import os
import stat

import pytest

from edgeprep.fsutil import atomic_dir, current_umask, write_json_atomic, write_text_atomic


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda m: os.umask(m)
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                        (0o077, 0o600, 0o700)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert current_umask() == mask
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "w.bin").write_bytes(b"0")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what the user's tools expect: the same as a plain open()
    assert _mode(plain) == file_mode
    assert _mode(tmp_path / "a.txt") == file_mode and _mode(tmp_path / "r.json") == file_mode
    assert _mode(tmp_path / "ckpt") == dir_mode
    assert current_umask() == mask  # reading it changed nothing


def test_a_real_run_dir_is_readable_by_others(fast_run):
    mask = current_umask()
    if mask & 0o044:
        pytest.skip(f"this test process runs with umask {mask:03o}, which itself hides files from others")
    for path in [fast_run / "report.json", fast_run / "report.md", *fast_run.glob("artifacts/*/*"),
                 *fast_run.glob("stages/*/checkpoint/*")]:
        assert _mode(path) & 0o044 == 0o044, f"{path} is {oct(_mode(path))}"
    for path in [fast_run / "artifacts", *fast_run.glob("stages/*/checkpoint")]:
        assert _mode(path) & 0o055 == 0o055, f"{path} is {oct(_mode(path))}"
