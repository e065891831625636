"""The vLLM backend: genlm's API on vLLM's engine core.

:class:`AsyncVirtualLM` (``model``) is the front end: the same :class:`AsyncLM`
API as the transformers backend, whose batches go to a :class:`VLLMEngine`
(``engine``), which drives vLLM's engine core directly. A log-probability
request is a streaming-input session (``sessions``): extending a sequence by a
token resumes it and computes one token. Its row comes from a logits processor
that keeps the ``log_softmax`` of the raw logits (``capture``): read in this
process where the engine's worker runs here, handed over by a worker extension
where the workers run elsewhere, and from vLLM's ``logprobs=-1`` (a sort of the
vocabulary, sent over the engine's socket) for engines without them (``rows``
chooses). ``options`` starts
engines (the options genlm-anyio needs, where the engine core runs, the CPU
thread binding), ``replicas`` starts the engines of a
:class:`~genlm_anyio.backends.replicas.ReplicatedLM`, ``lora`` holds the
adapters, and ``internals`` lists every vLLM name the package uses and checks
them against the installed vLLM. Only this package imports vLLM, and only once
an engine is built.
"""

from .model import AsyncVirtualLM

__all__ = ["AsyncVirtualLM"]
