"""A fake language model over a real tokenizer's vocabulary, for users' tests."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .base import Adapter, AsyncLM, Query, RequestFailed


class MockAsyncLM(AsyncLM):
    """Deterministic pseudo-random log-probabilities: the same token ids always
    give the same normalized distribution over the tokenizer's vocabulary.

    It batches like a real backend, so users' programs can be tested without a
    model. ``computed`` counts the sequences it has scored. ``add_new_lora``
    registers a name (no weights are read): requests under it get another
    deterministic distribution, one per adapter name.
    """

    def __init__(self, tokenizer: Any, **opts: Any):
        super().__init__(tokenizer, **opts)
        self.computed = 0

    @classmethod
    def from_name(cls, model_name: str, **kwargs: Any) -> MockAsyncLM:
        """A mock over the tokenizer of ``model_name`` (a hub id or a local folder);
        ``kwargs`` go to the constructor."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_name), **kwargs)

    def _load_adapter(self, adapter: Adapter, replaced: Adapter | None) -> None:
        pass  # nothing to load: an adapter only changes the seed of its requests

    def _unload_adapter(self, adapter: Adapter) -> None:
        pass

    def _scores(self, query: Query) -> torch.Tensor:
        key = query.ids if query.adapter is None else (query.adapter.name, query.ids)
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        logits = torch.randn(self.vocab_size, generator=generator)
        return torch.log_softmax(logits, dim=-1)

    def _batch_logprobs(self, batch: list[Query]) -> list[torch.Tensor | RequestFailed]:
        self.computed += len(batch)
        return [self._scores(query) for query in batch]
