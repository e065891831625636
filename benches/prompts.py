"""Long prompts for the workload benchmarks, the same on every run.

Real programs put hundreds to thousands of tokens before the particles: few-shot
examples, a schema, a document. These build such prompts from fixed word lists
with a seeded generator, so that the continuation is not predictable (particles
sampled after them stay distinct) and every run sees the same ids.
"""

from __future__ import annotations

import json
import random
from typing import Any

_ADJECTIVES = (
    "amber quiet crooked silver patient hollow brisk velvet distant frozen gentle restless "
    "narrow golden humble wooden bitter curious scarlet ancient tidy muddy hidden bright"
).split()
_NOUNS = (
    "lighthouse violin orchard ferry lantern harbour notebook glacier mill compass kettle "
    "bridge garden tunnel market clock canal meadow engine library river tower vineyard"
).split()
_VERBS = (
    "borrowed painted measured followed repaired carried ignored counted watched described "
    "planted folded traded noticed guarded crossed"
).split()
_PLACES = (
    "Lisbon Quebec Oslo Kyoto Lima Dakar Perth Tbilisi Porto Hanoi Montreal Cusco Bergen Tunis Fez Galway"
).split()


def _sentence(rng: random.Random) -> str:
    a, b = rng.sample(_ADJECTIVES, 2)
    n, m = rng.sample(_NOUNS, 2)
    return f"The {a} {n} {rng.choice(_VERBS)} a {b} {m} in {rng.choice(_PLACES)}."


def text_prompt(tokenizer: Any, n_tokens: int, seed: int = 0) -> list[int]:
    """Exactly ``n_tokens`` token ids of numbered notes in random words."""
    rng = random.Random(seed)
    ids: list[int] = []
    note = 0
    while len(ids) < n_tokens:
        note += 1
        text = f"Note {note}: " + " ".join(_sentence(rng) for _ in range(4)) + "\n"
        ids += tokenizer.encode(text, add_special_tokens=False)
    return ids[:n_tokens]


def few_shot_text(tokenizer: Any, n_tokens: int, question: str, seed: int = 0) -> list[int]:
    """About ``n_tokens`` ids: question-and-answer examples, then ``question`` (``A:`` open)."""
    rng = random.Random(seed)
    text = "Each answer describes the place in one sentence.\n\n"
    while len(tokenizer.encode(text, add_special_tokens=False)) < n_tokens:
        text += f"Q: What is {rng.choice(_PLACES)} known for?\nA: {_sentence(rng)}\n\n"
    return tokenizer.encode(text + f"Q: {question}\nA:", add_special_tokens=False)


def _schema_and_answer(rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    fields = rng.sample(_NOUNS, 4)
    properties: dict[str, Any] = {}
    answer: dict[str, Any] = {}
    for name in fields:
        kind = rng.choice(("string", "integer", "enum"))
        if kind == "integer":
            properties[name] = {"type": "integer", "minimum": 0, "maximum": 500}
            answer[name] = rng.randint(0, 500)
        elif kind == "enum":
            options = rng.sample(_PLACES, 3)
            properties[name] = {"type": "string", "enum": options}
            answer[name] = rng.choice(options)
        else:
            properties[name] = {"type": "string", "minLength": 1}
            answer[name] = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    return {"type": "object", "properties": properties}, answer


def few_shot_json_chat(tokenizer: Any, n_tokens: int, schema: dict[str, Any], seed: int = 0) -> list[int]:
    """A chat prompt of about ``n_tokens`` ids: an instruction, example schemas with
    their answers, then ``schema`` to answer (the assistant's turn open)."""
    rng = random.Random(seed)
    conversation = [
        {
            "role": "system",
            "content": "You need to generate a JSON object that matches the schema below. "
            "Only generate the JSON object on a single line with no other text.",
        }
    ]

    def encode(turns: list[dict[str, str]]) -> list[int]:
        return tokenizer.apply_chat_template(
            conversation=turns, tokenize=True, add_generation_prompt=True, return_dict=False
        )

    while len(encode(conversation)) < n_tokens:
        example, answer = _schema_and_answer(rng)
        conversation.append({"role": "user", "content": json.dumps(example)})
        conversation.append({"role": "assistant", "content": json.dumps(answer)})
    return encode([*conversation, {"role": "user", "content": json.dumps(schema)}])
