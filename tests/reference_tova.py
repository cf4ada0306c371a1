"""A slow, obviously-correct bounded-state decoder written from the paper, independent of the
engine: one token at a time, plain Python lists of cached entries per layer.

It reads a Hugging Face Llama checkpoint's weights (float64) and returns, for a greedy
generation, the generated tokens and the absolute positions each layer retains. Sliding-window
layers (`layer_types`, Gemma 3) let a query at position p see (p - window, p] and keep the
latest min(state_size, window - 1) positions; the model pieces Gemma changes are
`reference_gemma3.py`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Entry:
    position: int
    key: torch.Tensor  # [kv_heads, head_dim], rotated
    value: torch.Tensor


@dataclass
class ReferenceDecoder:
    weights: dict[str, torch.Tensor]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    eps: float
    state_size: int
    policy: str = "tova"  # "tova" | "window" | "sink"
    protect_recent: int = 0  # the latest positions never evicted
    layer_types: tuple[str, ...] = ()  # "sliding_attention" | "full_attention"; () all full
    sliding_window: int | None = None
    attention_scalar: float | None = None  # logits are q.k / sqrt(this); head_dim if None
    cache: list[list[Entry]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cache = [[] for _ in range(self.num_layers)]

    # --- model pieces, straight from the Llama definition --------------------------------

    def w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def rmsnorm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.w(name) * x / torch.sqrt((x * x).mean() + self.eps)

    def embed(self, token: int) -> torch.Tensor:
        return self.w("model.embed_tokens.weight")[token]

    def frequency(self, i: int, layer: int) -> torch.Tensor:
        """Float32, as the Llama reference implementation computes them."""
        exponent = torch.tensor(2 * i, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.rope_theta**exponent)

    def rotate(self, x: torch.Tensor, position: int, layer: int) -> torch.Tensor:
        """x [heads, head_dim]; rotate-half RoPE at `position`."""
        half = self.head_dim // 2
        out = torch.empty_like(x)
        for i in range(half):
            # Angles in float32, as the Llama reference implementation computes them.
            freq = self.frequency(i, layer)
            angle = torch.tensor(float(position), dtype=torch.float32) * freq
            c, s = float(torch.cos(angle)), float(torch.sin(angle))
            out[:, i] = x[:, i] * c - x[:, i + half] * s
            out[:, i + half] = x[:, i + half] * c + x[:, i] * s
        return out

    def project(self, layer: int, x: torch.Tensor, position: int):
        p = f"model.layers.{layer}.self_attn."
        h = self.rmsnorm(x, f"model.layers.{layer}.input_layernorm.weight")
        q = (self.w(p + "q_proj.weight") @ h).view(self.num_heads, self.head_dim)
        k = (self.w(p + "k_proj.weight") @ h).view(self.num_kv_heads, self.head_dim)
        v = (self.w(p + "v_proj.weight") @ h).view(self.num_kv_heads, self.head_dim)
        if p + "q_norm.weight" in self.weights:  # Qwen3: each head normalised before RoPE
            q = torch.stack([self.rmsnorm(head, p + "q_norm.weight") for head in q])
            k = torch.stack([self.rmsnorm(head, p + "k_norm.weight") for head in k])
        return self.rotate(q, position, layer), self.rotate(k, position, layer), v

    def attend(self, q: torch.Tensor, entries: list[Entry]):
        """Returns the attention output [heads * head_dim] and head-averaged probabilities."""
        group = self.num_heads // self.num_kv_heads
        outputs, probs_sum = [], torch.zeros(len(entries), dtype=q.dtype)
        for head in range(self.num_heads):
            kv = head // group
            scalar = self.attention_scalar or self.head_dim
            scores = torch.stack([q[head] @ e.key[kv] for e in entries]) / math.sqrt(scalar)
            probs = torch.softmax(scores, dim=0)
            probs_sum += probs
            outputs.append(sum(p * e.value[kv] for p, e in zip(probs, entries, strict=True)))
        return torch.cat(outputs), probs_sum / self.num_heads

    def finish_layer(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}."
        x = x + self.w(p + "self_attn.o_proj.weight") @ attn_out
        h = self.rmsnorm(x, p + "post_attention_layernorm.weight")
        gate = self.w(p + "mlp.gate_proj.weight") @ h
        up = self.w(p + "mlp.up_proj.weight") @ h
        return x + self.w(p + "mlp.down_proj.weight") @ (torch.nn.functional.silu(gate) * up)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.w("lm_head.weight") @ self.rmsnorm(x, "model.norm.weight")

    # --- the bounded state ---------------------------------------------------------------

    def is_local(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    def visible(self, layer: int, entries: list[Entry], position: int) -> list[Entry]:
        """What the query at `position` attends to: all, or its window in a local layer."""
        if not self.is_local(layer):
            return entries
        return [e for e in entries if e.position > position - self.sliding_window]

    def latest(self, entries: list[Entry]) -> list[Entry]:
        """A local layer's state: the latest positions its window will still show."""
        size = min(self.state_size, self.sliding_window - 1)
        return sorted(entries, key=lambda e: e.position)[max(0, len(entries) - size) :]

    def keep_score(self, probs: torch.Tensor, entries: list[Entry]) -> list[float]:
        newest = max(e.position for e in entries)
        return [math.inf if e.position > newest - self.protect_recent else score
                for e, score in zip(entries, self._score(probs, entries), strict=True)]

    def _score(self, probs: torch.Tensor, entries: list[Entry]) -> list[float]:
        if self.policy == "tova":
            return probs.tolist()
        if self.policy == "window":
            return [float(e.position) for e in entries]
        if self.policy == "sink":
            return [math.inf if e.position < 4 else float(e.position) for e in entries]
        raise ValueError(self.policy)

    def step(self, token: int, position: int) -> torch.Tensor:
        """Feed one token with per-token eviction; returns its logits."""
        x = self.embed(token)
        for layer in range(self.num_layers):
            q, k, v = self.project(layer, x, position)
            entries = [*self.cache[layer], Entry(position, k, v)]
            out, probs = self.attend(q, self.visible(layer, entries, position))
            if self.is_local(layer):
                entries = self.latest(entries)
            elif len(entries) > self.state_size:
                scores = self.keep_score(probs, entries)
                entries.pop(min(range(len(entries)), key=scores.__getitem__))
            self.cache[layer] = entries
            x = self.finish_layer(layer, x, out)
        return self.logits(x)

    def prefill_whole(self, tokens: list[int]) -> torch.Tensor:
        """The reference TOVA prefill: full causal attention over the prompt, then each
        layer keeps the state_size entries the last prompt token attends to most."""
        xs = [self.embed(t) for t in tokens]
        for layer in range(self.num_layers):
            qkv = [self.project(layer, x, pos) for pos, x in enumerate(xs)]
            entries = [Entry(pos, k, v) for pos, (_, k, v) in enumerate(qkv)]
            new_xs, last_probs = [], None
            for pos, (q, _, _) in enumerate(qkv):
                out, last_probs = self.attend(q, self.visible(layer, entries[: pos + 1], pos))
                new_xs.append(self.finish_layer(layer, xs[pos], out))
            if self.is_local(layer):
                entries = self.latest(entries)
            elif len(entries) > self.state_size:
                scores = self.keep_score(last_probs, entries)
                ranked = sorted(range(len(entries)), key=scores.__getitem__, reverse=True)
                entries = [entries[i] for i in sorted(ranked[: self.state_size])]
            self.cache[layer] = entries
            xs = new_xs
        return self.logits(xs[-1])

    def generate(self, prompt: list[int], max_tokens: int, whole_prefill: bool):
        if whole_prefill:
            logits = self.prefill_whole(prompt)
        else:
            for position, token in enumerate(prompt):
                logits = self.step(token, position)
        generated = [int(logits.argmax())]
        while len(generated) < max_tokens:
            logits = self.step(generated[-1], len(prompt) + len(generated) - 1)
            generated.append(int(logits.argmax()))
        positions = [sorted(e.position for e in layer) for layer in self.cache]
        return generated, positions
