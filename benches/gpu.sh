#!/usr/bin/env bash
# GPU checks and measurements on a fresh CUDA machine (under 8 minutes on an H100):
# the CUDA tests of the transformers backend and the parallel trie, the vLLM tests
# when vLLM is installed there, then the SIS benchmark (N = 64 and 256 particles x 64
# tokens, SmolLM2-135M's shape and a ~1B Llama, random weights) in tokens/s.
#
# The machine needs torch with CUDA, transformers, tokenizers, numpy and anyio; it
# fetches nothing. Prepare here with `make gpu-assets` (the SmolLM2 tokenizer into
# .gpu-assets/) and send the working tree with .gpu-assets and the built extension
# src/genlm_anyio/_core.abi3.so (the abi3 build loads on Python 3.9+). Then, there:
#
#     bash benches/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export GENLM_ANYIO_TOKENIZER=${GENLM_ANYIO_TOKENIZER:-$PWD/.gpu-assets/smollm2-tokenizer}
export PYTHONPATH="$PWD/src:$PWD/scripts:$PWD/benches${PYTHONPATH:+:$PYTHONPATH}"

$PY - <<'PYEOF'
import torch, genlm_anyio, genlm_anyio._core
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"== {torch.cuda.get_device_name()}, torch {torch.__version__}, genlm-anyio {genlm_anyio.__version__}", flush=True)
PYEOF

echo "== CUDA tests"
$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
if $PY -c "import vllm" 2>/dev/null; then
    echo "== vLLM tests"
    $PY -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm.py
else
    echo "== vLLM tests: skipped, vllm is not installed on this machine"
fi

echo "== SIS benchmark"
timeout 330 $PY benches/gpu_sis.py --tokenizer "$GENLM_ANYIO_TOKENIZER" --device cuda --sizes "${SIZES:-64x64,256x64}"
