"""The seed example rewritten for trio: trio.run, and a nursery instead of asyncio.gather.

It must run as written (``python seed_example.py [MODEL]``) and, rewritten for trio
(trio.run, a nursery instead of asyncio.gather), give the same kind of output.
MODEL is a hub id, a local model folder or a .gguf file.
"""

import sys

import torch
import trio

from genlm_anyio import load_model_by_name


# --- Token-level masking using the byte-level vocabulary --- #
def make_masking_function(llm, max_token_length, max_tokens):
    eos_id = llm.tokenizer.eos_token_id
    valid_ids = torch.tensor(
        [token_id == eos_id or len(token) <= max_token_length for token_id, token in enumerate(llm.byte_vocab)],
        dtype=torch.float,
    ).log()
    eos_one_hot = torch.nn.functional.one_hot(torch.tensor(eos_id), len(llm.byte_vocab)).log()

    def masking_function(context):
        return eos_one_hot if len(context) >= max_tokens else valid_ids

    return masking_function


# --- Particle class for SIS --- #
class Particle:
    def __init__(self, llm, mask_function, prompt_ids):
        self.context = []
        self.prompt_ids = prompt_ids
        self.log_weight = 0.0
        self.active = True
        self.llm = llm
        self.mask_function = mask_function

    async def extend(self):
        logps = await self.llm.next_token_logprobs(self.prompt_ids + self.context)
        masked_logps = logps + self.mask_function(self.context).to(logps.device)
        logZ = masked_logps.logsumexp(dim=-1)
        self.log_weight += logZ
        next_token_id = torch.multinomial((masked_logps - logZ).exp(), 1).item()
        if next_token_id == self.llm.tokenizer.eos_token_id:
            self.active = False
        else:
            self.context.append(next_token_id)


# --- Autobatched SIS loop --- #
async def autobatched_sis(n_particles, llm, masking_function, prompt_ids):
    particles = [Particle(llm, masking_function, prompt_ids) for _ in range(n_particles)]
    while any(p.active for p in particles):
        async with trio.open_nursery() as nursery:
            for p in particles:
                if p.active:
                    nursery.start_soon(p.extend)
    return particles


if __name__ == "__main__":
    llm = load_model_by_name(sys.argv[1] if len(sys.argv) > 1 else "gpt2")
    mask_function = make_masking_function(llm, max_token_length=10, max_tokens=10)
    prompt_ids = llm.tokenizer.encode("Montreal is")
    particles = trio.run(
        lambda: autobatched_sis(n_particles=10, llm=llm, masking_function=mask_function, prompt_ids=prompt_ids)
    )
    strings = [llm.tokenizer.decode(p.context) for p in particles]
    log_weights = torch.tensor([p.log_weight for p in particles])
    probs = torch.exp(log_weights - log_weights.logsumexp(dim=-1))
    for s, p in sorted(zip(strings, probs), key=lambda x: -x[1]):
        print(f"{s!r} (probability: {p:.4f})")
