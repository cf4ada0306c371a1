"""Incremental detokenization with stop strings, O(1) tokenizer work per token.

The prefix/read-offset technique (vLLM): decode a short window of recent ids twice, with and
without the newest ones, and take the difference. The window starts on a token whose text
was already complete, so decoders that treat the first token specially (SentencePiece drops
its leading space) see the same context as in a full decode. Text whose last character is
still incomplete (byte-level BPE splits UTF-8 characters across tokens: it decodes to a
trailing "\ufffd") stays pending until a later token completes it.

With a `tokenizers` backend the common token goes through its `DecodeStream` (the same
technique in Rust: one call instead of two Python-wrapped decodes, about a seventh of the
cost). It answers None exactly when the window's delta is empty or incomplete; only then are
the two decodes run, to know the pending text. Should the two ever disagree, the request
goes on with the decodes alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt ids decoded ahead of the output, as context for the first window (vLLM uses 5).
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


def _decode_stream(tokenizer: Any, context: list[int], skip_special_tokens: bool):
    """(backend, stream) for a tokenizer with a `tokenizers` backend, else (None, None)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        if not isinstance(backend, Tokenizer):
            return None, None
        return backend, DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)
    except (ImportError, TypeError):  # a tokenizers without DecodeStream(ids=...)
        return None, None


class _TextBuffer:
    """Append-only text kept as parts, so appending and reading a recent slice cost the
    slice, not the whole text (a `str +=` on an attribute copies it every time)."""

    __slots__ = ("_length", "_parts")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def append(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)

    def tail(self, start: int) -> str:
        """The text from `start` on."""
        need = self._length - max(start, 0)
        if need <= 0:
            return ""
        pieces, got, i = [], 0, len(self._parts) - 1
        while got < need:
            pieces.append(self._parts[i])
            got += len(self._parts[i])
            i -= 1
        text = "".join(reversed(pieces))
        return text[len(text) - need :]

    def full(self) -> str:
        text = "".join(self._parts)
        self._parts = [text] if text else []  # later reads of the whole text start joined
        return text


class IncrementalDetokenizer:
    """Turns one request's output ids into text, one id at a time, and watches stop strings.

    `text` always equals `tokenizer.decode(output_ids)` (without space clean-up), truncated
    before the first stop string once one appears.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if any(not s for s in stop):
            raise ValueError("stop must not contain an empty string")
        self._tokenizer = tokenizer
        # Clean-up rewrites text already streamed (" ." -> "."), so it stays off.
        self._decode_kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
            "clean_up_tokenization_spaces": False,
        }
        self._stop = tuple(stop)
        # Stop strings count only from this many output tokens on (SamplingParams.min_tokens);
        # one that completes earlier is passed over, as in vLLM.
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._max_stop = max(map(len, self._stop), default=0)
        self._ids = self._prompt_context(prompt_token_ids)  # the decode window
        self._read_offset = len(self._ids)  # window ids before it are already in the text
        self._committed = _TextBuffer()  # text of every output id before the read offset
        self._pending = ""  # text of the ids after it; ends in an incomplete character
        self._searched = 0  # length of stable text already searched for stop strings
        self._stopped: str | None = None
        self._final = ""  # the text, truncated before the stop string, once stopped
        self._backend, self._stream = _decode_stream(tokenizer, self._ids, skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **self._decode_kwargs)

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        # A prompt cut inside a character would glue its bytes to the output's; decode the
        # output alone then, as `tokenizer.decode(output_ids)` does.
        return [] if self._decode(context).endswith(_REPLACEMENT) else context

    @property
    def text(self) -> str:
        """Output text so far (truncated before the stop string once one was found)."""
        if self._stopped is not None:
            return self._final
        return self._committed.full() + self._pending

    def append(self, token_id: int) -> str | None:
        """Adds one generated id; returns the stop string if the text now contains one."""
        if self._stopped is not None:
            raise RuntimeError(f"append after stop string {self._stopped!r} was found")
        self._ids.append(token_id)
        self._num_tokens += 1
        delta = None
        if self._stream is not None:
            delta = self._stream.step(self._backend, token_id)
        if delta is None:  # no stream, or an empty or incomplete delta: the window tells
            prefix_text = self._decode(self._ids[: self._read_offset])
            delta = self._decode(self._ids)[len(prefix_text) :]
            if delta and not delta.endswith(_REPLACEMENT):
                self._stream = None  # the stream held back a complete delta: not in step
        if delta.endswith(_REPLACEMENT):
            self._pending = delta
        elif delta:
            self._committed.append(delta)
            self._pending = ""
            # The window now starts at the old read offset: complete text, bounded length.
            del self._ids[: self._read_offset]
            self._read_offset = len(self._ids)
        # An empty delta (a skipped special token) keeps the window, so its context stays.
        if not self._stop:
            return None
        if self._num_tokens < self._min_tokens:
            self._searched = len(self._committed) + len(self._pending.rstrip(_REPLACEMENT))
            return None
        return self._check_stop()

    def _stable_tail(self, start: int) -> str:
        """Stable text from `start` on: all but the pending incomplete character(s).

        Lossy UTF-8 decoding runs left to right, so everything before a trailing run of
        replacement characters is final.
        """
        stable_pending = self._pending.rstrip(_REPLACEMENT)
        if start <= len(self._committed):
            return self._committed.tail(start) + stable_pending
        return stable_pending[start - len(self._committed) :]

    def _check_stop(self) -> str | None:
        # A new match ends in the new text, so it starts at most max_stop - 1 chars before it.
        start = max(0, self._searched - self._max_stop + 1)
        region = self._stable_tail(start)
        self._searched = start + len(region)
        hits = [(i, len(s), s) for s in self._stop if (i := region.find(s)) >= 0]
        if not hits:
            return None
        index, _, stop = min(hits)  # the earliest, then the shortest
        self._final = self._stable_tail(0)[: start + index]
        self._stopped = stop
        return stop

    def emittable_text(self, finished: bool) -> str:
        """Text safe to stream now; while unfinished, a prefix of every later result."""
        return self.emittable_since(0, finished)

    def emittable_since(self, start: int, finished: bool) -> str:
        """`emittable_text(finished)[start:]`, at the cost of that slice: what a delta
        output streams after `start` characters were sent."""
        if self._stopped is not None:
            return self._final[start:]
        if finished:
            if start <= len(self._committed):
                return self._committed.tail(start) + self._pending
            return self._pending[start - len(self._committed) :]
        tail_start = max(0, len(self._committed) - self._max_stop)
        tail = self._stable_tail(tail_start)
        keep = tail_start + len(tail) - self._held_back(tail)
        return self._stable_tail(start)[: max(keep - start, 0)]

    def _held_back(self, tail: str) -> int:
        """Length of the longest suffix of `tail` that could begin a stop string."""
        for k in range(min(self._max_stop - 1, len(tail)), 0, -1):
            suffix = tail[-k:]
            if any(s.startswith(suffix) for s in self._stop):
                return k
        return 0
