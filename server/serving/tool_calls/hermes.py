"""Hermes-style calls (Qwen 2.5/3, Hermes, SmolLM and the default where a template knows no
tools): each call a JSON object in its own block, text allowed around them:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
"""

from __future__ import annotations

import json
from typing import Any

from server.serving.tool_calls.json_text import loads_or_none, partial_suffix
from server.serving.tool_calls.parser import Scan, ToolCallParser, call_of

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(ToolCallParser):
    name = "hermes"

    def scan(self, text: str, names: set[str], final: bool) -> Scan:
        scan = Scan()
        position = 0
        while True:
            start = text.find(OPEN, position)
            if start < 0:
                hold = 0 if final else partial_suffix(text, OPEN)
                scan.text(text[position:len(text) - hold])
                return scan
            end = text.find(CLOSE, start + len(OPEN))
            if end < 0:  # a call being written: held, and dropped if the text ends here
                scan.text(text[position:start])
                scan.unfinished = final
                return scan
            call = call_of(loads_or_none(text[start + len(OPEN):end].strip()), names)
            if call is None:  # not a call to a declared function: the model's text
                scan.text(text[position:end + len(CLOSE)])
            else:
                scan.text(text[position:start])
                scan.call(call)
            position = end + len(CLOSE)

    def grammar(self, body_rule: str, parallel: bool) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return f'start: call{repeat}\ncall: "{OPEN}" {body_rule} "{CLOSE}"\n'

    def instructions(self) -> str:
        return ("To call one, answer with nothing but one line per call:\n"
                f'{OPEN}{{"name": <function name>, "arguments": <arguments as a JSON object>}}'
                f"{CLOSE}\nThe results come back as <tool_response> messages.")

    def write_calls(self, calls: list[dict[str, Any]]) -> str:
        return "\n".join(OPEN + json.dumps(call) + CLOSE for call in calls)
