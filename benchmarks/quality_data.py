"""Token ids for the quality benchmark: perplexity windows of a text, and passkey prompts.

The benchmark's core (`benchmarks.quality`) takes token ids only; this is the one place that
needs a tokenizer, so tokenizer-less models can still be measured from a list of ids.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Passkey retrieval as in Mohtashami & Jaggi (2023): a key line hidden in repeated filler.
INSTRUCTION = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the pass key."
)
FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
# Starting the assistant's answer keeps a small model on topic and the answer short.
ANSWER_PREFIX = "The pass key is"


@dataclass(frozen=True, slots=True)
class Passkey:
    ids: list[int]
    key: str
    length: int  # target length: prompt + answer tokens
    depth: float  # share of the filler before the key
    trial: int


def load_ids(text_path: Path, token_ids_path: Path | None, tokenizer) -> list[int]:
    """The evaluation text as token ids: a JSON list of ids, or a text file tokenized with
    the model's tokenizer (no BOS: windows start mid-text)."""
    if token_ids_path is not None:
        ids = json.loads(token_ids_path.read_text())
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"{token_ids_path} must hold a JSON list of token ids")
        return ids
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass --token-ids instead of --text")
    return tokenizer.encode(text_path.read_text(encoding="utf-8"), add_special_tokens=False)


def ppl_windows(ids: Sequence[int], window: int, count: int) -> list[list[int]]:
    """`count` non-overlapping windows spread evenly over the text, the first at its start."""
    available = len(ids) // window
    if count > available:
        raise ValueError(
            f"the text has {len(ids)} tokens: room for {available} windows of {window}, not {count}"
        )
    stride = available // count
    return [list(ids[i * stride * window : (i * stride + 1) * window]) for i in range(count)]


def passkey_prompts(
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    answer_tokens: int,
    seed: int,
) -> list[Passkey]:
    """Chat-formatted prompts of `length - answer_tokens` tokens at most, with a random
    5-digit key after `depth` of the filler. The same keys serve every policy and state."""
    head, tail = _template_parts(tokenizer)
    filler = tokenizer.encode(FILLER, add_special_tokens=False)
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = str(rng.randint(10000, 99999))
                needle = tokenizer.encode(NEEDLE.format(key=key), add_special_tokens=False)
                room = length - answer_tokens - len(head) - len(needle) - len(tail)
                if room < len(filler):
                    raise ValueError(f"passkey length {length} leaves no room for filler")
                units = room // len(filler)
                before = round(depth * units)
                ids = head + filler * before + needle + filler * (units - before) + tail
                prompts.append(Passkey(ids, key, length, depth, trial))
    return prompts


def _template_parts(tokenizer) -> tuple[list[int], list[int]]:
    """Ids before the haystack (template header, instruction) and after it (question,
    assistant header, the answer's first words)."""
    marker = "@@HAYSTACK@@"
    content = f"{INSTRUCTION}\n\n{marker}\n\n{QUESTION}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(marker)
    # The template writes its own special tokens (BOS included where it has one).
    return (
        tokenizer.encode(head, add_special_tokens=False),
        tokenizer.encode(tail + ANSWER_PREFIX, add_special_tokens=False),
    )


def passkey_found(key: str, answer: str) -> bool:
    # Digits only, so "12,345" or "1 2 3 4 5" count as the key.
    return key in re.sub(r"\D", "", answer)
