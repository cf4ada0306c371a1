"""tova_engine: LLM inference with a fixed-size multi-state KV cache and TOVA eviction."""

from tova_engine.async_engine import AsyncEngine
from tova_engine.config import EngineConfig
from tova_engine.engine import LLMEngine
from tova_engine.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from tova_engine.llm import LLM
from tova_engine.messages import EngineInfo, StepStats
from tova_engine.outputs import CompletionOutput, Logprob, RequestOutput
from tova_engine.sampling_params import SamplingParams
from tova_engine.snapshots import SnapshotSpec, StateSnapshot

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "EngineInfo",
    "InvalidRequestError",
    "LLMEngine",
    "Logprob",
    "RequestFailedError",
    "RequestOutput",
    "SamplingParams",
    "SnapshotSpec",
    "StateSnapshot",
    "StepStats",
]
__version__ = "0.1.0"
