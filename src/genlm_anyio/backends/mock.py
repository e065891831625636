"""A fake language model over a real tokenizer's vocabulary, for users' tests."""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from .base import AsyncLM, TokenIds


class MockAsyncLM(AsyncLM):
    """Deterministic pseudo-random log-probabilities: the same token ids always
    give the same normalized distribution over the tokenizer's vocabulary.

    It batches like a real backend, so users' programs can be tested without a
    model. ``computed`` counts the sequences it has scored.
    """

    def __init__(self, tokenizer: Any, **opts: Any):
        super().__init__(tokenizer, **opts)
        self.computed = 0

    @classmethod
    def from_name(cls, model_name: str, **opts: Any) -> "MockAsyncLM":
        """A mock over the tokenizer of ``model_name`` (a hub id or a local folder)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(model_name), **opts)

    def _scores(self, token_ids: TokenIds) -> torch.Tensor:
        digest = hashlib.blake2b(repr(token_ids).encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        logits = torch.randn(self.vocab_size, generator=generator)
        return torch.log_softmax(logits, dim=-1)

    def _batch_logprobs(self, batch: list[TokenIds]) -> list[torch.Tensor]:
        self.computed += len(batch)
        return [self._scores(ids) for ids in batch]
