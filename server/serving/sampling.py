"""Request fields -> `SamplingParams`, refusing what this server cannot honour: one builder
(`_build`) for every endpoint; each endpoint adds only what it names its own way."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from server.http.errors import bad_request, from_value_error
from server.protocol.chat import ChatCompletionRequest
from server.protocol.common import SamplingFields
from server.protocol.completion import CompletionRequest
from server.protocol.responses import ResponsesRequest
from server.serving.logit_bias import LogitBias
from server.serving.structured import structured_outputs, text_format_constraint
from tova_engine import SamplingParams
from tova_engine.sampling_params import LogitsProcessor
from tova_engine.structured import StructuredOutputs

# Fields copied as they are when the request has them and the client set them (None, or a
# field the endpoint's API lacks, keeps the engine's default).
_DIRECT = (
    "n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k",
    "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop", "stop_token_ids",
    "skip_special_tokens", "spaces_between_special_tokens", "state_size", "return_state",
    "protect_recent",
)
# The sampler divides positive logits by the repetition penalty in float32; a tiny penalty
# overflows them to +inf and the request would fail in the engine (500) instead of being
# refused. 0.01 is far below any useful penalty and far above the overflow.
MIN_REPETITION_PENALTY = 0.01
# Errors from SamplingParams and the engine start with their own field name; these are the
# ones whose request field is named differently or that concern the prompt.
COMPLETION_NAMES = {"prompt_logprobs": "logprobs"}
CHAT_NAMES = {"logprobs": "top_logprobs", "prompt": "messages"}
RESPONSES_NAMES = {"max_tokens": "max_output_tokens", "prompt": "input"}


def check_completion(body: CompletionRequest) -> None:
    if body.suffix is not None:
        raise bad_request("suffix is not supported by this server", "suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise bad_request(
            f"best_of must equal n ({body.n or 1}): choosing the best of several samples "
            "is not supported", "best_of")
    _check_common(body)


def check_chat(body: ChatCompletionRequest) -> None:
    if body.functions:
        raise bad_request("functions are deprecated at OpenAI and not supported: use tools",
                          "functions")
    if body.function_call not in (None, "none"):
        raise bad_request("function_call is deprecated at OpenAI and not supported: use "
                          "tool_choice", "function_call")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    _check_common(body)


def _check_common(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.streaming:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    penalty = body.repetition_penalty
    if penalty is not None and 0 < penalty < MIN_REPETITION_PENALTY:
        raise bad_request(f"repetition_penalty must be >= {MIN_REPETITION_PENALTY} (smaller "
                          f"values overflow the logits); got {penalty}", "repetition_penalty")


def completion_params(body: CompletionRequest, vocab_size: int,
                      processors: Sequence[LogitsProcessor] = (),
                      any_whitespace: bool = False) -> SamplingParams:
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    steering = _steering(body, vocab_size, processors, any_whitespace=any_whitespace)
    return _build(body, COMPLETION_NAMES, max_tokens=body.max_tokens, logprobs=body.logprobs,
                  prompt_logprobs=prompt_logprobs, **steering)


def chat_names(body: ChatCompletionRequest) -> dict[str, str]:
    names = dict(CHAT_NAMES)
    if body.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    return names


def chat_params(body: ChatCompletionRequest, vocab_size: int,
                processors: Sequence[LogitsProcessor] = (),
                tool_constraint: StructuredOutputs | None = None,
                any_whitespace: bool = False) -> SamplingParams:
    """tool_constraint: the grammar of a required or named tool call (server/serving/tool_calls/);
    any_whitespace: JSON output constraints allow free whitespace (server.serving.structured)."""
    # max_completion_tokens replaced max_tokens in OpenAI's API; either may come.
    max_tokens = body.max_tokens
    if body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _build(body, chat_names(body), max_tokens=max_tokens, logprobs=logprobs,
                  **_steering(body, vocab_size, processors, tool_constraint, any_whitespace))


def responses_params(body: ResponsesRequest, keep_state: bool,
                     any_whitespace: bool = False,
                     tool_constraint: StructuredOutputs | None = None) -> SamplingParams:
    """keep_state: save the state at the end, for a continuation (`store`); any_whitespace:
    a JSON `text.format` allows free whitespace; tool_constraint: as chat's."""
    fields: dict[str, object] = {}
    constraint = text_format_constraint(body, any_whitespace)
    if constraint is not None and tool_constraint is not None:
        raise bad_request("a required tool call and a text.format cannot both constrain the "
                          "output", "tool_choice")
    constraint = constraint or tool_constraint
    if constraint is not None:
        fields["structured_outputs"] = constraint
    return _build(body, RESPONSES_NAMES, max_tokens=body.max_output_tokens,
                  keep_state=keep_state, **fields)


def _steering(body: SamplingFields, vocab_size: int, processors: Sequence[LogitsProcessor],
              tool_constraint: StructuredOutputs | None = None,
              any_whitespace: bool = False) -> dict[str, object]:
    """What constrains or biases a completions or chat request's output: its structured
    output or required tool call, its logit_bias, then `processors` (fault injection's, in
    tests)."""
    fields: dict[str, object] = {}
    constraint = structured_outputs(body, any_whitespace)
    if constraint is not None and tool_constraint is not None:
        raise bad_request("a required tool call and an output format cannot both constrain "
                          "the output", "tool_choice")
    constraint = constraint or tool_constraint
    if constraint is not None:
        fields["structured_outputs"] = constraint
    own = [LogitBias(_checked_bias(body.logit_bias, vocab_size))] if body.logit_bias else []
    if own or processors:
        fields["logits_processors"] = [*own, *processors]
    return fields


def _build(body: BaseModel, names: dict[str, str], **fields: object) -> SamplingParams:
    """The one place a request becomes SamplingParams: the `_DIRECT` fields it set, then
    `fields`, what its endpoint names its own way. `names` maps SamplingParams fields to the
    request's, for errors."""
    kwargs = {name: value for name in _DIRECT if (value := getattr(body, name, None)) is not None}
    kwargs.update(fields, output_kind="delta")
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise from_value_error(exc, error_names(names)) from None


def error_names(overrides: dict[str, str]) -> dict[str, str]:
    """Engine/SamplingParams field name -> request field name, for an error's `param`."""
    names = {name: name for name in (*_DIRECT, "max_tokens", "logprobs", "prompt")}
    names.update(overrides)
    return names


def _checked_bias(bias: dict[int, float], vocab_size: int) -> dict[int, float]:
    for token in bias:
        if token >= vocab_size:
            raise bad_request(
                f"logit_bias token ids must be below the vocabulary size ({vocab_size}); "
                f"got {token}", "logit_bias")
    return bias
