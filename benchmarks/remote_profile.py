"""On-device profiling over SSH vs profiling here, on the same machine (issue 9's sanity check).

A vit-bench recipe (finetune, then ONNX + ORT static PTQ, LiteRT + int8, ExecuTorch) runs once with
a loopback "device" in validate.devices: a real OpenSSH server started by this script on 127.0.0.1
with a key made for it (tests/conftest.py, start_sshd), or --device with your own board. Then --rounds
interleaved rounds profile every artifact here (`edgeprep profile`'s code path) and on the device
(`edgeprep profile --device`). On loopback the device is this machine, so its p50 should equal the
local p50 within noise and its parity should equal the host's: a check that the standalone runner
measures what the host measures. Also reported: the wall time of one remote profile (connect, copy,
load, run the reference inputs, time --iters calls, clean up) and the runner's peak RSS.

    .venv/bin/python benchmarks/remote_profile.py [--rounds 5] [--iters 200]
    .venv/bin/python benchmarks/remote_profile.py --device ssh://pi@raspberrypi.local --identity ~/.ssh/id_ed25519 \\
        --remote-python '~/ep/bin/python'
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # conftest.start_sshd: the loopback sshd the tests use

from ptq_table import cpu_name  # noqa: E402  (sibling script: benchmarks/ is on sys.path)

from edgeprep.fsutil import write_text_atomic  # noqa: E402
from edgeprep.remote.profile import profile_artifact_on_device  # noqa: E402
from edgeprep.remote.ssh import Device  # noqa: E402
from edgeprep.validate import profile_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "remote_profile.md"
RECIPE = """\
name: remote-bench
seed: 0
model: {{source: vit-bench}}
data: {{source: digits32, calibration_samples: 128}}
train: {{steps: 150, batch_size: 64, lr: 0.001, warmup_steps: 15}}
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
  parity_samples: 1000           # the whole test split (270 images): the device's metric covers what the host's does
  profile: {{warmup: 20, iters: {iters}}}
  devices:
    - {device}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--device", help="ssh://user@host[:port] (default: a loopback sshd started here)")
    ap.add_argument("--identity")
    ap.add_argument("--remote-python", default=None)
    ap.add_argument("--known-hosts")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="edgeprep-remote-bench-"))
    server = None
    if args.device is None:
        from conftest import start_sshd

        server = start_sshd(work / "sshd")
        device = Device(url=server.url, name="loopback", identity=server.user_key, known_hosts=server.known_hosts,
                        remote_python=sys.executable)
    else:
        device = Device(url=args.device, name="device", identity=Path(args.identity) if args.identity else None,
                        known_hosts=Path(args.known_hosts) if args.known_hosts else None,
                        remote_python=args.remote_python or "python3")
    try:
        fields = {"url": device.url, "name": device.name, "remote_python": device.remote_python,
                  "identity": str(device.identity) if device.identity else None,
                  "known_hosts": str(device.known_hosts) if device.known_hosts else None}
        (work / "r.yaml").write_text(RECIPE.format(iters=args.iters, device=json.dumps(fields)))
        proc = subprocess.run([sys.executable, "-m", "edgeprep", "run", "r.yaml", "--out", "run", "--quiet"],
                              cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"recipe failed: {proc.stderr[-2000:]}")
        report = json.loads((work / "run" / "report.json").read_text())
        rows = measure(report, work, device, args)
    finally:
        if server is not None:
            server.kill_all()
    text = render(report, rows, device, args, time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def measure(report: dict, work: Path, device: Device, args) -> list[dict]:
    rows = []
    arts = report["artifacts"]
    samples = {a["name"]: {"host": [], "device": [], "wall_s": [], "peak": []} for a in arts}
    for _ in range(args.rounds):
        for a in arts:  # interleaved: here, then the device, artifact by artifact
            path = (work / a["path"]).parent  # report paths are relative to the run's cwd
            _, stats = profile_path(path, warmup=20, iters=args.iters, threads=1, batch=1)
            samples[a["name"]]["host"].append(stats.p50_ms)
            t0 = time.perf_counter()
            _, entry = profile_artifact_on_device(path, device, warmup=20, iters=args.iters, threads=1, batch=1)
            samples[a["name"]]["wall_s"].append(time.perf_counter() - t0)
            samples[a["name"]]["device"].append(entry["latency_ms"]["p50"])
            samples[a["name"]]["peak"].append(entry["memory"]["peak_rss_bytes"])
    for a in arts:
        s = samples[a["name"]]
        d = a["devices"][0]
        host_p50, dev_p50 = statistics.median(s["host"]), statistics.median(s["device"])
        rows.append({"name": a["name"], "runtime": a["runtime"], "host_p50": host_p50, "device_p50": dev_p50,
                     "ratio": dev_p50 / host_p50, "wall_s": statistics.median(s["wall_s"]),
                     "peak_mib": max(s["peak"]) / 2**20, "host_parity": a["parity"], "device_parity": d["parity"],
                     "host_metric": a["metric"]["value"], "device_metric": d["metric"]["value"],
                     "device_speedup": d.get("speedup"), "description": d["description"]})
    return rows


def render(report: dict, rows: list[dict], device: Device, args, seconds: float) -> str:
    desc = rows[0]["description"]
    lines = [
        "# On-device profiling over SSH vs here",
        "",
        f"Command: `.venv/bin/python benchmarks/remote_profile.py --rounds {args.rounds} --iters {args.iters}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Host: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Device {device.label} ({device.url}): {desc['cpu']}, {desc['cores']} cores, "
        f"{desc['os']}. Wall time: {seconds / 60:.1f} min. 1-minute load average at the end: {os.getloadavg()[0]:.2f}.  ",
        f"vit-bench finetuned 150 steps; batch 1, 1 thread; p50 = median of {args.rounds} interleaved per-round p50s "
        f"of {args.iters} calls; parity and metric over the whole test split (270 images), here and on the device.",
        "",
        "| artifact | runtime | here p50 (ms) | device p50 (ms) | device / here | SQNR dB here / device | "
        "top-1 agree here / device | accuracy here / device | speedup on device | one remote profile (s) | "
        "device peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hp, dp = r["host_parity"], r["device_parity"]
        lines.append(
            f"| {r['name']} | {r['runtime']} | {r['host_p50']:.3f} | {r['device_p50']:.3f} | {r['ratio']:.3f} | "
            f"{hp['sqnr_db']:.1f} / {dp['sqnr_db']:.1f} | {hp['top1_agreement']:.4f} / {dp['top1_agreement']:.4f} | "
            f"{r['host_metric']:.4f} / {r['device_metric']:.4f} | "
            f"{'-' if r['device_speedup'] is None else format(r['device_speedup'], '.2f') + 'x'} | "
            f"{r['wall_s']:.1f} | {r['peak_mib']:.0f} |")
    lines += ["", "Parity: against the fp32 PyTorch model's outputs stored in each manifest. Speedup on device: against "
              "the fp32 artifact of the same export entry, both measured on the device during the recipe run."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
