"""Mistral calls after the `[TOOL_CALLS]` token: a JSON list of calls (Mistral 7B v0.3,
Mixtral, Nemo, Small 3),

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

or, from the v11 tokenizers on (Small 3.2, Magistral, Devstral), one call per marker:

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}

The markers are special tokens, which detokenizing usually drops: an answer that starts with
such a list, or with a declared name and its arguments, reads the same without them.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from server.serving.tool_calls.json_text import (
    json_end,
    loads_or_none,
    partial_suffix,
    skip_space,
)
from server.serving.tool_calls.parser import (
    ParsedCall,
    Scan,
    ToolCallParser,
    call_of,
    could_be_call,
)

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID_ALPHABET = string.ascii_letters + string.digits

# What reading one block of calls gave: calls and where they end, not calls, or unfinished.
_NOT_CALLS, _UNFINISHED = "not calls", "unfinished"


class MistralParser(ToolCallParser):
    name = "mistral"

    def scan(self, text: str, names: set[str], final: bool) -> Scan:
        scan = Scan()
        position = 0
        start = skip_space(text, 0)
        if start < len(text) and not text.startswith(MARKER, start):
            read = self._block(text, start, names)  # a block whose marker was dropped
            if read == _UNFINISHED:
                return scan  # held; dropped if the text ends here
            if read != _NOT_CALLS:
                calls, position = read
                for call in calls:
                    scan.call(call)
        while True:
            start = text.find(MARKER, position)
            if start < 0:
                hold = 0 if final else partial_suffix(text, MARKER)
                scan.text(text[position:len(text) - hold])
                return scan
            read = self._block(text, skip_space(text, start + len(MARKER)), names)
            if read == _UNFINISHED:  # held, and dropped if the text ends here
                scan.text(text[position:start])
                scan.unfinished = final
                return scan
            if read == _NOT_CALLS:
                scan.text(text[position:start + len(MARKER)])
                position = start + len(MARKER)
                continue
            calls, position_after = read
            scan.text(text[position:start])
            for call in calls:
                scan.call(call)
            position = position_after

    def _block(self, text: str, body: int, names: set[str]):
        """The calls of the block starting at `body`: ([calls], end), _NOT_CALLS or
        _UNFINISHED."""
        if body >= len(text):
            return _UNFINISHED
        if text[body] == "[":
            end = json_end(text, body)
            if end is None:
                inner = skip_space(text, body + 1)
                return _UNFINISHED if inner >= len(text) or could_be_call(text[inner:], names) \
                    else _NOT_CALLS
            value = loads_or_none(text[body:end])
            calls = [call_of(item, names) for item in value] if isinstance(value, list) else []
            if not calls or None in calls:
                return _NOT_CALLS
            return calls, end
        name = _NAME.match(text, body)
        if name is None:
            return _NOT_CALLS
        after = name.end()
        if after >= len(text) or ARGS.startswith(text[after:]):
            return _UNFINISHED if any(n.startswith(name.group()) for n in names) else _NOT_CALLS
        if text.startswith(ARGS, after):
            after += len(ARGS)
        after = skip_space(text, after)
        if name.group() not in names or not text.startswith("{", after):
            return _NOT_CALLS
        end = json_end(text, after)
        if end is None:
            return _UNFINISHED
        arguments = loads_or_none(text[after:end])
        if not isinstance(arguments, dict):
            return _NOT_CALLS
        return [ParsedCall(name.group(), arguments)], end

    def grammar(self, body_rule: str, parallel: bool) -> str:
        repeat = ' (", " call)*' if parallel else ""
        return f'start: "[" call{repeat} "]"\ncall: {body_rule}\n'

    def instructions(self) -> str:
        return (f"To call them, answer with nothing but {MARKER} followed by a JSON list of "
                'calls: [{"name": <function name>, "arguments": <arguments as a JSON object>}]')

    def write_calls(self, calls: list[dict[str, Any]]) -> str:
        return MARKER + json.dumps(calls)

    def call_id(self) -> str:
        """Nine letters and digits: Mistral's templates refuse any other id."""
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))
