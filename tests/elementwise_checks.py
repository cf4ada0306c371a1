"""The fused elementwise kernels (kernels/elementwise.py) against the model's PyTorch modules:
Llama's and Gemma's RMSNorm with and without the residual add, RoPE alone and after each
style of per-head q/k norm, and the gated MLP activations. Run compiled on CUDA
(tests/test_kernels_gpu.py) and under Triton's interpreter on CPU
(tests/test_kernels_interpreted.py)."""

from __future__ import annotations

import torch

from tova_engine.model.gemma3 import GemmaRMSNorm
from tova_engine.model.llama import ACTIVATIONS, RMSNorm
from tova_engine.model.rope import apply_rope

# (tokens, hidden, query heads, kv heads, head_dim): SmolLM2's heads and Gemma 3's.
SHAPES = ((37, 576, 9, 3, 64), (5, 640, 4, 1, 256))


def check_elementwise_kernels(device: str, dtype: torch.dtype) -> int:
    """Raises AssertionError at the first mismatch; returns the number of comparisons."""
    from tova_engine.kernels import elementwise

    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    tolerance = {"rtol": 1e-5, "atol": 1e-5}
    if dtype != torch.float32:
        tolerance = {"rtol": 1e-2, "atol": 1e-2}
    checked = 0
    for tokens, hidden, heads, kv_heads, head_dim in SHAPES:
        for norm_class in (RMSNorm, GemmaRMSNorm):
            norm = norm_class(hidden, 1e-6).to(device, dtype)
            norm.weight.data = rand(hidden) * 0.5
            x, residual = rand(tokens, hidden), rand(tokens, hidden)
            fused = elementwise.rms_norm(x, norm.weight, 1e-6, unit_offset=norm.unit_offset)
            torch.testing.assert_close(fused, norm.reference(x), **tolerance)
            normed, summed = elementwise.rms_norm(
                x, norm.weight, 1e-6, residual, unit_offset=norm.unit_offset
            )
            assert torch.equal(summed, residual + x)
            torch.testing.assert_close(normed, norm.reference(residual + x), **tolerance)
            checked += 2

        qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)
        angles = torch.rand(tokens, head_dim // 2, generator=generator).to(device) * 100
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        q_ref, k_ref, _ = qkv.split(sizes, -1)
        q_ref = q_ref.reshape(tokens, heads, head_dim)
        k_ref = k_ref.reshape(tokens, kv_heads, head_dim)
        q, k = elementwise.rope(qkv, cos, sin, heads, kv_heads)
        torch.testing.assert_close(q, apply_rope(q_ref, cos, sin), **tolerance)
        torch.testing.assert_close(k, apply_rope(k_ref, cos, sin), **tolerance)
        checked += 2
        for norm_class in (RMSNorm, GemmaRMSNorm):  # Qwen3's head norms, Gemma 3's
            q_norm = norm_class(head_dim, 1e-6).to(device, dtype)
            k_norm = norm_class(head_dim, 1e-6).to(device, dtype)
            q_norm.weight.data, k_norm.weight.data = rand(head_dim), rand(head_dim)
            norms = elementwise.HeadNorms(q_norm.weight, k_norm.weight, 1e-6, q_norm.unit_offset)
            q, k = elementwise.rope(qkv, cos, sin, heads, kv_heads, norms)
            expected_q = apply_rope(q_norm.reference(q_ref), cos, sin)
            expected_k = apply_rope(k_norm.reference(k_ref), cos, sin)
            torch.testing.assert_close(q, expected_q, **tolerance)
            torch.testing.assert_close(k, expected_k, **tolerance)
            checked += 2

        gate_up = rand(tokens, 2 * 4 * hidden) * 2
        gate, up = gate_up.chunk(2, dim=-1)
        for activation in ACTIVATIONS:
            fused = elementwise.gated_activation(gate_up, activation)
            torch.testing.assert_close(fused, ACTIVATIONS[activation](gate) * up, **tolerance)
            checked += 1
    return checked
