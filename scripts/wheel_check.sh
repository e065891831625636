#!/usr/bin/env bash
# The wheel is the product: build the abi3 wheel as a release does (manylinux2014,
# linked through zig against glibc 2.17, so that pip takes it on RHEL/Rocky 8 and
# Ubuntu 20.04; maturin's own audit must accept it), install it into a new, empty
# virtual environment with only its declared dependencies (plus the local CPU
# torch wheel and the `trio` extra), and use it there the way a user would, from
# a directory outside this repository. An import the package needs but does not
# declare fails here, and nowhere else. The seed examples and the demo command
# run here and only here (`make demo` runs the examples from the source tree).
#
#     bash scripts/wheel_check.sh        # VENV (default .venv) provides maturin, ziglang and the assets
#
# Prints "wheel check: OK ..." last and exits 0, or "wheel check: FAILED ..." and non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
DEV_PY="$VENV/bin/python"
MATURIN=${MATURIN:-$VENV/bin/maturin}
# The CPU build; any other torch spec downloads the newest CUDA build (several GB).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# The oldest glibc the wheel supports: manylinux2014 is glibc 2.17.
COMPATIBILITY=${COMPATIBILITY:-manylinux2014}

started=$SECONDS
step="start"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/genlm-anyio-wheel.XXXXXX")
finish() {
    rc=$?
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ]; then
        echo "wheel check: OK ($(basename "${WHEEL:-?}"), $((SECONDS - started)) s)"
    else
        echo "wheel check: FAILED at step '$step' (exit $rc, $((SECONDS - started)) s)"
    fi
}
trap finish EXIT
log() {
    step=$1
    printf '\033[1m[wheel +%ss]\033[0m %s\n' "$((SECONDS - started))" "$1"
}

log "the SmolLM2 folder (assets cache)"
MODEL=$("$DEV_PY" -m tools.assets smollm2 | tail -n 1)
[ -d "$MODEL" ] || { echo "no model folder at '$MODEL'"; exit 1; }

log "build the abi3 wheel with maturin: $COMPATIBILITY, linked by zig, audited by maturin"
# maturin finds zig as `python3 -m ziglang`: the development environment's python3.
PATH="$PWD/$VENV/bin:$PATH" "$MATURIN" build --release --quiet --zig --compatibility "$COMPATIBILITY" \
    --auditwheel check -o "$WORK/dist"
wheels=("$WORK"/dist/genlm_anyio-*-abi3-*.whl)
[ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] || { echo "expected one abi3 wheel, found: ${wheels[*]}"; exit 1; }
WHEEL=${wheels[0]}

log "the wheel's platform tag, and the glibc symbol versions its extension needs"
# Independently of maturin's audit: the tag names the policy, and every GLIBC_x.y
# symbol version the extension links against is at most the policy's glibc.
"$DEV_PY" - "$WHEEL" "$COMPATIBILITY" <<'EOF'
import re, subprocess, sys, tempfile, zipfile
wheel, policy = sys.argv[1], sys.argv[2]
glibc = (2, 17) if policy == "manylinux2014" else tuple(map(int, re.fullmatch(r"manylinux_(\d+)_(\d+)", policy).groups()))
tags = wheel[: -len(".whl")].rsplit("-", 1)[1].split(".")
print("platform tags:", ", ".join(tags))
versions = [tuple(map(int, m.groups())) for t in tags if (m := re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", t))]
assert versions and max(versions) <= glibc, f"{tags}: not {policy} (glibc {glibc})"
with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
    so = [n for n in zf.namelist() if re.search(r"/_core[^/]*\.so$", n)]
    assert len(so) == 1, zf.namelist()
    symbols = subprocess.run(["objdump", "-T", zf.extract(so[0], tmp)], capture_output=True, text=True, check=True).stdout
needed = max(tuple(map(int, v.split("."))) for v in re.findall(r"\bGLIBC_([0-9.]+)", symbols))
assert needed <= glibc, f"the extension needs glibc {needed}, newer than {policy}'s {glibc}"
print(f"the extension needs glibc {'.'.join(map(str, needed))} at most ({policy}: {'.'.join(map(str, glibc))})")
EOF

log "a new, empty virtual environment"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"

log "install $TORCH_SPEC, then the wheel with its declared dependencies and the trio extra"
"$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q "$WHEEL[trio]"
"$PY" -m pip check

# Everything below runs outside the repository, so only the installed wheel is importable.
RUN="$WORK/run"
mkdir -p "$RUN"
cp examples/seed_example.py examples/seed_example_trio.py "$RUN/"
cd "$RUN"

log "import the package (the installed one, not the source tree)"
"$PY" - "$WORK/venv" <<'EOF'
import sys
import genlm_anyio, genlm_anyio.vocab, genlm_anyio.trie
assert genlm_anyio.__file__.startswith(sys.argv[1]), genlm_anyio.__file__
from genlm_anyio import AsyncTransformer, ParallelTokenCharacterTrie, load_model_by_name  # noqa: F401
assert genlm_anyio.__version__ != "0+unknown"
print("genlm_anyio", genlm_anyio.__version__, "from", genlm_anyio.__file__)
EOF

for example in seed_example.py seed_example_trio.py; do
    log "run $example on SmolLM2"
    "$PY" "$example" "$MODEL" | tee "$WORK/$example.out"
    # 10 particles, each printed with its probability; the probabilities sum to 1.
    "$PY" - "$WORK/$example.out" <<'EOF'
import re, sys
probs = [float(p) for p in re.findall(r"\(probability: ([0-9.]+)\)", open(sys.argv[1]).read())]
assert len(probs) == 10, f"{len(probs)} particles printed, not 10"
assert abs(sum(probs) - 1) <= 2e-3, f"the probabilities sum to {sum(probs)}"
EOF
done

log "the genlm-anyio-demo command (the seed example's SIS), under asyncio and trio"
"$WORK/venv/bin/genlm-anyio-demo" "$MODEL" --particles 4 --max-tokens 4 | tee "$WORK/demo.out"
grep -q "== asyncio: 4 particles" "$WORK/demo.out" && grep -q "== trio: 4 particles" "$WORK/demo.out" \
    && [ "$(grep -c '(probability: ' "$WORK/demo.out")" -eq 8 ] || { echo "the demo did not print 4 particles per library"; exit 1; }

log "a vocabulary + trie round trip on SmolLM2's tokenizer"
"$PY" - "$MODEL" <<'EOF'
import sys
import numpy as np
from transformers import AutoTokenizer
from genlm_anyio import TokenCharacterTrie, decode_vocab

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
byte_vocab, str_vocab = decode_vocab(tokenizer)
assert len(byte_vocab) == len(str_vocab) == len(tokenizer)
ids = tokenizer.encode("Montreal is a city")
assert b"".join(byte_vocab[i] for i in ids) == b"Montreal is a city"
trie = TokenCharacterTrie(byte_vocab)
ws = np.random.default_rng(0).random(len(byte_vocab))
masses = trie.weight_sum(ws)
for prefix in (b"M", b"Mon", b" city", byte_vocab[ids[0]]):
    node = trie.node_of(prefix)
    assert node is not None, prefix
    expected = sum(w for t, w in zip(byte_vocab, ws) if t.startswith(prefix))
    assert np.isclose(masses[node], expected), (prefix, masses[node], expected)
print(f"vocabulary of {len(byte_vocab)}, trie of {trie.num_nodes} nodes: masses agree")
EOF

log "the compat switch's start-up hook (GENLM_ANYIO_COMPAT=1)"
module=$(GENLM_ANYIO_COMPAT=1 "$PY" -c "from genlm.backend import Token; print(Token.__module__)")
[ "$module" = "genlm_anyio.vocab" ] || { echo "genlm.backend.Token came from '$module'"; exit 1; }
echo "genlm.backend.Token is $module's"

log "python -m genlm_anyio.compat runs an unchanged genlm-backend program"
cat >"$RUN/client.py" <<'EOF'
import sys
from transformers import AutoTokenizer
from genlm.backend import decode_vocab
from genlm.backend.trie import TokenCharacterTrie

byte_vocab, _ = decode_vocab(AutoTokenizer.from_pretrained(sys.argv[1]))
trie = TokenCharacterTrie(byte_vocab)
print(type(trie).__module__, len(byte_vocab))
EOF
out=$("$PY" -m genlm_anyio.compat client.py "$MODEL")
echo "$out"
[ "$out" = "genlm_anyio.trie.token_trie 49152" ] || { echo "unexpected output from the compat runner"; exit 1; }
step="done"
