"""POST /tokenize and /detokenize (vLLM's shapes) and the model list."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from server.protocol.chat import ChatMessage
from server.protocol.common import RequestModel, ResponseModel
from server.protocol.schema import REQUIRED_TOKEN_IDS


class TokenizeRequest(RequestModel):
    """Either `prompt` (text) or `messages` (through the chat template), not both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # None: the tokenizer's default for text (special tokens added), none for messages (the
    # chat template writes them itself).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: Annotated[list[int], REQUIRED_TOKEN_IDS]


class DetokenizeResponse(ResponseModel):
    prompt: str


class TokenizerInfoResponse(ResponseModel):
    """GET /tokenizer_info (vLLM's): what a client needs to tokenize as the server does, e.g.
    lm-evaluation-harness's remote tokenizer (with /tokenize and /detokenize)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos_token: bool | None  # whether encoding text adds the BOS token
    chat_template: str | None
    model_max_length: int  # the server's max_model_len


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tova-server"
    # vLLM's extras: what was loaded and how long a request may be.
    root: str
    max_model_len: int


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
