"""A child process that runs calls into genlm_anyio under a memory limit, so
that a crash (abort, segfault, out of memory, a hang) fails the test that caused
it instead of ending the whole test run.

The child serves length-prefixed pickled requests on a pipe; a call returns
``("ok", value)`` or ``("error", exception type name, message)``. If the child
dies, :meth:`Sandbox.call` raises :class:`Crashed` and the next call starts a
fresh child.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent / "src"

# The address-space limit of the child: twice what importing torch reserves.
MEMORY_LIMIT = 2 << 30

_CHILD = r"""
import os, pickle, resource, struct, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
# Replies go on a private copy of stdout; anything printed goes to stderr.
replies = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
import numpy as np
import torch
import genlm_anyio
from genlm_anyio.vocab import byte_vocab_from_gguf, byte_vocab_from_tokenizer_json


def weights(spec):
    kind, values, dtype = spec
    if kind == "torch":
        return torch.tensor(values, dtype=torch.float64).to(getattr(torch, dtype))
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dtype)


def trie(vocab, method, spec):
    # Tokens: entries with equal bytes are distinct (genlm-backend's layout gives each its own leaf).
    t = genlm_anyio.TokenCharacterTrie([genlm_anyio.Token(i, b) for i, b in enumerate(vocab)])
    out = getattr(t, method)(weights(spec))
    leaves = [t.token_node(i) for i in range(len(vocab))]
    return np.asarray(out, dtype=np.float64), [t.prefix(n) for n in range(t.num_nodes)], leaves


OPS = {"json": byte_vocab_from_tokenizer_json, "gguf": byte_vocab_from_gguf, "trie": trie}
stdin = sys.stdin.buffer
while True:
    header = stdin.read(8)
    if len(header) < 8:
        break
    op, args = pickle.loads(stdin.read(struct.unpack("<Q", header)[0]))
    try:
        reply = ("ok", OPS[op](*args))
    except BaseException as e:  # a PanicException too: the test decides what is allowed
        reply = ("error", type(e).__name__, str(e))
    data = pickle.dumps(reply)
    replies.write(struct.pack("<Q", len(data)) + data)
    replies.flush()
"""


class Crashed(AssertionError):
    """The child died or hung on a call."""


class Sandbox:
    """Calls into genlm_anyio in a memory-limited child; counts the calls made."""

    def __init__(self, limit: int = MEMORY_LIMIT, timeout: float = 120.0):
        self.limit = limit
        self.timeout = timeout
        self.calls = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
        env["RUST_BACKTRACE"] = "0"
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(self.limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    def call(self, op: str, *args: Any) -> tuple:
        """Run ``op(*args)`` in the child: ``("ok", value)`` or ``("error", type name, message)``."""
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                _close_pipes(self._proc)
            self._proc = self._start()
        proc = self._proc
        self.calls += 1
        data = pickle.dumps((op, args))
        try:
            proc.stdin.write(struct.pack("<Q", len(data)) + data)
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
            if not ready:
                proc.kill()
                proc.wait()
                raise Crashed(f"{op} hung for {self.timeout} s on {_brief(args)}")
            header = proc.stdout.read(8)
            if len(header) == 8:
                return pickle.loads(proc.stdout.read(struct.unpack("<Q", header)[0]))
        except BrokenPipeError:
            pass
        rc = proc.wait()
        why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        raise Crashed(f"the child died ({why}) on {op}{_brief(args)}")

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.close()
                self._proc.wait()
            _close_pipes(self._proc)


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    """Close an ended child's pipes (left open, each is a ResourceWarning when collected)."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(BrokenPipeError):
                pipe.close()


def _brief(args: tuple) -> str:
    text = repr(args)
    return text if len(text) <= 400 else text[:400] + "..."
