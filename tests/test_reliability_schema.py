"""Schema-driven fuzzing: schemathesis generates requests for every route of /openapi.json,
valid ones and invalid ones, and every response must be no 5xx, documented (status, content
type, body schema) and, for an error, in OpenAI's shape.

The server runs a tiny model with small caps (64 positions, 4 slots), so a generated request
either fails validation at once or generates a few tokens.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import hypothesis
import pytest
import requests
import schemathesis
import schemathesis.specs.openapi.schemas  # (see below)
from hypothesis import HealthCheck, Phase, given
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

# The OpenAPI loader's modules are imported at collection, not lazily inside the test: there
# CPython 3.11's parser once failed on pytest's rewrite of them ("AST constructor recursion
# depth mismatch"), a state left by earlier tests in the same interpreter.
from tests.reliability_utils import ERROR_FIELDS
from tests.server_utils import ServerProcess

pytest_plugins = ("tests.reliability_fixtures",)

# Per operation and generation mode; TOVA_SCHEMA_EXAMPLES=N (with a random seed each run)
# explores further than the fixed, reproducible CI sample.
EXAMPLES_PER_MODE = int(os.environ.get("TOVA_SCHEMA_EXAMPLES", "64"))
DERANDOMIZE = "TOVA_SCHEMA_EXAMPLES" not in os.environ
MIN_CASES = 500
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def schema_server(tiny_chat_model, tmp_path_factory) -> Iterator[ServerProcess]:
    server = ServerProcess([
        "--model", str(tiny_chat_model), "--device", "cpu", "--state-size", "16",
        "--max-num-seqs", "4", "--max-model-len", "64", "--max-queue-len", "64",
        "--disable-access-log",
    ], tmp_path_factory.mktemp("schema") / "server.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def check_openai_error(response: schemathesis.Response) -> None:
    if response.status_code < 400:
        return
    [content_type] = response.headers["content-type"]
    assert content_type.startswith("application/json"), response.text
    error = response.json()["error"]
    assert set(error) == ERROR_FIELDS and isinstance(error["message"], str), response.text
    assert error["param"] is None or isinstance(error["param"], str), response.text


def fuzz(operation, mode: GenerationMode, url: str, session: requests.Session,
         statuses: Counter) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, derandomize=DERANDOMIZE,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        response = case.call(base_url=url, session=session, timeout=60)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)
        check_openai_error(response)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing to make invalid: a route without parameters or body has no negative cases.
        assert mode is GenerationMode.NEGATIVE


def test_generated_requests_get_no_5xx_and_documented_answers(schema_server):
    url = schema_server.url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: Counter = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {operation.path for operation in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model}",
            "/tokenize", "/detokenize", "/health", "/version", "/metrics"} <= paths
    with requests.Session() as session:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                before, started = sum(statuses.values()), time.perf_counter()
                fuzz(operation, mode, url, session, statuses)
                print(f"{operation.label} {mode.value}: {sum(statuses.values()) - before} "
                      f"cases in {time.perf_counter() - started:.1f} s")
    cases = sum(statuses.values())
    print(f"\nschemathesis: {cases} cases, statuses {dict(sorted(statuses.items()))}")
    assert cases >= MIN_CASES
    assert statuses[200] > 0 and statuses[400] > 0
