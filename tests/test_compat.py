"""The compat switch and genlm-backend 0.3.1's surface.

The surface test reads genlm-backend's released sdist (fetched into the asset
cache, never copied here) and checks that every public module, class, function
and method it defines has a counterpart in genlm-anyio that takes at least the
same parameters, under the same ``genlm.backend...`` path once the switch is on.
"""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
from helpers import load_tokenizer

from genlm_anyio import Token, compat, decode_vocab
from genlm_anyio.cache import OutputCache
from genlm_anyio.tokenization.bytes import ByteDecoderError, ByteVocabError, check_byte_decoder, get_byte_vocab
from tools import assets

REFERENCE = "genlm-backend==0.3.1"

# genlm-backend names that genlm-anyio leaves out on purpose (docs/compat.md says why).
LEFT_OUT = {
    # The timer batching's internals: genlm-anyio batches without a timer or a query list.
    "genlm.backend.llm.hf:AsyncTransformer.add_query",
    "genlm.backend.llm.hf:AsyncTransformer.batch_evaluate_queries",
    "genlm.backend.llm.hf:AsyncTransformer.walk_cache",
    "genlm.backend.llm.hf:Query",
    "genlm.backend.llm.base:BatchAbandoned",
    "genlm.backend.llm.base:batch_abandoned",
    "genlm.backend.llm.base:fail_futures",
    # The per-token logprob trie of the timer batching; genlm-anyio's caches are kv_cache.py's.
    "genlm.backend.cache:TokenTrie",
    # vLLM's engine internals, replaced by the genlm_anyio.backends.vllm package.
    "genlm.backend.llm.vllm:BackendScheduler",
    "genlm.backend.llm.vllm:AsyncVirtualLM.release_all",
    "genlm.backend.llm.vllm:AsyncVirtualLM.cleanup",
    # SGLang's engine internals.
    "genlm.backend.llm.sgl:AsyncSGLTransformer.reset_async_queries",
}
# genlm-anyio has this engine's class name, not its methods yet (docs/compat.md).
NOT_YET_METHODS = {"genlm.backend.llm.sgl"}


def _reference_sources() -> dict[str, str]:
    """Module name -> source of every module in genlm-backend's sdist."""
    archive = assets.download(REFERENCE, source=True)
    sources = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if parts[1:3] == ["genlm", "backend"] and member.name.endswith(".py"):
                module = ".".join(parts[1:])[: -len(".py")].removesuffix(".__init__")
                sources[module] = tar.extractfile(member).read().decode()
    return sources


def _definitions(body: list[ast.stmt]) -> list[ast.stmt]:
    """Top-level defs of a module, including those under ``if``/``try`` (optional engines)."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):
            out += _definitions(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                out += _definitions(handler.body)
        else:
            out.append(node)
    return out


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = fn.args
    return [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]


def reference_surface() -> dict[str, list[str]]:
    """``module:name`` (or ``module:Class.method``) -> parameter names, for every public definition."""
    surface: dict[str, list[str]] = {}
    for module, source in _reference_sources().items():
        for node in _definitions(ast.parse(source).body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                surface[f"{module}:{node.name}"] = _params(node)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                surface[f"{module}:{node.name}"] = []
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                        surface[f"{module}:{node.name}.{item.name}"] = _params(item)
    return surface


# Run in a fresh interpreter: the switch must not outlive the check in this one
# (other tests compare with the real genlm-backend).
_CHECK = """
import importlib, inspect, json, sys
import genlm_anyio.compat
genlm_anyio.compat.install()
missing = []
for key, params in json.load(sys.stdin):
    module_name, _, qualname = key.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        missing.append(f"{key}: {exc}")
        continue
    if params and callable(obj):
        ours = inspect.signature(obj).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in ours.values())
        absent = [p for p in params if p not in ours and not takes_any]
        if absent:
            missing.append(f"{key}: no parameter(s) {absent}")
print(json.dumps(missing))
"""


def _missing_from_ours() -> list[str]:
    wanted = []
    for key, params in sorted(reference_surface().items()):
        module_name, _, qualname = key.partition(":")
        owner = f"{module_name}:{qualname.split('.')[0]}"
        if module_name in NOT_YET_METHODS and "." in qualname:
            continue
        if key not in LEFT_OUT and owner not in LEFT_OUT:
            wanted.append((key, params))
    out = subprocess.run(
        [sys.executable, "-c", _CHECK], input=json.dumps(wanted), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_every_public_name_of_genlm_backend_has_a_counterpart():
    missing = _missing_from_ours()
    assert not missing, "\n".join(missing)


def test_the_switch_resolves_genlm_backend_to_genlm_anyio():
    script = textwrap.dedent(
        f"""
        import sys
        import genlm_anyio.compat as compat
        compat.install()
        import genlm.backend
        from genlm.backend.tokenization import Token
        from genlm.backend.llm import AsyncTransformer, load_model_by_name
        import genlm.backend.llm.hf as hf
        import genlm.backend.trie.base as trie_base
        import genlm.backend.cache as cache
        import genlm_anyio, genlm_anyio.backends.hf, genlm_anyio.trie.token_trie
        from genlm_anyio.compat import legacy
        from genlm.backend.llm.base import AsyncLM, MockAsyncLM
        assert MockAsyncLM is legacy.MockAsyncLM and issubclass(MockAsyncLM, genlm_anyio.MockAsyncLM)
        for name in genlm_anyio.__all__:
            assert getattr(genlm.backend, name) is compat.legacy_of(getattr(genlm_anyio, name)), name
        assert genlm.backend.llm.hf is hf and hf.AsyncTransformer is AsyncTransformer
        assert trie_base.TokenCharacterTrie is genlm_anyio.trie.token_trie.TokenCharacterTrie
        assert Token is genlm_anyio.Token and issubclass(AsyncTransformer, genlm_anyio.AsyncTransformer)
        assert cache.OutputCache.__module__ == "genlm_anyio.cache"
        lm = load_model_by_name({str(assets.smollm2_dir())!r}, backend="mock")
        assert type(lm) is MockAsyncLM and isinstance(lm, AsyncLM) and isinstance(lm, genlm_anyio.AsyncLM)
        print("switched")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "switched"


# What genlm-backend 0.3.1 has and genlm-anyio's own classes leave to genlm_anyio.compat.legacy.
LEFTOVERS = ("set_lora", "clear_lora", "reset_async_queries", "shutdown", "cleanup", "_task")
LEFTOVER_ARGUMENTS = ("timeout", "cache_opts")


def test_genlm_anyios_own_classes_carry_none_of_genlm_backends_leftovers():
    import importlib
    import inspect

    from genlm_anyio.compat import legacy

    # The switch's list (kept as strings, so that installing imports no torch) names every legacy class.
    assert {key.partition(":")[2] for key in compat._LEGACY} == set(legacy.__all__)
    for key in sorted(compat._LEGACY):
        module, _, name = key.partition(":")
        ours = getattr(importlib.import_module(module), name)
        theirs = compat.legacy_of(ours)
        assert theirs is not ours and theirs.__name__ == name, key
        if inspect.isclass(ours):
            assert issubclass(theirs, ours), key
            assert not [attr for attr in LEFTOVERS if hasattr(ours, attr)], key
            assert not [arg for arg in LEFTOVER_ARGUMENTS if arg in inspect.signature(ours).parameters], key


def test_installing_does_not_import_torch():
    script = "import sys, genlm_anyio.compat as c; c.install(); import genlm.backend.tokenization.bytes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runner_runs_an_unchanged_program(tmp_path):
    program = tmp_path / "client.py"
    program.write_text(
        "import sys\nfrom genlm.backend import decode_vocab, Token\nprint(Token.__module__, sys.argv[1:])\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "genlm_anyio.compat", str(program), "a", "b"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "genlm_anyio.vocab ['a', 'b']"
    module = subprocess.run(
        [sys.executable, "-m", "genlm_anyio.compat", "-m", "client", "x"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert module.stdout.strip() == "genlm_anyio.vocab ['x']"


def test_the_environment_variable_switches_a_fresh_interpreter(tmp_path):
    script = "from genlm.backend import Token; print(Token.__module__)"
    env = {**__import__("os").environ, compat.ENV_VAR: "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "genlm_anyio.vocab"


@pytest.mark.slow  # imports the real genlm-backend (and with it vLLM): ~20 s
def test_installing_after_genlm_backend_was_imported_is_an_error():
    pytest.importorskip("genlm.backend")  # only where the real genlm-backend is installed
    script = (
        "import genlm.backend.tokenization.token\nimport genlm_anyio.compat as c\n"
        "try:\n    c.install()\nexcept RuntimeError as e:\n    print('refused:', 'before' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "refused: True"


# -- Token ---------------------------------------------------------------------------------
def test_token_has_genlm_backends_api():
    token = Token(token_id=42, byte_string=b"hello")
    assert token.byte_string == b"hello" and type(token.byte_string) is bytes
    assert repr(token) == "Token(token_id=42, byte_string=b'hello')"
    assert Token.as_bytes(token) == b"hello" and type(Token.as_bytes(token)) is bytes
    assert Token.as_bytes("eos") == "eos"
    assert Token.is_plain_bytes(b"x") and not Token.is_plain_bytes(token) and not Token.is_plain_bytes("x")
    assert pickle.loads(pickle.dumps(token)) == token and pickle.loads(pickle.dumps(token)).token_id == 42
    assert token == b"hello" and token != Token(43, b"hello") and token == Token(42, b"other")


@pytest.mark.parametrize("bad", [("1", b"x"), (1.0, b"x"), (True, b"x"), (1, "x"), (1, None)])
def test_token_rejects_wrong_types(bad):
    with pytest.raises(TypeError, match="token_id|byte_string"):
        Token(*bad)


# -- tokenization.bytes -------------------------------------------------------------------
def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for code points from 256 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in set(printable))
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def test_check_byte_decoder_accepts_the_right_table_and_names_what_is_wrong():
    tok = load_tokenizer("gpt-2")
    check_byte_decoder(tok, _gpt2_byte_decoder())
    with pytest.raises(ByteDecoderError, match="no byte for"):
        check_byte_decoder(tok, {})
    wrong = _gpt2_byte_decoder() | {"a": 999}
    with pytest.raises(ByteDecoderError, match="999"):
        check_byte_decoder(tok, wrong)
    swapped = _gpt2_byte_decoder() | {"a": ord("b"), "b": ord("a")}
    with pytest.raises(ByteDecoderError, match="not its UTF-8 bytes"):
        check_byte_decoder(tok, swapped)


def test_piecewise_byte_readers_agree_with_the_rust_decoder():
    from genlm_anyio.tokenization.bytes import get_byte_tokens_from_byte_decoder, get_byte_tokens_from_sp
    from genlm_anyio.vocab import bytes_to_strs

    gpt2 = load_tokenizer("gpt-2")
    assert get_byte_tokens_from_byte_decoder(gpt2, _gpt2_byte_decoder()) == get_byte_vocab(gpt2)
    spm = load_tokenizer("llama-spm")
    assert get_byte_tokens_from_sp(spm)[3:] == get_byte_vocab(spm)[3:]  # ids 0-2 are <unk>, <s>, </s>
    tokens, strs = decode_vocab(gpt2, byte2str_fallback="latin1")
    assert bytes_to_strs(gpt2, tokens, "latin1") == strs


def test_get_byte_vocab_is_decode_vocabs_bytes():
    tok = load_tokenizer("qwen2")
    plain = get_byte_vocab(tok)
    tokens, _ = decode_vocab(tok)
    assert all(type(b) is bytes for b in plain[:100]) and plain == [bytes(t) for t in tokens]


def test_an_undecodable_vocabulary_is_a_value_error_that_says_why():
    class Broken:
        name_or_path = "broken-model"

        class backend_tokenizer:
            @staticmethod
            def to_str() -> str:
                return '{"model": {"type": "Nonexistent"}}'

        def __len__(self) -> int:
            return 3

    with pytest.raises(ValueError, match="Could not decode byte representation.*broken-model") as info:
        decode_vocab(Broken())
    assert isinstance(info.value.__cause__, ByteVocabError)
    with pytest.raises(ByteVocabError):
        get_byte_vocab(Broken())


# -- cache.OutputCache -----------------------------------------------------------------
def test_output_cache_is_a_bounded_lru():
    cache = OutputCache(maxsize=2)
    cache["a"], cache["b"] = torch.zeros(1), torch.ones(1)
    assert cache["a"].item() == 0  # "a" is now the most recent
    cache["c"] = torch.full((1,), 2.0)
    assert "b" not in cache and "a" in cache and "c" in cache and len(cache) == 2
    with pytest.raises(KeyError):
        cache["b"]
    cache.clear()
    assert len(cache) == 0


def test_output_cache_move_to_cpu_gives_back_the_same_device():
    cache = OutputCache(maxsize=1, move_to_cpu=True)
    value = torch.arange(3.0)
    cache["k"] = value
    assert cache.cache["k"][1].device.type == "cpu"
    assert torch.equal(cache["k"], value) and cache["k"].device == value.device


@pytest.mark.parametrize("size", [0, -1])
def test_output_cache_rejects_a_size_below_one(size):
    with pytest.raises(ValueError, match="maxsize"):
        OutputCache(size)
