"""Profiling on a remote device over SSH, against a real OpenSSH server on loopback.

The "device" is this machine reached through sshd with a key made for the test; its Python is the
test's own interpreter (which has onnxruntime and ai-edge-litert) and its temp dir a folder the
test owns, so what the runner leaves behind can be checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import error_lines, run_cli, run_recipe_text, start_sshd, stop_sshd

from edgeprep.errors import BadInputError
from edgeprep.remote.ssh import Device, classify, parse_url, ssh_argv


# ----------------------------------------------------------------------------- pure units
@pytest.mark.parametrize("url,expected", [
    ("ssh://pi@raspberrypi.local", ("pi", "raspberrypi.local", None)),
    ("ssh://nvidia@10.0.0.7:2222", ("nvidia", "10.0.0.7", 2222)),
    ("ssh://jetson", (None, "jetson", None)),
])
def test_parse_url(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["pi@host", "http://host", "ssh://", "ssh://host:99999", "ssh://host/path",
                                 "ssh://u:secret@host", "ssh://-oProxyCommand=x", "ssh://-u@host"])
def test_parse_url_refuses(url):
    with pytest.raises(BadInputError, match="ssh://user@host"):
        parse_url(url)


def test_ssh_argv_verifies_host_keys_and_never_prompts(tmp_path):
    key = tmp_path / "k"
    key.write_text("x")
    argv = ssh_argv(Device(url="ssh://pi@h:2200", identity=key, known_hosts=tmp_path / "kh"), "cmd")
    assert argv[0] == "ssh" and argv[-3:] == ["--", "h", "cmd"]
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "StrictHostKeyChecking=yes" in opts and "BatchMode=yes" in opts and "IdentitiesOnly=yes" in opts
    assert f"UserKnownHostsFile={tmp_path / 'kh'}" in opts
    assert argv[argv.index("-p") + 1] == "2200" and argv[argv.index("-l") + 1] == "pi"
    accept = ssh_argv(Device(url="ssh://h", accept_new_host_key=True), "cmd")
    assert "StrictHostKeyChecking=accept-new" in accept  # records a new key, still refuses a changed one
    with pytest.raises(BadInputError, match="host-key checking"):
        Device(url="ssh://h", ssh_options=("StrictHostKeyChecking=no",))
    with pytest.raises(BadInputError, match="does not exist"):
        Device(url="ssh://h", identity=tmp_path / "missing")


@pytest.mark.parametrize("stderr,code,words", [
    ("Host key verification failed.", 2, "host key not verified"),
    ("pi@h: Permission denied (publickey).", 2, "authentication failed"),
    ("ssh: connect to host h port 22: Connection refused", 3, "connection refused"),
    ("ssh: Could not resolve hostname h: Name or service not known", 3, "host name not found"),
    ("ssh: connect to host h port 22: Connection timed out", 3, "unreachable"),
    ("Connection to h closed by remote host.", 3, "connection lost"),
])
def test_classify_openssh_messages(stderr, code, words):
    exc = classify(Device(url="ssh://h"), stderr, "connecting")
    assert exc.exit_code == code and words in str(exc) and "\n" not in str(exc)


# ----------------------------------------------------------------------------- a real sshd
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    stop_sshd(server)


def device_args(server, remote_tmp: Path, *extra: str, python: str = sys.executable) -> list[str]:
    return ["--device", server.url, "--identity", str(server.user_key), "--known-hosts", str(server.known_hosts),
            "--remote-python", python, "--remote-tmp", str(remote_tmp), *extra]


def leftovers(remote_tmp: Path, wait_s: float = 15.0) -> list[str]:
    """What the runner left in its temp dir, after giving its own cleanup ``wait_s`` to finish."""
    deadline = time.monotonic() + wait_s
    while True:
        left = sorted(p.name for p in remote_tmp.iterdir())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


DEVICE_RECIPE = """\
name: remote
seed: 0
model: {{source: vit-tiny-digits}}
data: {{source: digits, calibration_samples: 64}}
train: {{steps: 120, batch_size: 64, lr: 0.003, warmup_steps: 10}}
stages:
  - kind: finetune
export:
  - target: onnx
    ptq: [static]
  - target: litert
    int8: true
  - target: executorch
validate:
  split: test
  parity_samples: 64
  profile: {{warmup: 3, iters: 25}}
  devices:
    - url: {url}
      name: loopback
      identity: {key}
      known_hosts: {known}
      remote_python: {python}
      remote_tmp: {tmp}
"""


@pytest.fixture(scope="module")
def device_run(sshd, tmp_path_factory):
    work = tmp_path_factory.mktemp("device-run")
    remote_tmp = work / "device-tmp"
    remote_tmp.mkdir()
    text = DEVICE_RECIPE.format(url=sshd.url, key=sshd.user_key, known=sshd.known_hosts, python=sys.executable,
                                tmp=remote_tmp)
    proc = run_recipe_text(work, text, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, remote_tmp


def test_recipe_profiles_every_artifact_on_the_device(device_run):
    work, remote_tmp = device_run
    report = json.loads((work / "run" / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    assert set(arts) == {"onnx", "onnx-ptq-static", "litert", "litert-int8", "executorch"}
    for name, a in arts.items():
        [d] = a["devices"]
        assert d["device"] == "loopback" and "error" not in d, d
        lat = d["latency_ms"]
        assert lat["iters"] == 25 and lat["threads"] == 1 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert d["description"]["cores"] == os.cpu_count() and d["description"]["machine"]
        assert d["memory"]["peak_rss_bytes"] > d["memory"]["rss_before_load_bytes"] > 0
        # The device ran the same runtime on the same CPU, so its outputs are the host's outputs:
        # parity against the PyTorch reference must be the host's (ORT fp32: ~130 dB both).
        assert d["parity"]["top1_agreement"] == a["parity"]["top1_agreement"], name
        assert abs(d["parity"]["sqnr_db"] - a["parity"]["sqnr_db"]) < 0.5, (name, d["parity"], a["parity"])
        assert d["metric"]["samples"] == 64
    assert arts["onnx"]["devices"][0]["parity"]["sqnr_db"] > 100
    assert arts["litert-int8"]["devices"][0]["runtime"]["package"] == "ai-edge-litert"
    import onnxruntime

    assert arts["onnx"]["devices"][0]["runtime"]["version"] == onnxruntime.__version__
    assert arts["onnx"]["devices"][0]["speedup"] == pytest.approx(1.0)  # the fp32 reference itself
    assert arts["litert-int8"]["devices"][0]["speedup"] > 0
    md = (work / "run" / "report.md").read_text()
    assert "On-device profiles (SSH)" in md and "loopback (ssh://" in md
    assert "On-device profiles (SSH)" in (work / "run" / "report.html").read_text()
    assert leftovers(remote_tmp) == []


def test_cli_profile_artifact_dir_on_device(device_run, sshd, tmp_path):
    work, _ = device_run
    proc = run_cli("profile", str(work / "run" / "artifacts" / "litert-int8"), "--iters", "30", "--json",
                   *device_args(sshd, tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["latency_ms"]["iters"] == 30 and out["latency_ms"]["batch"] == 1
    # the int8 model's parity with the fp32 PyTorch reference, on the device and as the run judged it here
    report = json.loads((work / "run" / "report.json").read_text())
    host = next(a for a in report["artifacts"] if a["name"] == "litert-int8")["parity"]
    assert out["parity"]["top1_agreement"] == host["top1_agreement"] and out["parity"]["sqnr_db"] > 10
    assert abs(out["parity"]["sqnr_db"] - host["sqnr_db"]) < 0.5
    assert leftovers(tmp_path) == []
    text = run_cli("profile", str(work / "run" / "artifacts" / "onnx"), "--iters", "20", *device_args(sshd, tmp_path))
    assert text.returncode == 0 and "p50" in text.stdout and "parity on the device" in text.stdout


def test_bare_model_file_is_timed_without_parity(device_run, sshd, tmp_path):
    work, _ = device_run
    proc = run_cli("profile", str(work / "run" / "artifacts" / "onnx" / "model.onnx"), "--iters", "10", "--json",
                   *device_args(sshd, tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["parity"] is None and out["latency_ms"]["iters"] == 10


# ----------------------------------------------------------------------------- failures
def _onnx_dir(device_run) -> str:
    return str(device_run[0] / "run" / "artifacts" / "onnx")


def test_unknown_host_key_is_refused_then_accepted_on_request(device_run, sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    args = ["--device", sshd.url, "--identity", str(sshd.user_key), "--known-hosts", str(empty),
            "--remote-python", sys.executable, "--remote-tmp", str(tmp_path), "--iters", "5"]
    proc = run_cli("profile", _onnx_dir(device_run), *args)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1
    assert "host key not verified" in proc.stderr and "--accept-new-host-key" in proc.stderr
    assert empty.read_text() == ""  # nothing recorded without asking
    ok = run_cli("profile", _onnx_dir(device_run), *args, "--accept-new-host-key")
    assert ok.returncode == 0, ok.stderr
    assert sshd.host_pub.split()[1] in empty.read_text()  # recorded, and verified from now on


def test_changed_host_key_is_refused_even_with_accept_new(device_run, sshd, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(Path(str(other) + '.pub').read_text().split()[:2])}\n")
    proc = run_cli("profile", _onnx_dir(device_run), "--device", sshd.url, "--identity", str(sshd.user_key),
                   "--known-hosts", str(wrong), "--accept-new-host-key", "--remote-tmp", str(tmp_path))
    assert proc.returncode == 2 and "host key not verified" in proc.stderr and len(error_lines(proc)) == 1


def test_wrong_key_is_an_authentication_error(device_run, sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    proc = run_cli("profile", _onnx_dir(device_run), "--device", sshd.url, "--identity", str(stranger),
                   "--known-hosts", str(sshd.known_hosts))
    assert proc.returncode == 2 and "authentication failed" in proc.stderr and len(error_lines(proc)) == 1


def test_unreachable_port_is_exit_3(device_run, sshd, tmp_path):
    from conftest import _free_port

    proc = run_cli("profile", _onnx_dir(device_run), "--device", f"ssh://{sshd.user}@127.0.0.1:{_free_port()}",
                   "--identity", str(sshd.user_key), "--known-hosts", str(sshd.known_hosts))
    assert proc.returncode == 3 and "connection refused" in proc.stderr and len(error_lines(proc)) == 1


def test_missing_runtime_on_the_device_names_what_to_install(device_run, sshd, tmp_path):
    # -S: the same interpreter without site-packages, i.e. a device Python with no numpy or onnxruntime
    proc = run_cli("profile", _onnx_dir(device_run), *device_args(sshd, tmp_path, python=f"{sys.executable} -S"))
    assert proc.returncode == 4 and len(error_lines(proc)) == 1
    assert "cannot be imported" in proc.stderr and "pip install onnxruntime" in proc.stderr
    assert leftovers(tmp_path) == []


def test_timeout_is_exit_3_and_the_device_is_cleaned(device_run, sshd, tmp_path):
    proc = run_cli("profile", _onnx_dir(device_run), "--iters", "100000000", "--timeout", "8",
                   *device_args(sshd, tmp_path))
    assert proc.returncode == 3 and "timed out" in proc.stderr and len(error_lines(proc)) == 1
    assert leftovers(tmp_path) == []  # the runner saw the connection end and removed its dir


def _load_onnx(device_run):
    from edgeprep.manifest import load_artifact, load_reference

    path = Path(_onnx_dir(device_run))
    return load_artifact(path), load_reference(path)


def test_server_killed_mid_run(device_run, tmp_path):
    """The device dies while measuring: a one-line connection error, exit 3, and the runner on the
    device removes its work dir (it notices its stdin close when sshd goes)."""
    from edgeprep.remote.profile import device_entry
    from edgeprep.remote.ssh import DeviceUnreachableError

    server = start_sshd(tmp_path / "dying-sshd")
    remote_tmp = tmp_path / "device-tmp"
    remote_tmp.mkdir()
    art, ref = _load_onnx(device_run)
    seen = []

    def on_event(msg: str) -> None:
        seen.append(msg)
        if msg.endswith("measuring"):
            assert len(list(remote_tmp.iterdir())) == 1  # the work dir exists, the artifact in it
            server.kill_all()

    dev = Device(url=server.url, identity=server.user_key, known_hosts=server.known_hosts,
                 remote_python=sys.executable, remote_tmp=str(remote_tmp), timeout_s=120)
    try:
        with pytest.raises(DeviceUnreachableError) as info:
            device_entry(art, dev, ref_inputs=ref.inputs, ref_outputs=ref.outputs[0], labels=None, task=None,
                         warmup=0, iters=10**8, threads=1, batch=1, log=on_event)
    finally:
        stop_sshd(server)
    assert any(m.endswith("measuring") for m in seen)
    assert info.value.exit_code == 3 and "connection lost" in str(info.value) and "\n" not in str(info.value)
    assert leftovers(remote_tmp) == []


# Runs the runner's bootstrap after arming a timer that SIGKILLs the process: a runner that dies on
# the device without its own clean-up (the OOM killer, a crash in the runtime).
SELF_KILLING_PYTHON = ("import os, signal, sys, threading; "
                       "threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGKILL)).start(); "
                       "src = sys.argv[3]; sys.argv = ['-c'] + sys.argv[4:]; exec(src)")


def test_runner_killed_on_the_device_is_cleaned_from_the_host(device_run, sshd, tmp_path):
    import shlex

    python = f"{sys.executable} -c {shlex.quote(SELF_KILLING_PYTHON)}"
    proc = run_cli("profile", _onnx_dir(device_run), "--iters", "100000000", *device_args(sshd, tmp_path, python=python))
    assert proc.returncode == 3 and len(error_lines(proc)) == 1, proc.stderr
    # OpenSSH exits 255 without a word when the remote command dies of a signal
    assert "the runner was killed on the device" in proc.stderr and "; removed " in proc.stderr
    assert leftovers(tmp_path, wait_s=0) == []  # removed by the host's second connection, not by the runner


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 4 MiB file system for the device's temp dir (needs root to mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (the disk-full tests)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_before_copying(device_run, sshd, tiny_tmpfs):
    filler = tiny_tmpfs / "filler"
    filler.write_bytes(b"\0" * (3 << 20))  # 1 MiB left: less than the artifact plus margin
    proc = run_cli("profile", _onnx_dir(device_run), *device_args(sshd, tiny_tmpfs))
    assert proc.returncode == 3 and len(error_lines(proc)) == 1
    assert "bytes free" in proc.stderr and "--remote-tmp" in proc.stderr
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["filler"]


def test_disk_full_while_copying(device_run, sshd, tiny_tmpfs):
    """Space checked, then taken by something else before the copy: the write fails with ENOSPC on
    the device, and the half-written file goes with the work dir."""
    from edgeprep.remote.profile import device_entry
    from edgeprep.remote.session import DeviceDiskFullError

    art, ref = _load_onnx(device_run)

    def fill_on_hello(msg: str) -> None:
        if msg.endswith("hello"):
            with open(tiny_tmpfs / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass

    dev = Device(url=sshd.url, identity=sshd.user_key, known_hosts=sshd.known_hosts, remote_python=sys.executable,
                 remote_tmp=str(tiny_tmpfs))
    with pytest.raises(DeviceDiskFullError) as info:
        device_entry(art, dev, ref_inputs=ref.inputs, ref_outputs=ref.outputs[0], labels=None, task=None,
                     warmup=0, iters=5, threads=1, batch=1, log=fill_on_hello)
    assert info.value.exit_code == 3 and "No space left" in str(info.value)
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["filler"]


def test_recipe_device_error_keeps_the_report(sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    text = DEVICE_RECIPE.format(url=sshd.url, key=stranger, known=sshd.known_hosts, python=sys.executable,
                                tmp=tmp_path).replace("steps: 120", "steps: 20").replace(
        "  - target: litert\n    int8: true\n  - target: executorch\n", "")
    proc = run_recipe_text(tmp_path, text, "--quiet")
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "authentication failed" in proc.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["passed"] is False
    for a in report["artifacts"]:
        assert a["latency_ms"]["p50"] > 0  # the host's measurements are all there
        assert "authentication failed" in a["devices"][0]["error"] and a["devices"][0]["exit_code"] == 2
    # the device is tried once, not once per artifact
    assert [a["devices"][0]["error"].startswith("not tried") for a in report["artifacts"]] == [False, True]
    assert "on-device profile(s) failed" in (tmp_path / "run" / "report.md").read_text()


def test_recipe_refuses_bad_device_url(tmp_path):
    text = DEVICE_RECIPE.format(url="pi@host", key="k", known="kh", python="python3", tmp="/tmp")
    proc = run_recipe_text(tmp_path, text)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1
    assert "validate.devices.0.url" in proc.stderr and "ssh://user@host" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_recipe_missing_key_file_fails_before_training(tmp_path):
    text = DEVICE_RECIPE.format(url="ssh://pi@raspberrypi.local", key="no-such-key", known="kh", python="python3",
                                tmp="/tmp")
    proc = run_recipe_text(tmp_path, text)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any stage ran or anything was written


def test_outputs_roundtrip_exactly(device_run, sshd, tmp_path):
    """The outputs that come back are the device's bytes: identical to running the same artifact
    with the same runtime here (same CPU, same ORT build)."""
    from edgeprep.remote.session import run_on_device
    from edgeprep.validate import load_runtime, run_batched

    art, ref = _load_onnx(device_run)
    x = ref.inputs[0][:37]
    dev = Device(url=sshd.url, identity=sshd.user_key, known_hosts=sshd.known_hosts, remote_python=sys.executable,
                 remote_tmp=str(tmp_path))
    res = run_on_device(art, dev, [x], warmup=0, iters=5, threads=1, batch=1)
    local = run_batched(load_runtime(art), x)
    assert res.outputs[0].dtype == local.dtype and res.outputs[0].shape == (37, 10)
    np.testing.assert_array_equal(res.outputs[0], local)
    assert res.cleaned and leftovers(tmp_path) == []
