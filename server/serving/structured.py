"""A request's output constraint -> `StructuredOutputs`: chat's `response_format` (OpenAI's),
vLLM's `structured_outputs` object and its older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` fields. At most one may be given; a constraint that
does not compile is a 400 naming the request field, before the engine sees it."""

from __future__ import annotations

from typing import Any

from server.http.errors import bad_request
from server.protocol.common import SamplingFields
from tova_engine import InvalidRequestError
from tova_engine.structured import StructuredOutputs

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_outputs(body: SamplingFields, any_whitespace: bool = False
                       ) -> StructuredOutputs | None:
    """any_whitespace: JSON constraints allow whitespace between tokens (the server's
    default; `structured_outputs.disable_any_whitespace` overrides it per request)."""
    found: list[tuple[str, dict[str, Any]]] = []  # (request field, StructuredOutputs kwargs)
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        else:
            schema = response_format.json_schema.schema_
            # OpenAI takes a missing schema as any JSON object.
            found.append(("response_format.json_schema.schema",
                          {"json": schema} if schema is not None else {"json_object": True}))
    if body.structured_outputs is not None:
        given = body.structured_outputs.model_dump(exclude_none=True, by_alias=True)
        if given.get("json_object") is False:
            given.pop("json_object")
        if "disable_any_whitespace" in given:
            any_whitespace = not given.pop("disable_any_whitespace")
        found.append(("structured_outputs", given))
    for field, kind in _GUIDED.items():
        value = getattr(body, field)
        if value is not None:
            found.append((field, {kind: value}))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(field for field, _ in found)
        raise bad_request(f"give one output constraint, not several ({names})", found[1][0])
    return _compiled(*found[0], any_whitespace)


def text_format_constraint(body, any_whitespace: bool = False) -> StructuredOutputs | None:
    """The Responses API's `text.format` (json_schema, json_object) as a constraint; None for
    plain text. A schema that does not compile is a 400 naming text.format.schema."""
    text = getattr(body, "text", None)
    form = None if text is None else text.format
    if form is None or form.type == "text":
        return None
    if form.type == "json_schema":
        return _compiled("text.format.schema", {"json": form.schema_}, any_whitespace)
    return _compiled("text.format", {"json_object": True}, any_whitespace)


def _compiled(field: str, kwargs: dict[str, Any], any_whitespace: bool) -> StructuredOutputs:
    """The constraint a request field gives, refused here (400 naming the field) if it does
    not compile, before the engine sees it."""
    try:
        spec = StructuredOutputs(**kwargs, any_whitespace=any_whitespace)
        spec.to_grammar()
    except InvalidRequestError as exc:
        param = field if field != "structured_outputs" else f"structured_outputs.{exc.param}"
        if exc.param == "structured_outputs":
            param = field
        raise bad_request(f"{param}: {exc}", param) from None
    return spec
