# The README's two commands: `make demo` and `make test`. Both create .venv and install edgeprep first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip

.PHONY: venv emu-tools devices demo test bench clean

venv: $(VENV)/.installed

# QEMU user mode and mmdebstrap (Debian packages): the quickstart proves its int8 artifact on
# emulated CPU families (emu://x86-avx2, emu://arm64-a76, ...); `edgeprep devices setup` then
# caches the arm64 root and wheels under ~/.cache/edgeprep/emu on first use.
emu-tools:
	@command -v qemu-x86_64-static >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 || { \
	  s=""; [ "$$(id -u)" = 0 ] || s=sudo; export DEBIAN_FRONTEND=noninteractive; \
	  $$s apt-get install -y -q qemu-user-static mmdebstrap >/dev/null \
	  || { $$s apt-get update -q >/dev/null && $$s apt-get install -y -q qemu-user-static mmdebstrap >/dev/null; }; }

# Re-install only when the packaging inputs change. constraints.txt pins the CPU torch build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt -e '.[dev,coreml,executorch,litert,litert-convert,hf]'
	touch $@

# The emulated families' QEMU, arm64 root and aarch64 wheels, from Debian and PyPI, cached once
# (~350 MB under ~/.cache/edgeprep/emu): set-up, so no test or demo step fetches anything itself.
devices: venv emu-tools
	$(BIN)/edgeprep devices setup

demo: devices
	$(BIN)/edgeprep run recipes/quickstart.yaml --force

test: devices
	$(BIN)/ruff check edgeprep exporters tests benchmarks runtime_tests examples
	$(BIN)/python -m pytest tests --durations=25

bench: devices
	$(BIN)/python benchmarks/quickstart.py
	$(BIN)/python benchmarks/ptq_table.py
	$(BIN)/python benchmarks/profile_repeatability.py
	$(BIN)/python benchmarks/prune_table.py   # ~50 min on 2 cores: 3 seeds x 4 pruning variants
	$(BIN)/python benchmarks/qat_table.py     # ~50 min on 2 cores: 3 seeds x (int8 QAT + ternary TI-G vs KD-QAT)
	$(BIN)/python benchmarks/reparam_table.py # ~45 min on 2 cores: 3 seeds x (4 norms from scratch + 2 conversions)
	$(BIN)/python benchmarks/attention_latency.py
	$(BIN)/python benchmarks/binarize_table.py # ~60-80 min on 2 cores: 3 seeds x W1A1 with / without estimators
	$(BIN)/python benchmarks/reparam_executorch.py
	$(BIN)/python benchmarks/targets_table.py  # ~6 min: vit-bench on every target, fp32 and int8
	$(BIN)/python benchmarks/remote_profile.py # ~8 min: here vs a loopback sshd "device" (needs openssh-server)
	$(BIN)/python benchmarks/minilm_edge.py    # ~20 min: recipes/minilm-edge.yaml + its artifact vs the ORT peers
	$(BIN)/python benchmarks/cpu_families.py   # ~60 min: int8 forms on native + 5 emulated CPU families

clean:
	rm -rf $(VENV) runs build dist *.egg-info
