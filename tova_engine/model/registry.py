"""Model families by config.json's `model_type`: each registers its decoder class and its
config adapter here, once. A model_type nobody registered is refused, naming the ones that
are, before any weight is read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from tova_engine.model.config import ModelConfig
from tova_engine.model.gemma3 import Gemma3Model
from tova_engine.model.gemma3_config import gemma3_config
from tova_engine.model.llama import LlamaModel, llama_config
from tova_engine.model.qwen import qwen2_config, qwen3_config


class Family(NamedTuple):
    model_class: type[LlamaModel]
    # A config.json dict -> the architecture it describes (shared fields + the family's own).
    read_config: Callable[[dict[str, Any]], ModelConfig]


FAMILIES: dict[str, Family] = {
    "llama": Family(LlamaModel, llama_config),
    "mistral": Family(LlamaModel, llama_config),
    "qwen2": Family(LlamaModel, qwen2_config),
    "qwen3": Family(LlamaModel, qwen3_config),
    "gemma3_text": Family(Gemma3Model, gemma3_config),
    # The multimodal wrapper: its text_config is read (as gemma3_text).
    "gemma3": Family(Gemma3Model, gemma3_config),
}


def family(model_type: object) -> Family:
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build from a Hugging Face config.json dict (transformers 4.x or 5.x spelling) through
    its family's adapter; config.json without a model_type reads as llama."""
    return family(hf.get("model_type", "llama")).read_config(hf)


def model_class(config: ModelConfig) -> type[LlamaModel]:
    """The decoder class a config's family runs on."""
    return family(config.model_type).model_class
