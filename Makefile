# Two commands matter: `make demo` and `make test`. Each sets up what it needs
# (idempotently: a second run skips what is in place) and then does its job.
VENV   ?= .venv
PY     := $(VENV)/bin/python
ASSETS := $(PY) scripts/assets.py

.PHONY: setup assets gpu-assets demo docs lint test test-fast test-wheel test-rust test-python test-vllm test-clients clients-reference bench soak clean

setup:
	@bash scripts/setup.sh

assets: setup
	@$(ASSETS) vocabs >/dev/null
	@$(ASSETS) tokenizers >/dev/null
	@$(ASSETS) smollm2 >/dev/null

# The seed example on the default model (SmolLM2-135M), under asyncio and trio.
demo: setup
	@model="$$($(ASSETS) smollm2)" && \
	echo "== asyncio: examples/seed_example.py" && $(PY) examples/seed_example.py "$$model" && \
	echo "== trio: examples/seed_example_trio.py" && $(PY) examples/seed_example_trio.py "$$model"

test-rust: setup
	cargo test --release --quiet
	PYO3_PYTHON=$(abspath $(PY)) cargo test --release --quiet --lib --features python py::

test-python: assets
	$(PY) -m pytest -q

# vLLM changes torch's thread settings for its whole process, and fixes its engine
# mode (in-process, or a separate engine process) once: each file in a pytest run of its own.
test-vllm: assets
	$(PY) -m pytest -q -m vllm tests/test_vllm.py
	$(PY) -m pytest -q -m vllm tests/test_vllm_process.py
	$(PY) -m pytest -q -m vllm tests/test_vllm_tp.py
	$(PY) -m pytest -q -m vllm tests/test_vllm_replicas.py

# Our users' own test suites (genlm-backend's, genlm-control's, genlm-bytes'),
# from their released sdists, on genlm-anyio through the compat switch; failures
# must be among those tests/clients/known_failures.txt lists (docs/compat.md).
test-clients: assets
	$(PY) scripts/client_suites.py
	$(PY) scripts/client_examples.py

# The same suites on genlm-backend itself, for comparison (not part of `make test`).
clients-reference: assets
	$(PY) scripts/client_suites.py --reference
	$(PY) scripts/client_examples.py --reference

# No model weights (and no vLLM): a quick check while developing.
test-fast: assets
	$(PY) -m pytest -q -m "not slow and not vllm"

# The wheel in a new, empty virtual environment with only its declared dependencies.
test-wheel: assets
	VENV=$(VENV) bash scripts/wheel_check.sh

# Quality gates: lint, format, types (the extension's stubs against the built module), Rust.
lint: setup
	$(VENV)/bin/ruff check src tests benches scripts examples
	$(VENV)/bin/ruff format --check src tests benches scripts examples
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest genlm_anyio._core
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	PYO3_PYTHON=$(abspath $(PY)) cargo clippy --release --all-targets --features python -- -D warnings

# The documentation site, into site/ (warnings are errors; the docs' code examples run in test-python).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: lint docs test-rust test-wheel test-clients test-python test-vllm

# Each benchmark prints genlm-anyio beside its reference (genlm-backend, vLLM's own
# decode loop, one replica), measured in the same run.
BENCH := PYTHONPATH=scripts $(PY)
bench: assets
	$(BENCH) benches/bench_vocab_trie.py
	$(BENCH) benches/bench_sis.py --mlx 32x32
	$(BENCH) benches/bench_vllm.py
	$(BENCH) benches/bench_replicas.py
	$(BENCH) benches/bench_control.py

# Run on a CUDA machine: `make gpu-assets` here, then benches/gpu.sh there (see the script).
gpu-assets: assets
	@$(ASSETS) gpu

# Ten minutes of SMC-like work on SmolLM2: resident memory and KV bytes over time.
soak: assets
	$(BENCH) benches/soak.py --minutes 10

clean:
	rm -rf target $(VENV) .pytest_cache site
