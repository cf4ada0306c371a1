"""tova_engine: LLM inference with a fixed-size multi-state KV cache and TOVA eviction."""

from tova_engine.config import EngineConfig
from tova_engine.core.messages import EngineInfo, StepStats
from tova_engine.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from tova_engine.frontend.async_engine import AsyncEngine
from tova_engine.frontend.llm import LLM
from tova_engine.frontend.llm_engine import LLMEngine
from tova_engine.outputs import CompletionOutput, Logprob, RequestOutput
from tova_engine.sampling_params import SamplingParams
from tova_engine.state.snapshots import SnapshotSpec, StateSnapshot

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
