"""Structured outputs: a request's output constrained to a JSON Schema, any JSON object, a
regular expression, one of a list of strings, or a Lark grammar, through llguidance (a
grammar engine that computes the allowed next tokens from the tokenizer's vocabulary).

`StructuredOutputs` is the request's declaration (in `SamplingParams`); `GrammarCompiler`
(the engine core's) turns it into a matcher per sequence; the sampler masks each constrained
row's logits with its matcher's allowed tokens (`bitmask.py`), and the core advances the
matcher with every sampled token and finishes the choice when the grammar is complete.
"""

from tova_engine.structured.spec import StructuredOutputs

__all__ = ["StructuredOutputs"]
