"""Llama 3.1-3.3 JSON calls: the whole answer is the calls, each a JSON object with
`parameters`, several joined by "; ", after an optional `<|python_tag|>` (a special token,
so usually gone from the text):

    {"name": "get_weather", "parameters": {"city": "Paris"}}

An answer that does not start with a call is content, whatever follows.
"""

from __future__ import annotations

import json
from typing import Any

from server.serving.tool_calls.json_text import json_end, loads_or_none, skip_space
from server.serving.tool_calls.parser import Scan, ToolCallParser, call_of, could_be_call

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"
    arguments_key = "parameters"

    def scan(self, text: str, names: set[str], final: bool) -> Scan:
        scan = Scan()
        position = skip_space(text, 0)
        rest = text[position:]
        if rest.startswith(PYTHON_TAG):
            position = skip_space(text, position + len(PYTHON_TAG))
        elif rest and PYTHON_TAG.startswith(rest) and not final:
            return scan  # may be the tag: all held
        while position < len(text) and text[position] == "{":
            end = json_end(text, position)
            if end is None:  # unfinished: a call being written, or content
                if not could_be_call(text[position:], names):
                    break
                scan.unfinished = final
                return scan
            call = call_of(loads_or_none(text[position:end]), names)
            if call is None:
                break
            scan.call(call)
            position = skip_space(text, end)
            if text.startswith(";", position):
                position = skip_space(text, position + 1)
        if not scan.calls:
            if position >= len(text) and not final:
                return scan  # nothing but whitespace (or the tag) yet: held
            return Scan(pieces=[text])  # not calls: all of it is content
        scan.text(text[position:])
        return scan

    def grammar(self, body_rule: str, parallel: bool) -> str:
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: {body_rule}\n"

    def instructions(self) -> str:
        return ('To call one, answer with nothing but a JSON object {"name": <function name>, '
                '"parameters": <arguments as a JSON object>}; several calls are joined by "; ".')

    def write_calls(self, calls: list[dict[str, Any]]) -> str:
        return "; ".join(json.dumps({"name": call["name"], "parameters": call["arguments"]})
                         for call in calls)
