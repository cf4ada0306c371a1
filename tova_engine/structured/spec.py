"""What a request's output must follow: exactly one of a JSON Schema, any JSON object, a
regular expression, a choice of strings, or a Lark grammar (vLLM's `structured_outputs`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tova_engine.errors import InvalidRequestError

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    json: str | dict[str, Any] | None = None  # a JSON Schema (a dict or its text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # Lark syntax (llguidance's dialect)
    # JSON kinds: whitespace between tokens allowed (else compact: `{"a":1}`). Off by default:
    # a small model given the choice pads its JSON with blank lines until max_tokens.
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs",
                f"structured_outputs takes exactly one of {', '.join(_KINDS)}; got "
                f"{', '.join(given) or 'none'}",
            )
        if self.choice is not None:
            choice = tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise InvalidRequestError(
                    "choice", "choice must be a non-empty list of non-empty strings"
                )
            object.__setattr__(self, "choice", choice)
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(kind, f"{kind} must be a string")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise InvalidRequestError("json", "json must be a JSON Schema (an object)")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """Equal for equal constraints: the compile cache's key."""
        value = getattr(self, self.kind)
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, tuple):
            value = json.dumps(list(value))
        spacing = " any-whitespace" if self.any_whitespace and self.kind.startswith("json") else ""
        return f"{self.kind}{spacing}:{value}"

    def to_grammar(self) -> str:
        """llguidance's grammar text; raises InvalidRequestError naming the field when the
        constraint is malformed (checked without a tokenizer: the front end can refuse it)."""
        from llguidance import LLMatcher

        kind = self.kind
        try:
            spacing = {"whitespace_flexible": self.any_whitespace}
            if kind == "json_object":
                grammar = LLMatcher.grammar_from_json_schema({"type": "object"}, spacing)
            elif kind == "json":
                schema = self.json if isinstance(self.json, dict) else json.loads(self.json)
                if not isinstance(schema, dict):
                    raise ValueError("a JSON Schema is an object")
                grammar = LLMatcher.grammar_from_json_schema(schema, spacing)
            elif kind == "regex":
                grammar = LLMatcher.grammar_from_regex(self.regex)
            elif kind == "choice":
                alternatives = "|".join(re.escape(c) for c in self.choice)
                grammar = LLMatcher.grammar_from_regex(f"({alternatives})")
            else:
                grammar = LLMatcher.grammar_from_lark(self.grammar)
        except ValueError as exc:
            raise InvalidRequestError(kind, f"invalid {kind}: {exc}") from None
        error = LLMatcher.validate_grammar(grammar)
        if error:
            raise InvalidRequestError(kind, f"invalid {kind}: {error}")
        return grammar
