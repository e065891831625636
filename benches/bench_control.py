"""genlm-control workloads on SmolLM2-135M: genlm-anyio (through the compat switch) beside genlm-backend.

    PYTHONPATH=scripts python benches/bench_control.py [--workloads direct,regex,json,bytes] [--profile] [--seed S]

The workloads of ``control_workloads.py`` run twice, each time in one
subprocess that loads the model once, with the same arguments and seeds: as
``python -m genlm_anyio.compat control_workloads.py ...`` (genlm-anyio) and as
``python control_workloads.py ...`` (genlm-backend 0.3.1). The table gives the
wall time of each SMC call on both and the ratio genlm-backend / genlm-anyio,
and the counts that show the work is the same on both: LM requests, contexts
asked for, tokens generated (they differ only where floating-point
differences made a particle sample another token). ``lm busy`` is the share of the SMC call during which at least one
LM request was outstanding. ``--profile`` prints each run's cProfile summary
(the event-loop thread; genlm-anyio computes its batches on a worker thread,
so there the forward passes show up as waiting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets
from common import fmt

HERE = Path(__file__).resolve().parent
PROGRAM = HERE / "control_workloads.py"

# (particles, max_tokens) per workload: sized so that both backends together
# take about five minutes on an idle 2-core CPU (max_tokens counts bytes for
# "bytes"). genlm-backend takes most of it; JSON on it the longest.
SETTINGS = {
    "direct": (10, 20),
    "regex": (10, 30),
    "json": (2, 30),
    "bytes": (3, 4),
}
BACKENDS = {"genlm-anyio": ["-m", "genlm_anyio.compat"], "genlm-backend": []}
COUNTS = ("lm_requests", "lm_contexts", "tokens_generated")


def run_backend(backend: str, workloads: list[str], model: str, seed: int, profile: bool) -> tuple[float, dict]:
    """Run ``workloads`` in one process on ``backend``: (model load time, {workload: result})."""
    cmd = [
        sys.executable,
        *BACKENDS[backend],
        str(PROGRAM),
        model,
        *(f"{w}:{SETTINGS[w][0]}:{SETTINGS[w][1]}" for w in workloads),
        "--seed",
        str(seed),
    ]
    if profile:
        cmd.append("--profile")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"  running {', '.join(workloads)} on {backend}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"the workloads on {backend} failed (exit {proc.returncode}):\n{tail}")
    results, load_s = {}, 0.0
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "load_s" in record:
                load_s = record["load_s"]
            else:
                results[record["workload"]] = record
        elif profile:
            print(line if not line.startswith("-- cProfile") else f"\n{line} on {backend}")
    return load_s, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(SETTINGS), help="comma-separated, from " + ", ".join(SETTINGS))
    parser.add_argument("--model", default=None, help="a local model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary of every run")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in SETTINGS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(SETTINGS)}")
    model = args.model or str(assets.smollm2_dir())

    (load_ours, ours_all), (load_ref, ref_all) = (
        run_backend(b, workloads, model, args.seed, args.profile) for b in BACKENDS
    )
    print(
        f"\ngenlm-control on SmolLM2-135M (transformers backend, CPU): SMC wall time"
        f" (imports and model load: genlm-anyio {fmt(load_ours).strip()}, genlm-backend {fmt(load_ref).strip()})"
    )
    print(
        f"{'workload':8} {'N x T':>7} {'genlm-anyio':>11} {'genlm-backend':>14} {'speed-up':>9}"
        f" {'lm busy (anyio/backend)':>24}  counts (requests/contexts/tokens)"
    )
    rows = []
    for workload in workloads:
        ours, ref = ours_all[workload], ref_all[workload]
        rows.append((workload, {"genlm-anyio": ours, "genlm-backend": ref}))
        n, t = SETTINGS[workload]
        busy = f"{ours['lm_busy_s'] / ours['run_s']:.0%} / {ref['lm_busy_s'] / ref['run_s']:.0%}"
        counts = [f"{'/'.join(str(x[k]) for k in COUNTS)}" for x in (ours, ref)]
        same = "same" if counts[0] == counts[1] else "differ: the sampled paths diverged"
        print(
            f"{workload:8} {f'{n}x{t}':>7} {fmt(ours['run_s']):>11} {fmt(ref['run_s']):>14}"
            f" {ref['run_s'] / ours['run_s']:8.1f}x {busy:>24}  {counts[0]} vs {counts[1]} ({same})"
        )
    total_ours = sum(r["genlm-anyio"]["run_s"] for _, r in rows)
    total_ref = sum(r["genlm-backend"]["run_s"] for _, r in rows)
    print(f"{'total':8} {'':>7} {fmt(total_ours):>11} {fmt(total_ref):>14} {total_ref / total_ours:8.1f}x")
    e2e_ours = load_ours + sum(r["genlm-anyio"]["build_s"] for _, r in rows) + total_ours
    e2e_ref = load_ref + sum(r["genlm-backend"]["build_s"] for _, r in rows) + total_ref
    print(
        f"{'+ load':8} {'':>7} {fmt(e2e_ours):>11} {fmt(e2e_ref):>14} {e2e_ref / e2e_ours:8.1f}x"
        "  (imports, model load and sampler construction included)"
    )
    for workload, r in rows:
        print(
            f"  {workload}: most likely completion on genlm-anyio {r['genlm-anyio']['top']!r},"
            f" on genlm-backend {r['genlm-backend']['top']!r}"
        )


if __name__ == "__main__":
    main()
