"""The tool-call parsers by name (`--tool-call-parser`), and the one a chat template implies."""

from __future__ import annotations

from typing import Any

from server.serving.tool_calls.hermes import HermesParser
from server.serving.tool_calls.llama3_json import PYTHON_TAG, Llama3JsonParser
from server.serving.tool_calls.mistral import MARKER, MistralParser
from server.serving.tool_calls.parser import ToolCallParser

PARSERS: dict[str, type[ToolCallParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3JsonParser, MistralParser)}
# What in a chat template names its family's call syntax, in the order they are tried.
_TEMPLATE_SIGNS = ((MARKER, MistralParser), (PYTHON_TAG, Llama3JsonParser),
                   ("<tool_call>", HermesParser))


def tool_parser(setting: str, tokenizer: Any) -> ToolCallParser:
    """The parser `--tool-call-parser` names; for "auto", the one the chat template's text
    shows (Mistral's marker, Llama's python tag, Hermes' block), else hermes (the syntax
    shown in the system prompt to a model whose template knows no tools)."""
    if setting != "auto":
        return PARSERS[setting]()
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = "\n".join(template.values())
    for sign, parser in _TEMPLATE_SIGNS:
        if sign in template:
            return parser()
    return HermesParser()
