"""The tool-call parsers on recorded model outputs, whole and streamed in random cuts: the
calls and content each family's syntax gives (interleaved text, several calls, calls cut off
at max_tokens, text that only looks like a call), the same streamed as whole, no call markup
ever in the content, the stop once a choice repeats a call or has called enough, and each
parser's grammar accepting what the parser reads."""

from __future__ import annotations

import json
import random

import pytest

from server.protocol.tools import ToolDefinition
from server.serving.tool_calls.hermes import HermesParser
from server.serving.tool_calls.llama3_json import Llama3JsonParser
from server.serving.tool_calls.mistral import MistralParser
from server.serving.tool_calls.plan import ToolPlan
from server.serving.tool_calls.registry import PARSERS, tool_parser
from server.serving.tool_calls.stream import ToolCallStream
from server.settings import TOOL_CALL_PARSERS

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [ToolDefinition.model_validate({"type": "function", "function": {
    "name": name, "parameters": WEATHER}}) for name in ("get_weather", "get_time")]
PARIS, ROME = {"city": "Paris"}, {"city": "Rome"}

# (model output, content, calls as (name, arguments)); None content: calls alone.
HERMES = [
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
     None, [("get_weather", PARIS)]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{\\"city\\": \\"Rome\\"}"}'
     "</tool_call>\nDone.",
     "Let me check.\nDone.", [("get_weather", PARIS), ("get_time", ROME)]),
    # A block naming no declared function is the model's text; so is broken JSON.
    ('<tool_call>{"name": "other", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "other", "arguments": {}}</tool_call>', []),
    ("a <tool_call>{broken</tool_call> b", "a <tool_call>{broken</tool_call> b", []),
    # Cut off at max_tokens inside a call: the call is dropped, not left in the content.
    ('Sure.\n<tool_call>{"name": "get_weather", "argu', "Sure.", []),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
     '<tool_call>{"name": "get_ti', None, [("get_weather", PARIS)]),
    ("Plain text, no calls at all.\n", "Plain text, no calls at all.\n", []),
    ("x < y and <tool", "x < y and <tool", []),
]
LLAMA = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", PARIS)]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_time", "parameters": {"city": "Rome"}}',
     None, [("get_weather", PARIS), ("get_time", ROME)]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", PARIS)]),
    # An answer that does not start with a call is content, whatever follows.
    ('The call would be {"name": "get_weather", "parameters": {}}',
     'The call would be {"name": "get_weather", "parameters": {}}', []),
    # JSON that is not a call is content, streamed as soon as it cannot be one.
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "someone", "age": 3}', '{"name": "someone", "age": 3}', []),
    ('{"name": "get_weather", "parameters": {"ci', "", []),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}} and then some words',
     "and then some words", [("get_weather", PARIS)]),
]
MISTRAL = [
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {"city": "Rome"}}]',
     None, [("get_weather", PARIS), ("get_time", ROME)]),
    # The marker dropped by detokenizing (a special token).
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [("get_weather", PARIS)]),
    ('I will look. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
     "I will look.", [("get_weather", PARIS)]),
    # The v11 syntax, with and without its markers.
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"city": "Rome"}',
     None, [("get_weather", PARIS), ("get_time", ROME)]),
    ('get_weather{"city": "Paris"}', None, [("get_weather", PARIS)]),
    ("[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    ("getting there", "getting there", []),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"ci', "", []),
]
CASES = [(HermesParser, case) for case in HERMES] + [(Llama3JsonParser, case) for case in LLAMA] \
    + [(MistralParser, case) for case in MISTRAL]
MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>")


def plan(parser_class, parallel: bool = True, max_calls: int | None = None) -> ToolPlan:
    return ToolPlan(TOOLS, "auto", parallel, parser_class(), max_calls=max_calls)


def whole(tool_plan: ToolPlan, text: str):
    stream = ToolCallStream(tool_plan)
    stream.push(text, final=True)
    return stream.result()


def streamed(tool_plan: ToolPlan, text: str, cuts: list[int]):
    """(content joined from the pieces, calls, pieces that held call markup)."""
    stream = ToolCallStream(tool_plan)
    pieces, calls = [], []
    for cut in [*cuts, len(text)]:
        progress = stream.push(text[:cut], final=cut == len(text))
        pieces.append(progress.content)
        calls += progress.calls
        if progress.stop:
            break
    return "".join(pieces), calls, stream.result()


def named(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


@pytest.mark.parametrize("parser_class, case", CASES,
                         ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(CASES)])
def test_recorded_outputs_whole_and_in_random_cuts(parser_class, case):
    text, content, calls = case
    tool_plan = plan(parser_class)
    assert whole(tool_plan, text)[0] == content
    assert named(whole(tool_plan, text)[1]) == calls
    rng = random.Random(len(text))
    for trial in range(40):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        if trial == 0:
            cuts = list(range(1, len(text)))  # one character at a time
        joined, streamed_calls, result = streamed(tool_plan, text, cuts)
        assert named(streamed_calls) == calls
        assert joined == (content or ""), cuts
        assert result[0] == content
        if calls:  # the text around real calls never shows their markup
            assert not any(mark in joined for mark in MARKUP), joined


@pytest.mark.parametrize("parser_class", [HermesParser, Llama3JsonParser, MistralParser])
def test_a_repeated_call_ends_the_choice_and_is_dropped(parser_class):
    parser = parser_class()
    once = parser.write_calls([{"name": "get_weather", "arguments": PARIS}])
    twice = parser.write_calls([{"name": "get_weather", "arguments": PARIS},
                                {"name": "get_time", "arguments": ROME},
                                {"name": "get_weather", "arguments": PARIS}])
    tool_plan = plan(parser_class)
    stream = ToolCallStream(tool_plan)
    stops = [stream.push(twice[:cut], final=False).stop for cut in range(1, len(twice) + 1)]
    assert stops[-1] and stops.count(True) == 1
    assert named(stream.calls) == [("get_weather", PARIS), ("get_time", ROME)]
    # Without parallel calls the first call ends the choice; max_tool_calls likewise.
    for limited in (plan(parser_class, parallel=False), plan(parser_class, max_calls=1)):
        stream = ToolCallStream(limited)
        assert stream.push(once, final=False).stop
        assert named(stream.calls) == [("get_weather", PARIS)]
        assert not stream.push(twice, final=False).calls  # nothing more once stopped


@pytest.mark.parametrize("parser_class", [HermesParser, Llama3JsonParser, MistralParser])
def test_each_parser_reads_what_it_writes_and_its_grammar_accepts(parser_class):
    from llguidance import LLMatcher
    from llguidance.hf import from_tokenizer

    from tests.tiny_chat_model import _tokenizer

    tokenizer = _tokenizer()
    ll_tokenizer = from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=2)
    parser = parser_class()
    calls = [{"name": "get_weather", "arguments": PARIS}, {"name": "get_time", "arguments": ROME}]
    written = parser.write_calls(calls)
    assert named(whole(plan(parser_class), written)[1]) == [("get_weather", PARIS),
                                                           ("get_time", ROME)]
    required = ToolPlan(TOOLS, "required", True, parser).constraint
    # The grammar's text: write_calls' own, less a marker the grammar leaves to the model.
    grammar_text = written.removeprefix("[TOOL_CALLS]") if parser_class is MistralParser \
        else written
    if parser_class is MistralParser:
        grammar_text = ", ".join(json.dumps(c) for c in calls).join("[]")
    matcher = LLMatcher(ll_tokenizer, required.to_grammar(), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    assert matcher.consume_tokens(tokenizer.encode(grammar_text, add_special_tokens=False))
    assert matcher.is_accepting()
    # A named choice allows that function alone, once.
    one = ToolPlan(TOOLS, "named", True, parser, named="get_time").constraint
    other = LLMatcher(ll_tokenizer, one.to_grammar(), log_level=0)
    text = parser.write_calls([{"name": "get_weather", "arguments": PARIS}])
    if parser_class is MistralParser:
        text = text.removeprefix("[TOOL_CALLS]")
    assert not other.consume_tokens(tokenizer.encode(text, add_special_tokens=False))


def test_the_parser_follows_the_flag_else_the_template():
    class Tokenizer:
        def __init__(self, template):
            self.chat_template = template

    assert set(TOOL_CALL_PARSERS) == {"auto", *PARSERS}
    assert tool_parser("mistral", Tokenizer("<tool_call>")).name == "mistral"
    assert tool_parser("auto", Tokenizer("{{ '[TOOL_CALLS]' }}")).name == "mistral"
    assert tool_parser("auto", Tokenizer("<|python_tag|>{{ x }}")).name == "llama3_json"
    assert tool_parser("auto", Tokenizer("<tool_call>\n{{ tool_call }}")).name == "hermes"
    assert tool_parser("auto", Tokenizer("{{ messages }}")).name == "hermes"
    assert tool_parser("auto", None).name == "hermes"
    assert len(MistralParser().call_id()) == 9 and MistralParser().call_id().isalnum()


def test_an_unknown_parser_stops_the_server_at_start_naming_the_flag(capsys):
    from server.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tool-call-parser", "pythonic"])
    error = capsys.readouterr().err
    assert "--tool-call-parser" in error and "llama3_json" in error
