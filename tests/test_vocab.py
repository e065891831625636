"""The byte vocabulary on real tokenizers: llama.cpp's vocabulary files and the
transformers tokenizers converted from them."""

from __future__ import annotations

import functools
import json
import pickle
import unicodedata

import pytest
from helpers import DUMMY_PREFIX, load_tokenizer, vocab_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import tokenizer_bytes

from genlm_anyio import Token, decode_vocab
from genlm_anyio.vocab import byte_vocab_from_gguf, byte_vocab_from_tokenizer_json
from tools import assets

HF_LOADABLE = assets.HF_LOADABLE
WITH_REFERENCE = (
    "bert-bge",
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gemma-4",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
)
ALL_GGUF = WITH_REFERENCE + ("aquila", "baichuan", "gpt-neox", "nomic-bert-moe")


def joined(vocab, ids) -> bytes:
    return b"".join(vocab[i] for i in ids)


@functools.cache
def unicode_form(name: str) -> str | None:
    """The Unicode normalization a transformers tokenizer applies to its input, if any."""
    normalizer = json.loads(load_tokenizer(name).backend_tokenizer.to_str())["normalizer"]
    kind = normalizer["type"] if normalizer else None
    return kind if kind in ("NFC", "NFKC", "NFD", "NFKD") else None


def assert_round_trip(name: str, text: str, got: bytes, form: str | None = None) -> None:
    """``got`` is ``text`` (in the tokenizer's Unicode form), up to the one leading
    space of a SentencePiece dummy prefix."""
    want = (unicodedata.normalize(form, text) if form else text).encode()
    if name in DUMMY_PREFIX and got == b" " + want:
        return
    assert got == want, f"{name}: {text!r}"


# One byte-level BPE and one SentencePiece tokenizer in the fast tier; the rest
# (transformers builds each from its GGUF file in 2-8 s) in the full suite.
@pytest.mark.parametrize(
    "name", [n if n in ("gpt-2", "llama-spm") else pytest.param(n, marks=pytest.mark.slow) for n in HF_LOADABLE]
)
def test_encode_then_join_gives_the_text(name):
    tok = load_tokenizer(name)
    vocab, strs = decode_vocab(tok)
    assert len(vocab) == len(strs) == len(tok)
    form = unicode_form(name)
    # aquila ships no test strings of its own; gpt-2's exercise it as well.
    for text, _ in vocab_cases(name if name != "aquila" else "gpt-2"):
        assert_round_trip(name, text, joined(vocab, tok.encode(text, add_special_tokens=False)), form)


@pytest.mark.parametrize("name", sorted(set(WITH_REFERENCE) - {"bert-bge"}))
def test_gguf_vocab_decodes_reference_ids(name, vocab_dir):
    vocab = byte_vocab_from_gguf(vocab_dir / f"ggml-vocab-{name}.gguf")
    for text, ids in vocab_cases(name):
        assert_round_trip(name, text, joined(vocab, ids))


def test_wordpiece_gguf_vocab_keeps_the_normalized_words(vocab_dir):
    """What a WordPiece (uncased BERT) vocabulary keeps of a text: its characters
    lower-cased and accent-stripped, with each word-initial piece after one space.
    Spacing, case and accents are not recoverable, nor the text under ``[UNK]``."""
    vocab = byte_vocab_from_gguf(vocab_dir / "ggml-vocab-bert-bge.gguf")
    checked = 0
    for text, ids in vocab_cases("bert-bge"):
        got = joined(vocab, ids).decode()
        if "[UNK]" in got:
            continue
        stripped = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
        assert got.replace(" ", "") == "".join(stripped.split()), text
        checked += 1
    assert checked >= 40


@pytest.mark.parametrize("name", ALL_GGUF)
def test_every_gguf_vocab_decodes(name, vocab_dir):
    vocab = byte_vocab_from_gguf(vocab_dir / f"ggml-vocab-{name}.gguf")
    assert len(vocab) > 1000
    assert all(isinstance(b, bytes) for b in vocab)


def test_gpt_neox_vocab_is_the_checked_mpt_vocab(vocab_dir):
    """gpt-neox ships no test strings; MPT uses the GPT-NeoX tokenizer, whose
    vocabulary file does, so the two decoded vocabularies must be identical."""
    neox = byte_vocab_from_gguf(vocab_dir / "ggml-vocab-gpt-neox.gguf")
    assert neox == byte_vocab_from_gguf(vocab_dir / "ggml-vocab-mpt.gguf")


@functools.cache
def own_decoding(name: str) -> list[bytes | None]:
    return tokenizer_bytes(load_tokenizer(name))


def assert_is_the_tokenizers_own_decoding(want: list[bytes | None], vocab) -> None:
    """``vocab`` has one entry per id of the tokenizer, and each is what the tokenizer's
    own ``decode`` gives for that id, wherever that is whole text (over 98% of ids;
    the rest, pieces of characters, are checked by the reference ids' round trips)."""
    assert len(vocab) == len(want)
    differ = [(i, bytes(vocab[i]), w) for i, w in enumerate(want) if w is not None and bytes(vocab[i]) != w]
    assert not differ, differ[:5]
    assert sum(w is not None for w in want) > 0.98 * len(want)


@pytest.mark.parametrize("name", HF_LOADABLE)
def test_gguf_and_transformers_vocabularies_are_the_tokenizers_own_decoding(name, vocab_dir):
    """Both readers (the GGUF file, the transformers tokenizer) against the tokenizer's
    own decoding of every id, and the tokenizer's vocabulary against llama.cpp's ids."""
    import gguf

    tok = load_tokenizer(name)
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    from_gguf = byte_vocab_from_gguf(path)
    # The file's token count as the gguf package reads it; transformers' conversion
    # appends special tokens that the file does not list (1 to 3 for some families).
    assert len(from_gguf) == len(gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].data)
    assert all(i in tok.added_tokens_decoder for i in range(len(from_gguf), len(tok)))
    assert_is_the_tokenizers_own_decoding(own_decoding(name)[: len(from_gguf)], from_gguf)
    vocab, _ = decode_vocab(tok)
    assert_is_the_tokenizers_own_decoding(own_decoding(name), vocab)
    for text, ids in vocab_cases(name) if name != "aquila" else ():  # aquila ships no test strings
        assert_round_trip(name, text, joined(vocab, ids))


@pytest.mark.parametrize("name", HF_LOADABLE)
def test_tokenizer_json_entry_point_is_the_tokenizers_own_decoding(name):
    tok = load_tokenizer(name)
    assert_is_the_tokenizers_own_decoding(
        own_decoding(name), byte_vocab_from_tokenizer_json(tok.backend_tokenizer.to_str())
    )


unicode_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FFFF), min_size=1, max_size=40
)


@pytest.mark.parametrize("name", ["gpt-2", "llama-spm", "qwen2", "phi-3", "llama-bpe", "deepseek-llm"])
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_random_unicode_round_trips(name, text):
    tok = load_tokenizer(name)
    vocab = _vocab(name)
    assert_round_trip(name, text, joined(vocab, tok.encode(text, add_special_tokens=False)), unicode_form(name))


_VOCABS: dict[str, list[Token]] = {}


def _vocab(name: str) -> list[Token]:
    if name not in _VOCABS:
        _VOCABS[name] = decode_vocab(load_tokenizer(name))[0]
    return _VOCABS[name]


def test_slow_byte_level_tokenizer_is_its_own_decoding(tmp_path):
    """A pure-Python tokenizer over gpt-2's vocabulary and merges (plus two special tokens of its own)."""
    from transformers import ClvpTokenizer  # a pure-Python byte-level BPE tokenizer

    fast = load_tokenizer("gpt-2")
    model = json.loads(fast.backend_tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    slow = ClvpTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert not hasattr(slow, "backend_tokenizer")
    assert_is_the_tokenizers_own_decoding(tokenizer_bytes(slow), decode_vocab(slow)[0])


def test_slow_sentencepiece_tokenizer_round_trips(tmp_path):
    """A SentencePiece model trained here on llama.cpp's test strings, served by a
    pure-Python (sentencepiece-backed) transformers tokenizer."""
    import sentencepiece as spm
    from transformers import BertGenerationTokenizer

    texts = [text for name in WITH_REFERENCE for text, _ in vocab_cases(name) if text]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 5),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        byte_fallback=True,
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    tok = BertGenerationTokenizer(str(tmp_path / "sp.model"))
    assert not hasattr(tok, "backend_tokenizer")
    vocab, _ = decode_vocab(tok)
    assert vocab[tok.convert_tokens_to_ids("<0x0A>")] == b"\n"
    for text in texts:
        got = joined(vocab, tok.encode(text, add_special_tokens=False))
        assert got in (text.encode(), b" " + text.encode()), text


def test_special_tokens_are_their_text():
    tok = load_tokenizer("qwen2")
    vocab, strs = decode_vocab(tok)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert vocab[eos] == b"<|endoftext|>" and strs[eos] == "<|endoftext|>"


def test_string_forms_of_non_utf8_tokens():
    tok = load_tokenizer("llama-spm")
    byte_e9 = tok.convert_tokens_to_ids("<0xE9>")
    for fallback, want in [("tokenizer", "<0xE9>"), ("latin1", "é"), ("replace", "\ufffd")]:
        vocab, strs = decode_vocab(tok, byte2str_fallback=fallback)
        assert vocab[byte_e9] == b"\xe9"
        assert strs[byte_e9] == want
    gpt2 = load_tokenizer("gpt-2")
    vocab, strs = decode_vocab(gpt2)
    assert all(s == t.decode() for t, s in zip(vocab, strs) if _is_utf8(t))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_bad_arguments_are_named(vocab_dir, tmp_path):
    tok = load_tokenizer("gpt-2")
    with pytest.raises(ValueError, match="byte2str_fallback"):
        decode_vocab(tok, byte2str_fallback="utf16")
    with pytest.raises(TypeError, match="tokenizer"):
        decode_vocab(object())
    with pytest.raises(ValueError, match="invalid JSON"):
        byte_vocab_from_tokenizer_json("{not json")
    with pytest.raises(TypeError, match="text"):
        byte_vocab_from_tokenizer_json(b"{}")
    with pytest.raises(FileNotFoundError, match="No such file"):
        byte_vocab_from_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="magic|GGUF"):
        byte_vocab_from_gguf(bad)


def test_undecodable_tokenizers_raise_naming_the_kind():
    from tokenizers import Regex, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.decoder = decoders.CTC()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match="CTC"):
        decode_vocab(tok)
    backend.decoder = decoders.Replace(Regex("a+"), "b")
    with pytest.raises(ValueError, match="Regex"):
        decode_vocab(PreTrainedTokenizerFast(tokenizer_object=backend))

    class Opaque:
        def get_vocab(self):
            return {"a": 0}

        def __len__(self):
            return 1

    with pytest.raises(ValueError, match="Opaque"):
        decode_vocab(Opaque())


def test_wordpiece_unigram_and_wordlevel_fast_tokenizers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "play": 1, "##ing": 2, "##ed": 3}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    vocab, _ = decode_vocab(tok)
    assert vocab[:4] == [b"[UNK]", b" play", b"ing", b"ed"]
    assert joined(vocab, tok.encode("playing played", add_special_tokens=False)) == b" playing played"

    uni = Tokenizer(
        models.Unigram([("<unk>", 0.0), ("\u2581a", -1.0), ("b", -2.0), ("<0x0A>", -3.0)], 0, byte_fallback=True)
    )
    uni.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
    vocab, _ = decode_vocab(PreTrainedTokenizerFast(tokenizer_object=uni, unk_token="<unk>"))
    assert vocab[:4] == [b"<unk>", b" a", b"b", b"\n"]

    wl = Tokenizer(models.WordLevel({"x": 0, "<unk>": 1}, unk_token="<unk>"))
    vocab, _ = decode_vocab(PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>"))
    assert vocab == [b"x", b"<unk>"]


def test_token_identity_ordering_and_pickle():
    a, b, a2 = Token(1, b"ab"), Token(2, b"ab"), Token(1, b"ab")
    assert isinstance(a, bytes) and a.token_id == 1
    assert a != b and a == a2 and hash(a) == hash(a2)
    assert len({a, b, a2}) == 2
    assert a < b and b > a and a <= a2 and a >= a2
    assert a == b"ab" and b"ab" == a and a + b"c" == b"abc" and a[:1] == b"a"
    assert sorted([Token(3, b"a"), Token(0, b"z")])[0].token_id == 0
    back = pickle.loads(pickle.dumps(b))
    assert isinstance(back, Token) and back.token_id == 2 and bytes(back) == b"ab"
    assert repr(a) == "Token(token_id=1, byte_string=b'ab')"
    vocab, _ = decode_vocab(load_tokenizer("gpt-2"))
    assert all(t.token_id == i for i, t in enumerate(vocab))
