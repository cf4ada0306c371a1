"""The engine core's grammar compiler: the tokenizer's vocabulary as llguidance sees it (built
once, on the first constrained request), grammar texts cached per constraint, and one
matcher per constrained sequence."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from tova_engine.errors import InvalidRequestError
from tova_engine.structured.spec import StructuredOutputs

logger = logging.getLogger("tova_engine")


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, cache_size: int = 256) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        with self._lock:
            return self._build_tokenizer()

    def _build_tokenizer(self):
        if self._tokenizer is None:
            if self._hf_tokenizer is None:
                raise InvalidRequestError(
                    "structured_outputs", "structured outputs need the model's tokenizer"
                )
            import llguidance.hf

            started = time.perf_counter()
            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
            )
            logger.info(
                "structured outputs: vocabulary of %d tokens read in %.2f s",
                self.vocab_size,
                time.perf_counter() - started,
            )
        return self._tokenizer

    def grammar(self, spec: StructuredOutputs) -> str:
        with self._lock:  # the core's input thread and its loop (in process) both compile
            return self._grammar(spec)

    def _grammar(self, spec: StructuredOutputs) -> str:
        key = spec.key()
        text = self._grammars.get(key)
        if text is None:
            text = spec.to_grammar()
            self._grammars[key] = text
            if len(self._grammars) > self._cache_size:
                self._grammars.popitem(last=False)
        else:
            self._grammars.move_to_end(key)
        return text

    def matchers(self, params) -> list | None:
        """One fresh matcher per sequence of a request with SamplingParams `params`; None
        without a constraint."""
        spec = params.structured_outputs
        return None if spec is None else [self.matcher(spec) for _ in range(params.n)]

    def matcher(self, spec: StructuredOutputs):
        """A fresh matcher at the start of the constrained output."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._ll_tokenizer(), self.grammar(spec), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(spec.kind, f"invalid {spec.kind}: {matcher.get_error()}")
        return matcher
