"""Constrained SMC in the style of genlm-control, written on genlm-anyio, under trio.

    python examples/control_smc_trio.py [MODEL] [--particles N] [--max-tokens T] [--seed S]

genlm-control itself is asyncio-only; this program does what its
``AWRS(llm, BoolFSA.from_regex(...)).smc(...)`` does for a finite language,
with genlm-anyio's model and trie directly:

- the constraint is the README's regex ``" SMC is (🔥🔥|😍😍|🤌🤌) with LMs"``,
  a finite language, compiled to a byte-level DFA by :func:`strings_dfa`;
- at each step every live particle asks ``await llm.next_token_logprobs(...)``
  in one trio nursery (the model batches the concurrent requests into one
  forward pass);
- the tokens the DFA allows from the particle's state come from the trie in one
  call (``TokenCharacterTrie.dfa_mask``); end-of-sequence is allowed only in an
  accepting state;
- the particle draws its next token from the LM restricted to those tokens
  (the locally optimal proposal) and multiplies its weight by their total
  probability; particles are resampled when the effective sample size falls
  below ``ess_threshold * N``.

MODEL is a local model folder or hub id (default: the SmolLM2-135M-Instruct
folder from ``tools/assets.py``). Prints the posterior over the completed
strings, one ``'STRING' (probability: P)`` line each.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import trio

from genlm_anyio import load_model_by_name
from genlm_anyio.trie import TokenCharacterTrie

ALLOWED = [f" SMC is {e} with LMs" for e in ("🔥🔥", "😍😍", "🤌🤌")]


def strings_dfa(strings: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A byte-level DFA accepting exactly ``strings`` (UTF-8).

    Returns ``(transitions, live, accepting)``: ``transitions`` is int32
    ``(S, 256)`` with -1 for no edge, state 0 is the start; ``live`` marks the
    states from which an accepting state is reachable (all of them here, as
    every state is a prefix of an allowed string); ``accepting`` the ends.
    """
    edges: list[dict[int, int]] = [{}]
    ends: set[int] = set()
    for s in strings:
        state = 0
        for byte in s.encode("utf-8"):
            if byte not in edges[state]:
                edges[state][byte] = len(edges)
                edges.append({})
            state = edges[state][byte]
        ends.add(state)
    transitions = np.full((len(edges), 256), -1, dtype=np.int32)
    for state, out in enumerate(edges):
        for byte, target in out.items():
            transitions[state, byte] = target
    accepting = np.zeros(len(edges), dtype=bool)
    accepting[list(ends)] = True
    return transitions, np.ones(len(edges), dtype=bool), accepting


def dfa_walk(transitions: np.ndarray, state: int, data: bytes) -> int:
    """The DFA's state after reading ``data`` from ``state`` (-1 if it has no path)."""
    for byte in data:
        state = int(transitions[state, byte])
        if state < 0:
            break
    return state


@dataclass
class Particle:
    tokens: list[int] = field(default_factory=list)
    state: int = 0  # DFA state after the particle's bytes
    log_weight: float = 0.0
    done: bool = False  # ended with end-of-sequence in an accepting state


class ConstrainedSMC:
    """SMC over an LM's tokens restricted to the strings a byte-level DFA accepts."""

    def __init__(self, llm, dfa: tuple[np.ndarray, np.ndarray, np.ndarray], prompt: str, seed: int):
        self.llm = llm
        self.transitions, self.live, self.accepting = dfa
        self.prompt_ids = list(llm.tokenizer.encode(prompt))
        self.eos = llm.tokenizer.eos_token_id
        self.token_bytes = [bytes(t) for t in llm.byte_vocab]
        self.trie = TokenCharacterTrie(llm.byte_vocab)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.lm_requests = 0

    def allowed(self, state: int, width: int) -> torch.Tensor:
        """Bool mask ``(width,)`` of the tokens that keep the DFA alive from ``state``, EOS if accepting."""
        tokens = self.trie.dfa_mask(self.transitions, state, self.live)
        mask = np.zeros(width, dtype=bool)
        mask[: len(tokens)] = tokens  # the model's rows may be padded past the vocabulary
        mask[self.eos] = bool(self.accepting[state])
        return torch.from_numpy(mask)

    async def extend(self, p: Particle) -> None:
        self.lm_requests += 1
        logps = await self.llm.next_token_logprobs(self.prompt_ids + p.tokens)
        masked = torch.where(self.allowed(p.state, logps.shape[-1]), logps.float(), -math.inf)
        log_z = torch.logsumexp(masked, dim=-1).item()
        p.log_weight += log_z
        if log_z == -math.inf:
            p.done = True  # no way on: the particle keeps weight zero
            return
        token = int(torch.multinomial((masked - log_z).exp(), 1, generator=self.generator).item())
        if token == self.eos:
            p.done = True
        else:
            p.tokens.append(token)
            p.state = dfa_walk(self.transitions, p.state, self.token_bytes[token])

    def resample_if_needed(self, particles: list[Particle], ess_threshold: float) -> list[Particle]:
        logw = np.array([p.log_weight for p in particles])
        if not np.isfinite(logw).any():
            return particles
        log_total = np.logaddexp.reduce(logw)
        w = np.exp(logw - log_total)
        if 1.0 / np.sum(w**2) >= ess_threshold * len(particles):
            return particles
        mean = float(log_total - math.log(len(particles)))
        picks = self.rng.choice(len(particles), size=len(particles), p=w)
        return [Particle(list(particles[i].tokens), particles[i].state, mean, particles[i].done) for i in picks]

    async def run(self, n_particles: int, max_tokens: int, ess_threshold: float = 0.5) -> list[Particle]:
        particles = [Particle() for _ in range(n_particles)]
        for _ in range(max_tokens + 1):  # + 1: room for the end-of-sequence token
            live = [p for p in particles if not p.done]
            if not live:
                break
            async with trio.open_nursery() as nursery:
                for p in live:
                    nursery.start_soon(self.extend, p)
            particles = self.resample_if_needed(particles, ess_threshold)
        for p in particles:
            if not p.done:  # out of tokens before end-of-sequence: not a completed string
                p.log_weight = -math.inf
        return particles

    def posterior(self, particles: list[Particle]) -> dict[str, float]:
        """Normalized weight per completed string (empty if no particle completed)."""
        logw = np.array([p.log_weight for p in particles])
        if not np.isfinite(logw).any():
            return {}
        w = np.exp(logw - np.logaddexp.reduce(logw))
        out: dict[str, float] = {}
        for p, wi in zip(particles, w):
            if wi > 0:
                text = b"".join(self.token_bytes[t] for t in p.tokens).decode("utf-8")
                out[text] = out.get(text, 0.0) + float(wi)
        return out


def default_model() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: the tools package
    from tools import assets

    return str(assets.smollm2_dir())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", nargs="?", default=None, help="model folder or hub id (default: SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--particles", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    llm = load_model_by_name(args.model or default_model())
    smc = ConstrainedSMC(llm, strings_dfa(ALLOWED), "Here is my honest opinion:", args.seed)
    particles = trio.run(smc.run, args.particles, args.max_tokens)
    posterior = smc.posterior(particles)
    print(
        f"{args.particles} particles, {smc.lm_requests} LM requests, "
        f"{sum(p.done and math.isfinite(p.log_weight) for p in particles)} completed"
    )
    for text, prob in sorted(posterior.items(), key=lambda kv: -kv[1]):
        print(f"{text!r} (probability: {prob:.4f})")


if __name__ == "__main__":
    main(sys.argv[1:])
