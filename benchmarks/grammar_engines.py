"""Grammar engines for structured outputs, side by side on the embedded model's tokenizer.

For llguidance and xgrammar (outlines-core has no context-free grammars, which
`guided_grammar` needs, so it is left out): compile time per spec; soundness and completeness
on hand-written cases (every valid example's tokens are accepted and end in an accepting
state; every invalid one is refused somewhere or never accepts); random walks through the
mask (uniform among the allowed tokens) whose finished outputs must validate (JSON Schema
through `jsonschema`, regexes through `re.fullmatch`); and the host time to fill a batch of
64 rows' token masks mid-output, one matcher after another and through each engine's batch
call.

    python benchmarks/grammar_engines.py --out benchmarks/results/grammar_engines.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
ARITHMETIC_LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
ARITHMETIC_EBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""
CASES = [
    {"name": "json_object", "kind": "json_object", "spec": None,
     "valid": ['{"a": [1, 2, {"b": null}], "c": "x"}', '{}'],
     "invalid": ['[1, 2]', '{"a": }', '"text"']},
    {"name": "person schema", "kind": "json", "spec": PERSON,
     "valid": ['{"name": "Ann", "age": 31, "email": "ann@mail.com", "tags": ["a", "c"], '
               '"address": {"city": "Leeds", "zip": "01234"}}',
               '{"name": "Bo", "age": 0, "address": {"city": "X", "zip": "99999"}}'],
     "invalid": ['{"name": "Ann", "age": 31}', '{"name": "Ann", "age": -1, "address": '
                 '{"city": "X", "zip": "12345"}}',
                 '{"name": "A", "age": 3, "address": {"city": "X", "zip": "1234"}}',
                 '{"name": "A", "age": 3, "extra": 1, "address": {"city": "X", "zip": "12345"}}']},
    {"name": "date regex", "kind": "regex", "spec": r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]",
     "valid": ["2026-11-29", "1999-01-31"], "invalid": ["2026-13-01", "26-11-29", "2026-1-29"]},
    {"name": "choice", "kind": "choice", "spec": ["positive", "negative", "neutral"],
     "valid": ["positive", "neutral"], "invalid": ["pos", "positive!", "Positive"]},
    {"name": "arithmetic grammar", "kind": "grammar",
     "spec": {"lark": ARITHMETIC_LARK, "ebnf": ARITHMETIC_EBNF},
     "valid": ["1+2*(3-4)/5", "(((7)))"], "invalid": ["1+", "()", "1++2"]},
]


def choice_regex(options: list[str]) -> str:
    return "(" + "|".join(re.escape(o) for o in options) + ")"


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.lib, self.lt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor()

    def compile(self, case):
        m = self.lib.LLMatcher
        kind, spec = case["kind"], case["spec"]
        if kind == "json_object":
            grammar = m.grammar_from_json_schema({"type": "object"})
        elif kind == "json":
            grammar = m.grammar_from_json_schema(spec)
        elif kind == "regex":
            grammar = m.grammar_from_regex(spec)
        elif kind == "choice":
            grammar = m.grammar_from_regex(choice_regex(spec))
        else:
            grammar = m.grammar_from_lark(spec["lark"])
        return grammar

    def matcher(self, compiled):
        matcher = self.lib.LLMatcher(self.tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def accepting(self, matcher) -> bool:
        return matcher.is_accepting()

    def allocate(self, batch: int) -> torch.Tensor:
        return torch.full((batch, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill(self, matcher, bitmask, row: int) -> None:
        self.lt.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers, bitmask) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in
                                                            enumerate(matchers)], bitmask)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.vocab_size = vocab_size
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, case):
        kind, spec, c = case["kind"], case["spec"], self.compiler
        if kind == "json_object":  # an object (the built-in JSON grammar takes any value)
            return c.compile_json_schema(json.dumps({"type": "object"}))
        if kind == "json":
            return c.compile_json_schema(json.dumps(spec))
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            return c.compile_regex(choice_regex(spec))
        return c.compile_grammar(spec["ebnf"])

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def accepting(self, matcher) -> bool:
        return matcher.is_completed() if hasattr(matcher, "is_completed") else False

    def allocate(self, batch: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(batch, self.vocab_size)

    def fill(self, matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)


def allowed(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = (bitmask_row.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.flatten()[:vocab]).flatten().tolist()


def check_case(engine, case, tokenizer, eos: int) -> dict:
    started = time.perf_counter()
    compiled = engine.compile(case)
    engine.matcher(compiled)
    compile_ms = 1e3 * (time.perf_counter() - started)
    valid_ok = 0
    for text in case["valid"]:
        m = engine.matcher(compiled)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if all(engine.accept(m, t) for t in ids) and engine.accepting(m):
            valid_ok += 1
    invalid_refused = 0
    for text in case["invalid"]:
        m = engine.matcher(compiled)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not (all(engine.accept(m, t) for t in ids) and engine.accepting(m)):
            invalid_refused += 1
    walks, finished, valid_walks = 20, 0, 0
    rng = random.Random(0)
    bitmask = engine.allocate(1)
    for _ in range(walks):
        m = engine.matcher(compiled)
        tokens = []
        for _ in range(200):
            engine.fill(m, bitmask, 0)
            options = allowed(bitmask[0], engine.vocab_size)
            if not options:
                break
            if eos in options and (len(options) == 1 or rng.random() < 0.5):
                finished += 1
                valid_walks += validates(case, tokenizer.decode(tokens))
                break
            token = rng.choice([t for t in options if t != eos])
            if not engine.accept(m, token):
                break
            tokens.append(token)
    return {"compile_ms": compile_ms, "valid_accepted": f"{valid_ok}/{len(case['valid'])}",
            "invalid_refused": f"{invalid_refused}/{len(case['invalid'])}",
            "walks_finished": finished, "finished_walks_valid": valid_walks}


def validates(case, text: str) -> bool:
    kind, spec = case["kind"], case["spec"]
    try:
        if kind in ("json", "json_object"):
            value = json.loads(text)
            if kind == "json_object":
                return isinstance(value, dict)
            jsonschema.validate(value, spec)
            return True
        if kind == "regex":
            return re.fullmatch(spec, text) is not None
        if kind == "choice":
            return text in spec
        return re.fullmatch(r"[0-9()+\-*/]+", text) is not None and _balanced(text)
    except (ValueError, jsonschema.ValidationError):
        return False


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def mask_cost(engine, tokenizer, batch: int = 64, reps: int = 20) -> dict:
    """Rows mid-output: each case's first valid example, half consumed, cycled to `batch`."""
    matchers = []
    for i in range(batch):
        case = CASES[i % len(CASES)]
        m = engine.matcher(engine.compile(case))
        ids = tokenizer.encode(case["valid"][0], add_special_tokens=False)
        for t in ids[: len(ids) // 2]:
            engine.accept(m, t)
        matchers.append(m)
    bitmask = engine.allocate(batch)
    one_by_one, batched = [], []
    for _ in range(reps):
        started = time.perf_counter()
        for row, m in enumerate(matchers):
            engine.fill(m, bitmask, row)
        one_by_one.append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.fill_batch(matchers, bitmask)
        batched.append(time.perf_counter() - started)
    return {"batch": batch, "sequential_ms": 1e3 * statistics.median(one_by_one),
            "batched_ms": 1e3 * statistics.median(batched)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from tova_engine.loader import load_source
    from tova_engine.loader.source import default_model_path

    source = load_source(str(default_model_path()), "dummy", torch.float32)
    tokenizer, vocab = source.tokenizer, source.config.vocab_size
    eos = tokenizer.eos_token_id
    results = {}
    for cls in (Llguidance, Xgrammar):
        started = time.perf_counter()
        engine = cls(tokenizer, vocab)
        setup_ms = 1e3 * (time.perf_counter() - started)
        rows = {case["name"]: check_case(engine, case, tokenizer, eos) for case in CASES}
        results[cls.name] = {"tokenizer_setup_ms": setup_ms, "cases": rows,
                             "mask_fill": mask_cost(engine, tokenizer)}
        print(f"\n{cls.name}: tokenizer set-up {setup_ms:.0f} ms; mask fill for 64 rows: "
              f"{results[cls.name]['mask_fill']['sequential_ms']:.2f} ms one by one, "
              f"{results[cls.name]['mask_fill']['batched_ms']:.2f} ms batched", flush=True)
        print("| case | compile ms | valid accepted | invalid refused | random walks finished "
              "| of them valid |\n|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['compile_ms']:.1f} | {r['valid_accepted']} | "
                  f"{r['invalid_refused']} | {r['walks_finished']}/20 | "
                  f"{r['finished_walks_valid']}/{r['walks_finished']} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
