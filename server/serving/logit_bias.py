"""OpenAI's `logit_bias` as an engine logits processor."""

from __future__ import annotations

from typing import Any


class LogitBias:
    """Adds a fixed bias to chosen token ids' logits. Called on the engine thread with one
    float32 logits row; builds its index tensors from that row so that the server never
    imports torch, and keeps them for the following steps."""

    __slots__ = ("_bias", "_tensors")

    def __init__(self, bias: dict[int, float]) -> None:
        self._bias = bias
        self._tensors: tuple[Any, Any] | None = None

    def __call__(self, output_ids: list[int], logits: Any) -> Any:
        if self._tensors is None or self._tensors[0].device != logits.device:
            # Token ids pass through float32 on the way to int64: exact below 2**24 ids.
            ids = logits.new_tensor(list(self._bias)).long()
            self._tensors = (ids, logits.new_tensor(list(self._bias.values())))
        ids, values = self._tensors
        logits[ids] += values
        return logits
