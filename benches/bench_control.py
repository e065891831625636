"""genlm-control workloads on SmolLM2-135M: genlm-anyio (through the compat switch) beside genlm-backend.

    PYTHONPATH=. python benches/bench_control.py [--workloads direct,regex,json,bytes] [--repeats 3]
        [--profile] [--seed S]

The workloads of ``control_workloads.py`` run in two processes that each load
the model once and stay up: ``python -m genlm_anyio.compat control_workloads.py``
(genlm-anyio) and ``python control_workloads.py`` (genlm-backend, its module
file checked to be its own, the compat switch unset). Both get the same warm-up
(one small ``direct`` run), then each workload runs ``--repeats`` times on
each, alternated, with the same arguments and seeds. The table gives the best
and median wall time of each SMC call and the ratio genlm-backend /
genlm-anyio of the best, and the counts that show the work is the same on
both: LM requests, contexts asked for, tokens generated (they differ only
where floating-point differences made a particle sample another token). ``lm
busy`` is the share of the SMC call during which at least one LM request was
outstanding. genlm-backend runs at its defaults (``batch_size=20``): every
workload here has at most 20 particles, so ``batch_size=N`` would not change
it. ``--profile`` writes each run's cProfile summary to the workers' logs.
Writes ``benches/results/control.json``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from common import HERE, MIN_REPEATS, Report, Worker, alternate, best_median, fmt, ratio, reference_env

from tools import assets

PROGRAM = HERE / "control_workloads.py"

# (particles, max_tokens) per workload: sized so that both backends together
# take a few minutes per round on an idle 2-core CPU (max_tokens counts bytes
# for "bytes"). genlm-backend takes most of it; JSON on it the longest.
SETTINGS = {
    "direct": (10, 20),
    "regex": (10, 30),
    "json": (2, 30),
    "bytes": (3, 4),
}
BACKENDS = {"genlm-anyio": ["-m", "genlm_anyio.compat"], "genlm-backend": []}
COUNTS = ("lm_requests", "lm_contexts", "tokens_generated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(SETTINGS), help="comma-separated, from " + ", ".join(SETTINGS))
    parser.add_argument("--model", default=None, help="a local model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    parser.add_argument("--sizes", default="", help="WORKLOAD:N:T,... instead of the default particles and tokens")
    parser.add_argument("--profile", action="store_true", help="a cProfile summary of every run, in the logs")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in SETTINGS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(SETTINGS)}")
    model = args.model or str(assets.smollm2_dir())
    settings = dict(SETTINGS)
    for spec in filter(None, args.sizes.split(",")):
        workload, n, t = spec.split(":")
        settings[workload] = (int(n), int(t))

    report = Report("control", "genlm-control workloads")
    workers = {
        name: Worker(f"control-{name}", [sys.executable, *flags, str(PROGRAM), model], reference_env())
        for name, flags in BACKENDS.items()
    }
    try:
        for worker in workers.values():
            worker.wait()
        warm = {
            name: partial(w.run, "run", workload="direct", particles=2, max_tokens=2) for name, w in workers.items()
        }
        alternate(warm, warmup=0)
        rows = []
        for workload in workloads:
            n, t = settings[workload]
            runs = {
                name: partial(
                    w.run, "run", workload=workload, particles=n, max_tokens=t, seed=args.seed, profile=args.profile
                )
                for name, w in workers.items()
            }
            print(f"  running {workload} ({n} x {t}) on {', '.join(runs)}", file=sys.stderr, flush=True)
            results = alternate(runs, repeats=args.repeats, warmup=0)
            for name, samples in results.items():
                report.measure(f"{workload}/{name}", samples)
            rows.append((workload, results))
    finally:
        for worker in workers.values():
            worker.close()

    load = {name: rows[0][1][name].best_run.metrics["load_s"] for name in BACKENDS} if rows else {}
    table = report.table(
        "genlm-control 0.4.1 on SmolLM2-135M-Instruct (transformers backend, CPU): SMC wall time, best / median",
        [
            "workload",
            "particles x max tokens",
            "genlm-anyio",
            "genlm-backend",
            "speed-up",
            "LM busy (anyio / backend)",
            "LM requests / contexts / tokens (anyio; backend)",
        ],
        notes=[
            f"Workloads run: {args.workloads}, seed {args.seed}; the same warm-up, {args.repeats} alternated runs "
            "each. Counts are those of each side's best run. Imports and model load: "
            f"genlm-anyio {fmt(load.get('genlm-anyio'))}, genlm-backend {fmt(load.get('genlm-backend'))}.",
        ],
    )
    for workload, results in rows:
        ours, ref = results["genlm-anyio"], results["genlm-backend"]
        mine, theirs = ours.best_run.metrics, ref.best_run.metrics
        n, t = settings[workload]
        busy = f"{mine['lm_busy_s'] / ours.best:.0%} / {theirs['lm_busy_s'] / ref.best:.0%}"
        counts = ["/".join(str(x[k]) for k in COUNTS) for x in (mine, theirs)]
        same = "same" if counts[0] == counts[1] else counts[1]
        table.add(
            workload,
            f"{n} x {t}",
            best_median(ours),
            best_median(ref),
            ratio(ref.best, ours.best),
            busy,
            f"{counts[0]}; {same}",
        )
    total = {name: sum(r[name].best for _, r in rows) for name in BACKENDS}
    table.add(
        "all (sum of bests)",
        "",
        fmt(total["genlm-anyio"]),
        fmt(total["genlm-backend"]),
        ratio(total["genlm-backend"], total["genlm-anyio"]),
        "",
        "",
    )
    for workload, results in rows:
        tops = {name: results[name].best_run.metrics["top"] for name in BACKENDS}
        table.notes.append(
            f"{workload}: most likely completion on genlm-anyio {tops['genlm-anyio']!r}, "
            f"on genlm-backend {tops['genlm-backend']!r}."
        )
    report.write()


if __name__ == "__main__":
    main()
