"""The contract every engine that runs the model in this process (a
:class:`~genlm_anyio.backends.prefix.PrefixCachedLM`) keeps, on the real SmolLM2-135M:
lone, batched and cached results against a plain transformers forward pass of
the same weights (tests/references.py), counts of computed tokens, batching
under asyncio, trio and threads, sampling, errors, cancellation and closing.

An engine's test module subclasses :class:`PrefixEngineContract` (pytest collects
the subclass there), sets its tolerance ``tol``, and defines three fixtures:
``fresh``, the engine with its caches cleared; ``make``, which builds another
engine over the same weights; and ``reference``, ``reference(ids)``: plain
transformers' next-token log-probabilities of ``ids`` alone."""

from __future__ import annotations

import re
import threading

import anyio
import pytest
import torch
import trio
from helpers import ask_after_cancelled_callers, good_beside_bad
from references import TOL, assert_close_to

from genlm_anyio import ClosedError
from genlm_anyio.lifetime import Closeable

TEXTS = [
    "Montreal is a city in",
    "The quick brown fox jumps over",
    "def fibonacci(n):",
    "In 1492, Columbus sailed",
    "Paris",
]


def prompt(lm, text: str = TEXTS[0]) -> list[int]:
    return lm.tokenizer.encode(text)


def assert_matches_reference(reference, seqs, results, tol: float = TOL) -> None:
    """Each result is within ``tol`` of ``reference`` (plain transformers) for its sequence."""
    for ids, got in zip(seqs, results):
        assert_close_to(reference(ids), got, f"{len(ids)} tokens", tol)


async def put(out, key, coro) -> None:
    out[key] = await coro


class PrefixEngineContract:
    """Tests every in-process engine passes; see the module's docstring."""

    output_cache_size_arg: str
    """The name of the engine's argument for the most results its output cache keeps."""
    tol: float = TOL
    """How far the engine's rows may be from plain transformers, in log-probability."""

    def test_outputs_are_normalized_float32_over_the_model_vocabulary(self, fresh):
        out = fresh.next_token_logprobs_sync(prompt(fresh))
        assert out.dtype == torch.float32 and out.shape == (fresh.vocab_size,) == (49152,)
        assert torch.logsumexp(out, 0).item() == pytest.approx(0.0, abs=1e-4)
        assert len(fresh.byte_vocab) == len(fresh.str_vocab) == fresh.vocab_size

    def test_mixed_batches_match_plain_transformers(self, fresh, reference):
        p = prompt(fresh)
        other = prompt(fresh, TEXTS[1])
        fresh.cache_kv(p)
        seqs = [
            p + [100],
            p + [100, 200],
            p + [300],
            p[:2],
            p[:2] + [5, 6, 7],  # shared prefixes, cached and not
            other,
            other + [11],
            other[:3] + [12, 13],  # an unseen prompt and its relatives
            p + [100],  # a duplicate
            [42],  # a single token
        ]
        results = fresh.batch_next_token_logprobs_sync(seqs)
        assert results.shape == (len(seqs), fresh.vocab_size)
        assert_matches_reference(reference, seqs, results, self.tol)

    def test_a_lone_request_cold_or_from_its_cached_prefix_matches_plain_transformers(self, fresh, reference):
        """genlm-backend's test_caching, which asks its cached pass to equal its uncached
        one: here a request computed alone, cold or extending its cached prefix, and
        the uncached pass are each within ``tol`` of plain transformers. None is equal
        to it by construction: other matrix shapes (the head over the last position
        only, attention over a past of cached keys) mean other float32 sums."""
        pre = prompt(fresh, "There might be something wrong")
        ext = pre + fresh.tokenizer.encode(" with the caching logic", add_special_tokens=False)
        for ids in (pre, ext):
            assert_close_to(reference(ids), anyio.run(fresh.next_token_logprobs, ids), f"{len(ids)} tokens", self.tol)
            assert_close_to(reference(ids), fresh.next_token_logprobs_uncached(ids), "uncached", self.tol)
        assert fresh.kv_cache.stats.prefix_tokens_reused >= len(pre)

    def test_extending_n_cached_sequences_by_one_token_computes_n_tokens(self, fresh, reference):
        p = prompt(fresh)
        seqs = [p + [1000 + i] for i in range(16)]
        fresh.batch_next_token_logprobs_sync(seqs)
        before = (
            fresh.compute_stats.tokens_computed,
            fresh.compute_stats.forward_passes,
            fresh.kv_cache.stats.prefix_tokens_reused,
        )
        step = [s + [7] for s in seqs]

        async def extend_all():
            out = [None] * len(step)
            async with anyio.create_task_group() as tg:
                for i, s in enumerate(step):
                    tg.start_soon(put, out, i, fresh.next_token_logprobs(s))
            return out

        out = anyio.run(extend_all)
        assert fresh.compute_stats.tokens_computed - before[0] == 16
        assert fresh.compute_stats.forward_passes - before[1] == 1
        assert fresh.kv_cache.stats.prefix_tokens_reused - before[2] == 16 * (len(p) + 1)
        assert_matches_reference(reference, step[:4], out[:4], self.tol)

    def test_shared_uncached_prefixes_and_identical_requests_are_computed_once(self, fresh):
        p = prompt(fresh, "Once upon a time there was")
        before = fresh.compute_stats.tokens_computed
        fresh.batch_next_token_logprobs_sync([p + [5], p + [6], p + [5]])
        # p once, then one token for each distinct continuation.
        assert fresh.compute_stats.tokens_computed - before == len(p) + 2
        before = fresh.compute_stats.tokens_computed
        hits = fresh.compute_stats.logprob_cache_hits
        fresh.next_token_logprobs_sync(p + [6])
        assert fresh.compute_stats.tokens_computed == before and fresh.compute_stats.logprob_cache_hits == hits + 1

    @pytest.mark.parametrize("run", [anyio.run, trio.run], ids=["asyncio", "trio"])
    def test_concurrent_callers_share_one_forward_pass(self, fresh, reference, run):
        # Cold prompts of different lengths with no common first token, each asked twice.
        seqs = [[(97 * n + j) % 40000 + 50 for j in range(n)] for n in range(1, 25, 3)]
        assert len({s[0] for s in seqs}) == len(seqs)
        batches, requests, shared = (fresh.batch_stats.batches, fresh.batch_stats.requests, fresh.batch_stats.shared)
        passes, tokens = fresh.compute_stats.forward_passes, fresh.compute_stats.tokens_computed

        async def ask_all():
            out = [None] * (2 * len(seqs))
            async with anyio.create_task_group() as tg:
                for i, s in enumerate(seqs + seqs):
                    tg.start_soon(put, out, i, fresh.next_token_logprobs(s))
            return out

        out = run(ask_all)
        assert fresh.batch_stats.batches - batches == 1
        assert fresh.batch_stats.requests - requests == 2 * len(seqs)
        assert fresh.batch_stats.shared - shared == len(seqs)
        assert fresh.compute_stats.forward_passes - passes == 1
        assert fresh.compute_stats.tokens_computed - tokens == sum(map(len, seqs))
        # Equal by construction: each twice-asked sequence is one computed row, shared.
        assert all(torch.equal(a, b) for a, b in zip(out[: len(seqs)], out[len(seqs) :]))
        assert_matches_reference(reference, seqs, out, self.tol)

    def test_eviction_under_a_small_budget_stays_correct(self, make, reference):
        per_token = 2 * 30 * 3 * 64 * 4  # keys and values of 30 layers, 3 heads of 64 float32s
        with make(kv_cache_bytes=16 * per_token, **{self.output_cache_size_arg: 0}) as small:
            tok = small.tokenizer
            seqs = [
                tok.encode(t)
                for t in ["A long sentence about cats and dogs", "Another one on trains and planes", "Short"]
            ]
            first = small.batch_next_token_logprobs_sync(seqs)
            # Unrelated text: the older prefixes (unpinned leaves) make room.
            more = [tok.encode("Completely different words go here now"), seqs[2] + [9, 10]]
            second = small.batch_next_token_logprobs_sync(more)
            assert small.kv_cache.stats.tokens_evicted > 0
            assert small.kv_cache.stats.in_use < 16
            assert_matches_reference(reference, seqs + more, list(first) + list(second), self.tol)
            # A batch whose new tokens exceed the whole budget is computed, just not kept.
            long = [tok.encode("word " * 30)]
            assert_matches_reference(reference, long, small.batch_next_token_logprobs_sync(long), self.tol)

    def test_the_output_cache_keeps_compact_rows_within_its_byte_budget(self, make):
        """Issue 8, defect 5: each cached result is a copy of one row (not a view that
        keeps its batch alive), and the cache holds at most ``logprob_cache_bytes``."""
        row = 49152 * 4
        with make(logprob_cache_bytes=5 * row) as lm:
            seqs = [[1000 + i, 7] for i in range(8)]
            lm.batch_next_token_logprobs_sync(seqs)
            assert len(lm._logprob_cache) == 5 and lm.output_cache_bytes == 5 * row
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in lm._logprob_cache.values()
            }
            assert list(storages.values()) == [row] * 5  # five storages of one row each: the (8, V) batch is freed
            hits = lm.compute_stats.logprob_cache_hits
            lm.next_token_logprobs_sync(seqs[-1])  # among the newest five
            lm.next_token_logprobs_sync(seqs[0])  # evicted
            assert lm.compute_stats.logprob_cache_hits == hits + 1
            assert lm.output_cache_bytes == 5 * row
            lm.clear_cache()
            assert lm.output_cache_bytes == 0
        with pytest.raises(ValueError, match="logprob_cache_bytes"):
            make(logprob_cache_bytes=-1)

    def test_callers_own_their_results(self, fresh):
        p = prompt(fresh)

        async def two():
            out = {}
            async with anyio.create_task_group() as tg:
                for i in range(2):
                    tg.start_soon(put, out, i, fresh.next_token_logprobs(p))
            return out[0], out[1]

        a, b = anyio.run(two)
        want = b.clone()
        a.fill_(0.0)  # one caller edits its result in place
        assert torch.equal(b, want)
        assert torch.equal(fresh.next_token_logprobs_sync(p), want)  # the cached copy too

    def test_trio_threads_and_successive_runs_share_one_model(self, fresh, reference):
        p = prompt(fresh)
        want = reference(p + [9])

        async def one():
            return await fresh.next_token_logprobs(p + [9])

        assert_close_to(want, anyio.run(one), "asyncio", self.tol)
        assert_close_to(want, trio.run(one), "trio", self.tol)
        results = []

        def worker(lib):
            results.append(anyio.run(one, backend=lib))

        threads = [threading.Thread(target=worker, args=(lib,)) for lib in ("asyncio", "trio", "asyncio")]
        for t in threads:
            t.start()
        results.append(fresh.next_token_logprobs_sync(p + [9]))
        for t in threads:
            t.join(60)
        assert len(results) == 4
        for r in results:
            assert_close_to(want, r, "threads", self.tol)

    def test_sampling_is_seeded_and_stops_at_eos(self, fresh):
        p = prompt(fresh)
        eos = [fresh.tokenizer.eos_token_id]
        a = anyio.run(lambda: fresh.sample(p, 8, eos, seed=3))
        assert 0 < len(a) <= 8 and not set(a) & set(eos)
        # The second run recomputes every step (no cached keys, values or results):
        # the same computations as the first, so the same tokens by construction.
        fresh.clear_cache()
        passes, hits = fresh.compute_stats.forward_passes, fresh.compute_stats.logprob_cache_hits
        assert trio.run(lambda: fresh.sample(p, 8, eos, seed=3)) == a
        assert fresh.compute_stats.forward_passes - passes == min(len(a) + 1, 8)  # a step per token, and the eos step
        assert fresh.compute_stats.logprob_cache_hits == hits
        batch = anyio.run(lambda: fresh.batch_sample([p, p[:3]], 5, eos, temperature=0.7, seed=11))
        # Batched and lone rows differ within tol: the same tokens unless a draw falls
        # within tol of a boundary of the cumulative distribution (chance < 5 * tol).
        fresh.clear_cache()
        assert batch[0] == anyio.run(lambda: fresh.sample(p, 5, eos, temperature=0.7, seed=11))
        # Every token is eos: sampling stops at once.
        assert anyio.run(lambda: fresh.sample(p, 5, list(range(fresh.vocab_size)))) == []
        with pytest.raises(ValueError, match="temperature"):
            anyio.run(lambda: fresh.sample(p, 5, eos, temperature=0))

    @pytest.mark.parametrize(
        "bad, error, match",
        [
            ([], ValueError, "must not be empty"),
            ([1, 49152], ValueError, r"49152, outside the vocabulary \[0, 49152\)"),
            ([1, -1], ValueError, "outside the vocabulary"),
            ([1, 2.5], TypeError, r"token_ids\[1\] must be an int"),
            ([True], TypeError, "not bool"),
            ("hello", TypeError, "sequence of token ids"),
            (torch.tensor([[1, 2]]), TypeError, "1-D integer tensor"),
        ],
    )
    def test_bad_input_fails_in_its_caller_only(self, fresh, bad, error, match):
        p = prompt(fresh)
        good, exc = anyio.run(good_beside_bad, fresh, p, bad)
        assert isinstance(exc, error) and exc.args and re.search(match, str(exc))
        assert good.shape == (fresh.vocab_size,)
        with pytest.raises(error, match=match):
            fresh.next_token_logprobs_sync(bad)
        with pytest.raises(ValueError, match=r"token_ids_list\[1\]"):
            fresh.batch_next_token_logprobs_sync([p, []])

    def test_a_cancelled_caller_leaves_the_model_usable(self, fresh, reference):
        p = prompt(fresh)
        got = anyio.run(ask_after_cancelled_callers, fresh, p)
        assert_close_to(reference(p + [79]), got, "after cancellations", self.tol)

    def test_closing_makes_the_model_unusable_with_a_clear_error(self, make):
        lm = make()
        lm.next_token_logprobs_sync([1, 2])
        assert isinstance(lm, Closeable) and not lm.closed
        lm.close()
        lm.close()  # idempotent
        assert lm.closed
        assert lm.kv_cache.stats.in_use == 0 and lm.output_cache_bytes == 0
        with pytest.raises(ClosedError):
            lm.next_token_logprobs_sync([1, 2])

        async def use():
            async with make() as lm2:
                await lm2.next_token_logprobs([1, 2])
            with pytest.raises(ClosedError):
                await lm2.next_token_logprobs([1, 2])
            lm3 = make()
            await lm3.aclose()
            assert lm3.closed

        trio.run(use)
