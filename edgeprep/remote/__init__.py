"""Profiling on a remote device over SSH: `edgeprep profile ARTIFACT --device ssh://user@host`.

ssh.py      the device spec, the OpenSSH command line and its errors
config.py   the recipe's validate.devices entries
runner.py   the self-contained program the device runs (standard library + numpy + the runtime)
session.py  the host side of the runner's protocol: copy, run, bring back, clean up
profile.py  judging what came back: latency percentiles, memory, parity, metric
"""
