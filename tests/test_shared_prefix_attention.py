"""Attention that reads a prefix shared by many rows once (backends/shared_prefix.py):
the planner's groups, the merged attention against torch's own attention over
whole pasts, and the transformers engine against plain transformers (no hooks of
ours) on short and 2,000-token shared prompts, LoRA rows included, with counts of
what is gathered per pass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from references import TOL

from genlm_anyio import AsyncTransformer
from genlm_anyio.backends import shared_prefix
from tools import assets


# -- the planner ------------------------------------------------------------------------
def test_rows_starting_with_one_slot_form_a_group_sharing_their_longest_common_prefix():
    prompt = list(range(1, 301))
    past = [prompt + [400], prompt + [401, 402], prompt[:250] + [500], [900, 901], [], prompt]
    plan = shared_prefix.plan(past)
    assert plan is not None
    # Four rows share 250 tokens (3 x 250 reads saved), three share 300 (2 x 300).
    assert [(g.rows, g.slots) for g in plan.groups] == [([0, 1, 2, 5], prompt[:250])]
    assert plan.own == [prompt[250:] + [400], prompt[250:] + [401, 402], [500], [900, 901], [], prompt[250:]]
    assert plan.own_length == 52


def test_a_short_row_does_not_shrink_its_group_but_many_do():
    prompt = list(range(1, 301))
    many_short = [prompt[:280] + [7 + i] for i in range(8)]
    plan = shared_prefix.plan([prompt + [1], prompt + [2], *many_short])
    assert plan is not None
    assert [(g.rows, len(g.slots)) for g in plan.groups] == [(list(range(10)), 280)]


def test_separate_prompts_are_separate_groups():
    a, b = list(range(1, 201)), list(range(1000, 1200))
    plan = shared_prefix.plan([a + [5], b + [6], a + [7], b + [8]])
    assert plan is not None
    assert sorted((g.rows, len(g.slots)) for g in plan.groups) == [([0, 2], 200), ([1, 3], 200)]


def test_too_little_sharing_keeps_the_model_attention():
    short = list(range(1, 17))
    assert shared_prefix.plan([short + [i] for i in range(8)]) is None  # 7 x 16 tokens saved
    assert shared_prefix.plan([short + [i] for i in range(32)]) is not None  # 31 x 16
    assert shared_prefix.plan([[1, 2], [3, 4]]) is None


# -- the attention ------------------------------------------------------------------------
def _plain_attention(query, whole_keys, whole_values, lengths, new):
    """torch's own attention, row by row, over each row's whole past and its new tokens."""
    out = []
    heads, kv_heads = query.shape[1], whole_keys[0].shape[0]
    for b, (k, v) in enumerate(zip(whole_keys, whole_values)):
        past = lengths[b]
        k = k.repeat_interleave(heads // kv_heads, dim=0)
        v = v.repeat_interleave(heads // kv_heads, dim=0)
        mask = torch.ones((new, past + new), dtype=torch.bool)
        mask[:, past:] = torch.ones((new, new), dtype=torch.bool).tril()
        out.append(F.scaled_dot_product_attention(query[b : b + 1], k[None], v[None], attn_mask=mask)[0])
    return torch.stack(out).transpose(1, 2)


@pytest.mark.parametrize("new", [1, 3])
def test_merged_attention_equals_attention_over_whole_pasts(new):
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim = 6, 2, 16
    prefix_a, prefix_b = 40, 25
    own_lengths = [3, 0, 5, 7, 2]  # rows 0-2 share prefix a, row 3 is alone, row 4 shares prefix b... alone too
    groups = {0: "a", 1: "a", 2: "a", 3: None, 4: "b"}
    prefixes = {
        name: (torch.randn(kv_heads, n, dim, generator=gen), torch.randn(kv_heads, n, dim, generator=gen))
        for name, n in (("a", prefix_a), ("b", prefix_b))
    }
    rows = len(own_lengths)
    own_width = max(own_lengths)
    query = torch.randn(rows, heads, new, dim, generator=gen)
    key = torch.randn(rows, kv_heads, own_width + new, dim, generator=gen)
    value = torch.randn(rows, kv_heads, own_width + new, dim, generator=gen)
    whole_keys, whole_values, lengths = [], [], []
    for b in range(rows):
        own = list(range(own_lengths[b])) + list(range(own_width, own_width + new))
        pk, pv = prefixes[groups[b]] if groups[b] else (key[b, :, :0], value[b, :, :0])
        whole_keys.append(torch.cat([pk, key[b, :, own]], dim=1))
        whole_values.append(torch.cat([pv, value[b, :, own]], dim=1))
        lengths.append(pk.shape[1] + own_lengths[b])
    shared = [(torch.tensor([b for b in range(rows) if groups[b] == name]), *prefixes[name]) for name in ("a", "b")]
    mask = shared_prefix.own_mask(own_lengths, own_width, new, torch.device("cpu"))
    got = shared_prefix.attend(query, key, value, mask, shared, dim**-0.5)
    want = _plain_attention(query, whole_keys, whole_values, lengths, new)
    assert got.shape == (rows, new, heads, dim)
    assert (got - want).abs().max().item() < 1e-5


# -- the transformers engine ---------------------------------------------------------------
def _text_prompt(tok, tokens: int) -> list[int]:
    """A prompt of ``tokens`` tokens of varied English (SmolLM2's tokenizer)."""
    words = ("the river city market north stone quiet garden seven lantern copper winter harbor").split()
    text = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(tokens * 2))
    return tok.encode(text)[:tokens]


def _plain_reference(model, prompt, suffixes):
    """Plain transformers (no hooks of ours): the prompt once with its own cache,
    then each suffix from a copy of that cache."""
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        rows = []
        for suffix in suffixes:
            past = copy.deepcopy(out.past_key_values)
            logits = model(torch.tensor([suffix]), past_key_values=past, use_cache=True).logits[0, -1]
            rows.append(torch.log_softmax(logits.float(), dim=-1))
    return rows


class _Gathers:
    """Counts the token rows the KV cache gathers, per call."""

    def __init__(self, lm):
        self.sizes: list[int] = []
        gather = lm.kv_cache.gather

        def counted(slot_rows):
            self.sizes.append(len(slot_rows) * max(len(r) for r in slot_rows))
            return gather(slot_rows)

        lm.kv_cache.gather = counted


@pytest.fixture(scope="module")
def engine(hf_parts):
    model, tok = hf_parts
    with AsyncTransformer(model, tok, kv_cache_bytes=1 << 30) as lm:
        yield lm


@pytest.mark.slow
@pytest.mark.parametrize("prompt_tokens, particles", [(16, 64), (2000, 32)])
def test_particles_over_a_shared_prompt_read_it_once_and_match_plain_transformers(
    engine, hf_parts, prompt_tokens, particles
):
    model, tok = hf_parts
    engine.clear_cache()
    assert engine.reads_shared_prefixes
    prompt = _text_prompt(tok, prompt_tokens)
    assert len(prompt) == prompt_tokens
    engine.next_token_logprobs_sync(prompt)
    # Each particle has its own two-token suffix, then one more token.
    suffixes = [[1000 + 7 * i, 2000 + i] for i in range(particles)]
    engine.batch_next_token_logprobs_sync([prompt + s for s in suffixes])
    gathers = _Gathers(engine)
    passes, computed = engine.compute_stats.forward_passes, engine.compute_stats.tokens_computed
    step = [s + [300 + i] for i, s in enumerate(suffixes)]
    got = engine.batch_next_token_logprobs_sync([prompt + s for s in step])
    assert engine.compute_stats.forward_passes - passes == 1
    assert engine.compute_stats.tokens_computed - computed == particles
    # The prompt is gathered once for all rows; each row gathers only its own two tokens.
    assert sorted(gathers.sizes) == sorted([particles * 2, prompt_tokens])
    checked = [0, particles // 2, particles - 1]
    want = _plain_reference(model, prompt, [step[i] for i in checked])
    for i, w in zip(checked, want):
        assert (got[i] - w).abs().max().item() < TOL


@pytest.mark.slow
def test_rows_of_two_prompts_and_lone_rows_in_one_pass(engine, hf_parts):
    model, tok = hf_parts
    engine.clear_cache()
    a, b = _text_prompt(tok, 300), _text_prompt(tok, 200)[::-1]
    engine.batch_next_token_logprobs_sync([a, b])
    seqs = [a + [10 + i] for i in range(6)] + [b + [20 + i] for i in range(5)] + [[5, 6, 7], a[:40]]
    gathers = _Gathers(engine)
    got = engine.batch_next_token_logprobs_sync(seqs)
    # a's and b's prefixes once each; the rows' own parts padded to the longest own past
    # (a[:40] shares only 39 cached tokens with the a-rows: it stays out of their group).
    assert len(gathers.sizes) == 3 and 300 in gathers.sizes and 200 in gathers.sizes
    for seq, row in zip(seqs[::3], got[::3]):
        (want,) = _plain_reference(model, seq[:-1], [seq[-1:]])
        assert (row - want).abs().max().item() < TOL


@pytest.mark.slow
def test_lora_rows_share_their_own_prompt_and_match_peft(lora_adapters, hf_parts):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.smollm2_dir())
    base = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)
    prompt = _text_prompt(tok, 300)
    with AsyncTransformer(base, tok) as lm:
        lm.add_new_lora(lora_adapters["shifted"], "shifted")
        lm.next_token_logprobs_sync(prompt)
        lm.next_token_logprobs_sync(prompt, lora_name="shifted")
        gathers = _Gathers(lm)
        base_rows = lm.batch_next_token_logprobs_sync([prompt + [40 + i] for i in range(4)])
        lora_rows = lm.batch_next_token_logprobs_sync([prompt + [40 + i] for i in range(4)], lora_name="shifted")
        assert gathers.sizes == [300, 300]  # each batch: its prompt once (the rows have no own past)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32),
        lora_adapters["shifted"],
    ).eval()
    with reference.disable_adapter():
        want_base = _plain_reference(reference, prompt, [[40 + i] for i in range(4)])
    want_lora = _plain_reference(reference, prompt, [[40 + i] for i in range(4)])
    for got, want in ((base_rows, want_base), (lora_rows, want_lora)):
        for g, w in zip(got, want):
            assert (g - w).abs().max().item() < TOL
    assert (lora_rows[0] - base_rows[0]).abs().max().item() > 100 * TOL  # the adapter changes the rows


def _tiny_config(config_class, tok, **fields):
    """A tiny random model's config over ``tok``'s vocabulary: 4 heads sharing 2 key/value heads."""
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    return config_class(vocab_size=len(tok), **shape, **fields)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_supported_model_type_matches_its_own_attention(hf_parts, kind):
    import transformers

    _, tok = hf_parts
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    config = _tiny_config(
        config_class,
        tok,
        num_hidden_layers=2,
        head_dim=16,
        max_position_embeddings=1024,
        initializer_range=0.2,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    prompt = _text_prompt(tok, 400)
    with AsyncTransformer(model, tok) as lm:
        assert lm.reads_shared_prefixes
        lm.next_token_logprobs_sync(prompt)
        gathers = _Gathers(lm)
        got = lm.batch_next_token_logprobs_sync([prompt + [50 + i, 60] for i in range(4)])
        assert 400 in gathers.sizes
    want = _plain_reference(model, prompt, [[50 + i, 60] for i in range(4)])
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() < TOL


@pytest.mark.slow
def test_models_outside_the_supported_types_keep_their_attention(hf_parts):
    import transformers

    _, tok = hf_parts
    config = _tiny_config(transformers.MistralConfig, tok, num_hidden_layers=1, sliding_window=64)
    with AsyncTransformer(transformers.AutoModelForCausalLM.from_config(config).eval(), tok) as lm:
        assert not lm.reads_shared_prefixes
