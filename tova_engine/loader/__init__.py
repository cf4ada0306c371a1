"""Model sources: the embedded default GGUF, HF folders (FP8 checkpoints among them), hub ids,
GGUF files, dummy weights."""

from __future__ import annotations

from tova_engine.loader.source import (
    LOAD_FORMATS,
    LazyWeights,
    ModelSource,
    default_model_path,
    load_source,
)

__all__ = ["LOAD_FORMATS", "LazyWeights", "ModelSource", "default_model_path", "load_source"]
