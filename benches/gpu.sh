#!/usr/bin/env bash
# GPU checks and measurements on a fresh CUDA machine: the CUDA tests of the
# transformers backend and the parallel trie, the vLLM tests and checks when vLLM
# is installed there, the SIS benchmark (N = 64 and 256 particles x 64 tokens,
# SmolLM2-135M's shape and a ~1B Llama, random weights) in tokens/s, then the
# workload benchmark (benches/bench_workloads.py) at GPU sizes: 256 particles x 32
# tokens after 16- and 4,096-token prompts on the random-weight 1B Llama, beside the
# hand-written loop, and vLLM's LLM.generate and genlm-backend where installed.
# Results go to $OUT (or /tmp/): vllm-gpu.json and workloads-gpu.json.
#
# The whole script ends within GPU_BUDGET_S seconds (default 540, inside a 10-minute
# device call): each part runs under its own limit, cut to what is left of the
# budget, and a part that reaches its limit keeps the rows it measured (the
# benchmarks write them when a timeout stops them) and the next part runs. Name
# parts to run only those (a rerun of what did not finish):
#
#     bash benches/gpu.sh [tests] [vllm] [sis] [workloads]
#
# It exits 1 if a part failed or was stopped, naming them. The machine needs torch
# with CUDA, transformers, tokenizers, numpy and anyio; it fetches nothing. Prepare
# here with `make gpu-assets` (the SmolLM2 tokenizer into .gpu-assets/) and send the
# working tree with .gpu-assets and the built extension src/genlm_anyio/_core.abi3.so
# (the abi3 build loads on Python 3.9+).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export GENLM_ANYIO_TOKENIZER=${GENLM_ANYIO_TOKENIZER:-$PWD/.gpu-assets/smollm2-tokenizer}
export PYTHONPATH="$PWD/src:$PWD:$PWD/benches${PYTHONPATH:+:$PYTHONPATH}"

$PY - <<'PYEOF'
import torch, genlm_anyio, genlm_anyio._core
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"== {torch.cuda.get_device_name()}, torch {torch.__version__}, genlm-anyio {genlm_anyio.__version__}", flush=True)
PYEOF

budget=${GPU_BUDGET_S:-540}
parts=" ${*:-tests vllm sis workloads} "
failed=()

# part NAME SECONDS COMMAND...: run COMMAND if NAME was asked for, under the smaller
# of SECONDS and what is left of the budget; a failure is noted and the script goes on.
part() {
    local name=$1 limit=$2 left status=0
    shift 2
    [[ $parts == *" $name "* ]] || return 0
    left=$((budget - SECONDS))
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        echo "== $name: not run, ${left}s left of the ${budget}s budget"
        failed+=("$name (no time left)")
        return 0
    fi
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@" || status=$?
    if ((status != 0)); then
        echo "== $name: $([[ $status == 124 ]] && echo "stopped at its limit" || echo "failed, exit $status")"
        failed+=("$name (exit $status)")
    fi
}

part tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
if $PY -c "import vllm" 2>/dev/null; then
    # The vLLM tests that need no model weights (the SmolLM2 weights do not travel):
    # the V2 logits processor, the processor and engine-process choice, the vLLM names used.
    part vllm 60 $PY -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm_capture.py tests/test_vllm_internals.py
    # End to end on a random-weight model of SmolLM2's shape, the engine core in this process
    # (vLLM's V2 model runner): the capture found, no row crossing a process, captured rows
    # equal to logprobs=-1's within 1e-6; then SIS at 256 x 64 beside LLM.generate in its own
    # process on the same model (both engines share the GPU: 0.4 of its memory each; with the
    # multiprocess engine named, a second LLM.generate engine runs too, and each gets 0.3).
    engines=${VLLM_ENGINES:-in-process}
    share=0.4
    [[ $engines == *multiprocess* ]] && share=0.3
    part vllm 240 $PY benches/bench_vllm.py --check --model random:smollm2 --tokenizer "$GENLM_ANYIO_TOKENIZER" \
        --engines "$engines" --sizes "${VLLM_SIZES:-256x64}" --dtype bfloat16 --block-size 16 \
        --engine "{\"gpu_memory_utilization\": $share}" --out "${VLLM_RESULTS:-${OUT:-/tmp}/vllm-gpu.json}"
elif [[ $parts == *" vllm "* ]]; then
    echo "== vllm: skipped, vllm is not installed on this machine"
fi

part sis 150 $PY benches/gpu_sis.py --tokenizer "$GENLM_ANYIO_TOKENIZER" --device cuda --sizes "${SIZES:-64x64,256x64}"

systems=genlm-anyio,hf-loop
$PY -c "import genlm.backend" 2>/dev/null && systems=$systems,genlm-backend,genlm-backend-n
$PY -c "import vllm" 2>/dev/null && systems=$systems,vllm
part workloads 420 $PY benches/bench_workloads.py --model random:llama-1b --tokenizer "$GENLM_ANYIO_TOKENIZER" \
    --device cuda --dtype bfloat16 --grid "${GRID:-16x256,4096x256}" --tokens 32 --control "" \
    --systems "$systems" --max-kv-gb 60 --vllm-engine '{"gpu_memory_utilization": 0.5}' \
    --out "${RESULTS:-${OUT:-/tmp}/workloads-gpu.json}"

echo "== done in ${SECONDS}s"
if ((${#failed[@]})); then
    echo "== not complete: ${failed[*]}"
    exit 1
fi
