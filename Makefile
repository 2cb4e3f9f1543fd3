# edgekit developer entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS := compile,agent,tflite,dev
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma  := ,
# pytest-xdist workers: CI machines have 2 cores.
WORKERS ?= 2

.PHONY: install sysdeps arm64-sysroot demo test test-all lint bench clean

install: sysdeps $(STAMP)

# Debian tools the compile path shells out to: the aarch64 cross linker for TVM builds of ARM profiles and
# qemu-user for the emulated arm64 device. Also mosquitto, the MQTT broker `edgekit hub` embeds when no external
# broker is given (without it the hub falls back to the ~10x slower amqtt and the mosquitto tests skip).
# Installed when running as root with apt-get; otherwise the TVM candidates for ARM profiles and
# --verify-emulated report what is missing. Debian puts mosquitto in /usr/sbin, off a non-root user's PATH.
sysdeps:
	@if ! { command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64-static; } >/dev/null \
		&& command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			gcc-aarch64-linux-gnu qemu-user-static >/dev/null; \
	fi
	@if ! { command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null \
		&& command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			mosquitto mosquitto-clients >/dev/null; \
	fi

# The emulated arm64 device (Debian arm64 Python + aarch64 wheels), built once into .cache/ (~1 min, ~300 MB).
export EDGEKIT_ARM64_SYSROOT := $(CURDIR)/.cache/arm64-sysroot
arm64-sysroot: install
	$(BIN)/python -m edgekit.emulation

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgekit needs Python >= 3.10")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: install
	$(BIN)/python examples/demo.py

# Tests run with networking unavailable (tests/offline) to prove nothing downloads at run time.
test: install
	tests/offline $(BIN)/python -m pytest -m "not slow" -n $(WORKERS)

test-all: install arm64-sysroot
	tests/offline $(BIN)/python -m pytest -n $(WORKERS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/compile_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
