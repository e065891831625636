"""Hostile tokenizer files: the readers' regression cases and hypothesis fuzzing
of ``byte_vocab_from_tokenizer_json`` and ``byte_vocab_from_gguf``.

Every call runs in a child process under a 2 GiB address-space limit
(:mod:`fuzz_sandbox`), so a crash is a failing test. A call may only return a
vocabulary or raise ValueError (TypeError for an argument of the wrong type); a
file that cannot be read is an OSError instead.
Each fuzz test prints how many cases it tried (``pytest -s``).
"""

from __future__ import annotations

import errno
import json
import struct

import pytest
from fuzz_sandbox import Sandbox
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SPARE_IDS = 1024  # rust/src/vocab/mod.rs: unused ids a vocabulary may leave beyond one per entry
FUZZ = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
HOSTILE_U64 = [0, 1, 2, 255, 1 << 20, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, (1 << 64) - 1]


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()
    print(f"\n[fuzz] {__name__}: {box.calls} calls in the memory-limited child")


def outcome(sandbox: Sandbox, op: str, *args) -> list[bytes] | str:
    """The vocabulary, or the ValueError's message; anything else fails the test."""
    reply = sandbox.call(op, *args)
    if reply[0] == "ok":
        assert isinstance(reply[1], list) and all(isinstance(b, bytes) for b in reply[1])
        return reply[1]
    assert reply[1] == "ValueError", f"{reply[1]}: {reply[2]}"
    return reply[2]


# -- GGUF files -------------------------------------------------------------------
STRING, ARRAY = 8, 9
FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
CONTROL = 3  # llama.cpp token type whose piece is its text as written


def g_string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def g_array(item_type: int, items: list[bytes]) -> bytes:
    return struct.pack("<IQ", item_type, len(items)) + b"".join(items)


def gguf(kvs: list[tuple[bytes, int, bytes]], version: int = 3) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs))
    return head + b"".join(g_string(k) + struct.pack("<I", t) + v for k, t, v in kvs)


def tokenizer_kvs(model: bytes, tokens: list[bytes], types: list[int] | None):
    kvs = [
        (b"tokenizer.ggml.model", STRING, g_string(model)),
        (b"tokenizer.ggml.tokens", ARRAY, g_array(STRING, [g_string(t) for t in tokens])),
    ]
    if types is not None:
        kvs.append((b"tokenizer.ggml.token_type", ARRAY, g_array(5, [struct.pack("<i", t) for t in types])))
    return kvs


def nested(depth: int, count: int) -> bytes:
    """``depth`` arrays, each claiming ``count`` items, around one array holding one u8."""
    return struct.pack("<IQ", ARRAY, count) * depth + struct.pack("<IQB", 0, 1, 7)


def write(tmp_path, data: bytes, name: str = "f.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_a_file_that_cannot_be_read_is_an_os_error_and_a_malformed_one_a_value_error(sandbox, tmp_path):
    missing = str(tmp_path / "missing.gguf")
    assert sandbox.call("gguf", missing) == (
        "error",
        "FileNotFoundError",
        f"[Errno {errno.ENOENT}] No such file or directory (opening it): {missing!r}",
    )
    # A directory opens, and its first read fails.
    kind, name, message = sandbox.call("gguf", str(tmp_path))
    assert (kind, name) == ("error", "IsADirectoryError") and message.endswith(f"(reading byte 0): {str(tmp_path)!r}")
    bad = write(tmp_path, b"NOPE" + bytes(64))
    assert outcome(sandbox, "gguf", bad) == f"malformed tokenizer: {bad}: not a GGUF file (bad magic)"


def test_deeply_nested_arrays_are_an_error_not_a_stack_overflow(sandbox, tmp_path):
    """50,000 nested arrays (600 KB) overflowed the stack of the recursive reader (SIGSEGV)."""
    data = gguf([(b"k", ARRAY, nested(50_000, 1))])
    assert len(data) > 600_000
    assert "nested more than 64 deep" in outcome(sandbox, "gguf", write(tmp_path, data))


def test_counts_not_backed_by_the_file_are_refused(sandbox, tmp_path):
    """130 nested arrays claiming 2^20 items each (1.6 KB) reserved ~32 MB a level and aborted."""
    data = gguf([(b"k", ARRAY, nested(130, 1 << 20))])
    assert len(data) < 1700
    assert "claims 1048576 items of at least 12 bytes" in outcome(sandbox, "gguf", write(tmp_path, data))
    tokens = (b"tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 1 << 20))
    assert "claims 1048576 items of at least 8 bytes" in outcome(sandbox, "gguf", write(tmp_path, gguf([tokens])))
    tokens = (b"tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 1 << 60))
    assert "more than the 4194304 allowed" in outcome(sandbox, "gguf", write(tmp_path, gguf([tokens])))


def test_a_large_unneeded_array_is_skipped_not_kept(sandbox, tmp_path):
    """A 128 MB u8 array used to be kept at 32 bytes an item (~4.3 GB); it is now
    read through, within the child's 2 GiB limit."""
    n = 128 << 20
    kvs = [(b"big", ARRAY, struct.pack("<IQ", 0, n) + bytes(n))] + tokenizer_kvs(b"gpt2", [b"a", b"b"], None)
    assert outcome(sandbox, "gguf", write(tmp_path, gguf(kvs))) == [b"a", b"b"]


def encoded(value_type: int, depth: int):
    """An encoded value of type ``value_type`` (arrays nested up to four deep)."""
    if value_type == STRING:
        return st.binary(max_size=20).map(g_string)
    if value_type == ARRAY:
        item_types = sorted(FIXED) + [STRING] + ([ARRAY] if depth < 4 else [])
        return st.sampled_from(item_types).flatmap(
            lambda t: st.lists(encoded(t, depth + 1), max_size=4).map(lambda items: g_array(t, items))
        )
    size = struct.calcsize(FIXED[value_type])
    return st.binary(min_size=size, max_size=size)


def any_value():
    """(type, encoded value) of any GGUF value type."""
    return st.sampled_from(sorted(FIXED) + [STRING, ARRAY]).flatmap(lambda t: encoded(t, 0).map(lambda v: (t, v)))


@st.composite
def gguf_files(draw):
    """A well-formed GGUF file: the tokenizer keys among random other metadata,
    and the vocabulary it must give (every token a control token, so its bytes
    are its piece)."""
    tokens = draw(st.lists(st.binary(max_size=8), max_size=20))
    model = draw(st.sampled_from([b"gpt2", b"llama", b"t5", b"bert", b"gemma4"]))
    kvs = tokenizer_kvs(model, tokens, [CONTROL] * len(tokens))
    extras = draw(st.lists(st.tuples(st.text(max_size=10).map(str.encode), any_value()), max_size=6))
    for key, (t, v) in extras:
        kvs.insert(draw(st.integers(0, len(kvs))), (b"x." + key, t, v))
    return gguf(kvs, version=draw(st.sampled_from([2, 3]))), tokens


@st.composite
def mutations(draw, data: bytes):
    """``data`` changed by a few hostile edits: counts and types overwritten, bytes
    flipped, inserted or cut."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["u64", "u32", "flip", "insert", "truncate"]))
        if edit == "u64":
            data[at : at + 8] = struct.pack("<Q", draw(st.sampled_from(HOSTILE_U64 + [len(data)])))
        elif edit == "u32":
            data[at : at + 4] = struct.pack("<I", draw(st.sampled_from([0, 8, 9, 12, 13, 255, (1 << 32) - 1])))
        elif edit == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
    return bytes(data)


def test_fuzz_well_formed_gguf_files_give_their_vocabulary(sandbox, tmp_path):
    cases = 0

    @settings(FUZZ, max_examples=150)
    @given(gguf_files())
    def case(file):
        nonlocal cases
        cases += 1
        data, tokens = file
        assert outcome(sandbox, "gguf", write(tmp_path, data)) == tokens

    case()
    print(f"\n[fuzz] well-formed GGUF files: {cases} cases")


def test_fuzz_mutated_gguf_files_give_a_vocabulary_or_a_value_error(sandbox, tmp_path):
    cases = 0

    @settings(FUZZ, max_examples=300)
    @given(st.data())
    def case(data):
        nonlocal cases
        cases += 1
        good, _ = data.draw(gguf_files())
        outcome(sandbox, "gguf", write(tmp_path, data.draw(mutations(good))))

    case()
    print(f"\n[fuzz] mutated GGUF files: {cases} cases")


def test_fuzz_random_bytes_after_a_gguf_header(sandbox, tmp_path):
    cases = 0

    @settings(FUZZ, max_examples=150)
    @given(st.sampled_from([2, 3]), st.sampled_from(HOSTILE_U64[:6]), st.binary(max_size=300))
    def case(version, n_kv, body):
        nonlocal cases
        cases += 1
        data = b"GGUF" + struct.pack("<IQQ", version, 0, n_kv) + body
        outcome(sandbox, "gguf", write(tmp_path, data))

    case()
    print(f"\n[fuzz] random GGUF bodies: {cases} cases")


# -- tokenizer JSON ----------------------------------------------------------------
def test_token_ids_from_the_file_are_bounded_by_its_entries(sandbox):
    """A 70-byte tokenizer.json with id 1e11 aborted the process; ids 2^62 and
    2^64-1 raised PanicException (a BaseException)."""
    for bad in (10**11, 1 << 62, (1 << 64) - 1):
        text = json.dumps({"model": {"type": "WordLevel", "vocab": {"a": bad}}})
        assert len(text) <= 70
        assert f"token id {bad} is out of range" in outcome(sandbox, "json", text)
        text = json.dumps(
            {"model": {"type": "WordLevel", "vocab": {"a": 0}}, "added_tokens": [{"id": bad, "content": "x"}]}
        )
        assert f"token id {bad} is out of range" in outcome(sandbox, "json", text)
    assert "invalid JSON" in outcome(sandbox, "json", json.dumps({"model": {"vocab": {"a": 1 << 64}}}))


def test_sparse_added_token_ids_keep_working(sandbox):
    """Added tokens numbered past a gap (as in tiktoken-style vocabularies) still decode."""
    text = json.dumps(
        {
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},
            "added_tokens": [{"id": 4, "content": "<|end|>"}, {"id": 2 * 3 + SPARE_IDS - 1, "content": "<|x|>"}],
        }
    )
    vocab = outcome(sandbox, "json", text)
    assert len(vocab) == 6 + SPARE_IDS and vocab[:5] == [b"a", b"b", b"", b"", b"<|end|>"] and vocab[-1] == b"<|x|>"


def test_a_growing_decoder_chain_is_an_error(sandbox):
    """40 Replace steps doubling one byte (2.7 KB) aborted on a 1 GiB allocation."""
    steps = [{"type": "Replace", "pattern": {"String": "a"}, "content": "aa"}] * 40
    text = json.dumps(
        {"model": {"type": "WordLevel", "vocab": {"a": 0}}, "decoder": {"type": "Sequence", "decoders": steps}}
    )
    assert 'the decoder grows piece "a" beyond 68 bytes' in outcome(sandbox, "json", text)


def test_deeply_nested_json_is_an_error(sandbox):
    """JSON nested 100,000 deep overflows no stack: a part that is parsed stops at
    serde_json's depth limit (128); the merges, skipped unparsed, are walked without recursion."""
    deep = "[" * 100_000 + "]" * 100_000
    assert "invalid JSON" in outcome(sandbox, "json", deep)
    assert "recursion limit exceeded" in outcome(
        sandbox, "json", f'{{"model": {{"vocab": {{}}}}, "pre_tokenizer": {deep}}}'
    )
    assert outcome(sandbox, "json", f'{{"model": {{"vocab": {{"a": 0}}, "merges": {deep}}}}}') == [b"a"]


ids = st.integers(0, 3000) | st.sampled_from(HOSTILE_U64) | st.integers(-5, -1)


def test_fuzz_token_ids(sandbox):
    """Any ids: the vocabulary by id (added tokens override the model's), or an
    error naming the largest id when it passes the bound."""
    cases = 0

    @settings(FUZZ, max_examples=300)
    @given(
        st.sampled_from(["BPE", "WordPiece", "WordLevel"]),
        st.dictionaries(st.text(max_size=6), ids, max_size=12),
        st.lists(st.tuples(ids, st.text(max_size=6)), max_size=6),
    )
    def case(kind, vocab, added):
        nonlocal cases
        cases += 1
        model = {"type": kind, "vocab": vocab}
        if kind == "BPE":
            model["merges"] = []
        text = json.dumps({"model": model, "added_tokens": [{"id": i, "content": c} for i, c in added]})
        got = outcome(sandbox, "json", text)
        entries = list(vocab.items()) + [(c, i) for i, c in added]
        if any(not 0 <= i < 1 << 64 for _, i in entries):
            assert isinstance(got, str) and "invalid JSON" in got
            return
        top = max((i for _, i in entries), default=-1)
        if top >= 2 * len(entries) + SPARE_IDS:
            assert isinstance(got, str) and f"token id {top} is out of range" in got
            return
        want = [b""] * (top + 1)
        for piece, i in entries:
            want[i] = piece.encode()
        assert got == want  # no decoder: every piece is its own text

    case()
    print(f"\n[fuzz] tokenizer JSON ids: {cases} cases")


def json_values():
    leaves = st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=8)
    return st.recursive(
        leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
    )


DECODERS = [
    "Sequence",
    "ByteLevel",
    "ByteFallback",
    "Replace",
    "Metaspace",
    "WordPiece",
    "BPEDecoder",
    "Fuse",
    "Strip",
    "CTC",
]


@st.composite
def decoders(draw, depth: int = 0):
    kind = draw(st.sampled_from(DECODERS if depth < 3 else DECODERS[1:]))
    d: dict = {"type": kind}
    if kind == "Sequence":
        d["decoders"] = draw(st.lists(decoders(depth + 1), max_size=5))
    for key in draw(st.lists(st.sampled_from(["pattern", "content", "replacement", "prefix", "suffix"]), max_size=3)):
        d[key] = draw(st.text(max_size=4) | st.builds(dict, String=st.text(max_size=3)) | json_values())
    return d


@st.composite
def tokenizer_files(draw):
    """Tokenizer JSON shaped like a real one, with random parts swapped for random values."""
    pieces = st.text(max_size=6)
    kind = draw(st.sampled_from(["BPE", "WordPiece", "WordLevel", "Unigram", None, "Other"]))
    if draw(st.booleans()):
        vocab = draw(st.lists(st.tuples(pieces, st.floats(allow_nan=False)).map(list), max_size=10))
    else:
        vocab = draw(st.dictionaries(pieces, ids, max_size=10))
    model: dict = {"vocab": vocab}
    if kind is not None:
        model["type"] = kind
    if draw(st.booleans()):
        model["merges"] = []
    doc = {
        "model": model,
        "added_tokens": draw(st.lists(st.builds(dict, id=ids, content=pieces), max_size=4)),
        "decoder": draw(st.none() | decoders()),
        "pre_tokenizer": draw(st.none() | st.just({"type": "ByteLevel"}) | json_values()),
    }
    for key in draw(st.lists(st.sampled_from(sorted(doc)), max_size=2)):
        doc[key] = draw(json_values())
    return json.dumps(doc)


def test_fuzz_tokenizer_json_structures(sandbox):
    cases = 0

    @settings(FUZZ, max_examples=250)
    @given(tokenizer_files() | json_values().map(json.dumps) | st.text(max_size=40))
    def case(text):
        nonlocal cases
        cases += 1
        got = outcome(sandbox, "json", text)
        if isinstance(got, list):
            assert len(got) <= 2 * text.count(",") + SPARE_IDS + 2

    case()
    print(f"\n[fuzz] tokenizer JSON structures: {cases} cases")
