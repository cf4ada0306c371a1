"""What every tool-call parser does, and the reading of its output that all of them share.

A parser knows one model family's call syntax both ways: how to ask for calls where the chat
template knows no tools (`instructions`, `write_calls`), the grammar that holds a required or
named choice to well-formed calls (`grammar`), and how to read calls back from the text
(`scan`). `scan` reads a text that may still be growing: what it returns for a prefix stays
true as the text goes on (a complete call stays one, released content stays content), so the
stream and the finished response read the same calls and the same content.
"""

from __future__ import annotations

import json
import re
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from server.serving.tool_calls.json_text import loads_or_none

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: dict[str, Any]

    @property
    def key(self) -> tuple[str, str]:
        """Equal for two calls of one function with the same arguments."""
        return self.name, json.dumps(self.arguments, sort_keys=True)


@dataclass
class Scan:
    """A text read as content pieces and calls, in order: `pieces[i]` is the text before
    `calls[i]` (one more piece than calls: the text after the last call). Text that may still
    turn into a call is in neither: held back until the text says."""

    pieces: list[str] = field(default_factory=lambda: [""])
    calls: list[ParsedCall] = field(default_factory=list)
    # The text ended inside a call, which is dropped (with the whitespace before it).
    unfinished: bool = False

    def text(self, piece: str) -> None:
        self.pieces[-1] += piece

    def call(self, call: ParsedCall) -> None:
        self.calls.append(call)
        self.pieces.append("")

    def content(self, final: bool) -> str:
        """The content around the calls: the whitespace beside a call dropped, the pieces
        joined by a newline. Before the end, trailing whitespace is held (a call may follow)."""
        shown = []
        for index, piece in enumerate(self.pieces):
            if index > 0:
                piece = piece.lstrip()
            if index < len(self.calls) or not final or self.unfinished:
                piece = piece.rstrip()
            if piece:
                shown.append(piece)
        return "\n".join(shown)


class ToolCallParser(ABC):
    name: ClassVar[str]
    # The key a call's arguments go under in the syntax the model is asked for.
    arguments_key: ClassVar[str] = "arguments"

    @abstractmethod
    def scan(self, text: str, names: set[str], final: bool) -> Scan:
        """The calls to declared functions in `text` and the content around them. final: the
        text is whole; an unfinished call is dropped, not left in the content."""

    @abstractmethod
    def grammar(self, body_rule: str, parallel: bool) -> str:
        """A Lark grammar's rules, from `start`, of one call (or several, parallel), where
        `body_rule` names a rule matching one call's JSON object."""

    @abstractmethod
    def instructions(self) -> str:
        """How to call, for a system prompt that lists the functions."""

    @abstractmethod
    def write_calls(self, calls: list[dict[str, Any]]) -> str:
        """An assistant turn's calls ({"name", "arguments"} each) as this syntax writes them."""

    def call_id(self) -> str:
        return "call_" + secrets.token_hex(12)

    def call_body(self, name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
        """The JSON Schema of one call of `name` in this syntax."""
        return {"type": "object",
                "properties": {"name": {"const": name},
                               self.arguments_key: parameters or NO_ARGUMENTS},
                "required": ["name", self.arguments_key], "additionalProperties": False}


def call_of(value: Any, names: set[str]) -> ParsedCall | None:
    """A call read from a parsed JSON object: a declared name, and arguments (or parameters,
    as Llama writes them) that are an object or JSON text of one."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the object as a string
        arguments = loads_or_none(arguments)
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], arguments)


_NAME_FIRST = re.compile(r'\{\s*"name"\s*:\s*"([A-Za-z0-9_-]*)("?)')


def could_be_call(fragment: str, names: set[str]) -> bool:
    """Whether an unfinished JSON object may yet be a call to a declared function: it starts
    with {"name": and the name so far begins a declared one (or is one, once closed). Text
    that cannot be a call is released as content rather than held to the end."""
    match = _NAME_FIRST.match(fragment)
    if match is None:
        return '{"name":"'.startswith("".join(fragment.split()))
    written, closed = match.groups()
    if closed:
        return written in names
    return any(name.startswith(written) for name in names)
