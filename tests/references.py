"""References computed without genlm-anyio, for the tests to compare with.

- :func:`transformers_logprobs`: next-token log-probabilities of one plain
  transformers forward pass, ``model(ids).logits``, with none of genlm-anyio's
  hooks, caches, padding or batching.
- :func:`tokenizer_bytes`: the bytes a Hugging Face tokenizer's own ``decode``
  gives for each single token id.

``TOL`` is how far a row genlm-anyio computes another way (batched, padded, or
from cached keys and values, or a lone row whose output head sees its last
position only) may be from :func:`transformers_logprobs`, on every token. It
comes from what plain transformers itself shows on SmolLM2-135M (float32, CPU)
between a row of its own padded batch and the same row alone: up to 8.2e-5 on
an Intel Sapphire Rapids CPU, over torch's kernel paths (docs/runtime.md,
"Exactness", has the table), with a factor of two for other CPUs' kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

TOL = 2e-4  # in log-probability, on every token of the vocabulary


@torch.inference_mode()
def transformers_logprobs(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """log-softmax of ``model(ids).logits`` at the last position: ``ids`` alone,
    every position through the output head, no cache, as transformers computes it."""
    head = model.get_output_embeddings()
    assert not head._forward_pre_hooks and not head._forward_hooks, "the reference must run with no hooks"
    logits = model(torch.tensor([list(ids)], device=model.device), use_cache=False).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest absolute difference between two rows of log-probabilities."""
    return (got.cpu().float() - want.cpu().float()).abs().max().item()


def assert_close_to(want: torch.Tensor, got: torch.Tensor, what: str = "", tol: float = TOL) -> None:
    """``got`` is within ``tol`` of the reference ``want`` on every token."""
    err = max_error(got, want)
    assert err < tol, f"{what}: max abs error {err:.3g} >= {tol:.3g}"


def tokenizer_bytes(tok: Any) -> list[bytes | None]:
    """For each id of ``tok``, the bytes its own ``decode`` gives for that token, or
    None where that is no whole UTF-8 text (a piece of a character, which ``decode``
    shows as U+FFFD). An ordinary token is decoded after the token of "a", whose
    text is then cut off: SentencePiece decoders drop the leading space of a whole
    text, not of a token inside it. Special and added tokens are decoded alone."""
    first = tok.encode("a", add_special_tokens=False)[-1]
    lead = tok.decode([first], clean_up_tokenization_spaces=False)
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    ids = range(len(tok))
    texts = tok.batch_decode([[i] if i in special else [first, i] for i in ids], clean_up_tokenization_spaces=False)
    out: list[bytes | None] = []
    for i, text in zip(ids, texts):
        if i not in special:
            assert text.startswith(lead), f"id {i}: {text!r} does not start with {lead!r}"
            text = text[len(lead) :]
        out.append(None if "\ufffd" in text else text.encode())
    return out
