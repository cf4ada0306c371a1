"""FP8 weights (model/fp8.py, loader/fp8_checkpoint.py) on CPU: the quantization math against
float references, the emulated scaled matmul against its definition, FP8 checkpoints in the
published formats loaded exactly, an engine run with `quantization="fp8"`, and bad
checkpoints and settings refused naming what is wrong. The CUDA `_scaled_mm` path is checked
against the emulation in test_gpu.py."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import save_tiny_model
from tova_engine import LLM, EngineConfig, SamplingParams
from tova_engine.loader import load_source
from tova_engine.model import fp8 as fp8_module
from tova_engine.model.fp8 import FP8, Fp8Linear, dequantize_rows, fp8_matmul_problem

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3_STEP = 2.0**-3  # relative spacing of e4m3's normal numbers (3 mantissa bits)


def reference_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 values of w / scale (scale broadcast against w), as the formats define them."""
    return (w.double() / scale.double()).clamp(-448, 448).to(FP8)


def test_rows_are_scaled_to_the_largest_finite_value():
    torch.manual_seed(0)
    w = torch.randn(32, 48) * torch.logspace(-3, 2, 32)[:, None]  # rows of any magnitude
    q, scale = fp8_module.quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (32,)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((32,), 448.0))
    back = dequantize_rows(q, scale, torch.float64)
    # Half a step of e4m3 relative to the value, or of its smallest subnormal (2^-9) absolute.
    bound = w.double().abs() * E4M3_STEP / 2 + scale.double()[:, None] * 2.0**-10
    assert ((back - w.double()).abs() <= bound * 1.0001).all()


def test_zero_rows_and_tokens_give_zeros():
    w = torch.zeros(4, 16)
    q, scale = fp8_module.quantize_rows(w)
    assert torch.isfinite(scale).all() and torch.equal(q.float(), w)
    layer = Fp8Linear(16, 4, None)
    layer.load_rows(0, torch.randn(4, 16))
    out = layer(torch.zeros(3, 16))
    assert torch.equal(out, torch.zeros(3, 4))


def test_the_emulated_matmul_is_the_scaled_product_of_e4m3_operands():
    """Per token and per channel: y[t, r] = sx[t] * sw[r] * sum_k qx[t, k] qw[r, k]."""
    torch.manual_seed(1)
    w, x, bias = torch.randn(40, 64), torch.randn(5, 7, 64) * 3, torch.randn(40)
    layer = Fp8Linear(64, 40, torch.nn.Parameter(bias, requires_grad=False))
    layer.load_rows(0, w)
    got = layer(x)
    flat = x.reshape(-1, 64).double()
    sx = flat.abs().amax(dim=1, keepdim=True) / 448
    sw = w.double().abs().amax(dim=1) / 448
    qx, qw = reference_quantize(flat, sx), reference_quantize(w, sw[:, None])
    want = (qx.double() @ qw.double().T) * sx * sw[None, :] + bias.double()
    assert got.shape == (5, 7, 40)
    torch.testing.assert_close(got.reshape(-1, 40).double(), want, rtol=1e-5, atol=1e-5)
    # And near the float product: a few e4m3 steps of relative error in all.
    exact = flat @ w.double().T + bias.double()
    assert (want - exact).norm() / exact.norm() < 0.05


def test_rows_load_in_blocks_with_their_own_scales():
    """Fused q/k/v: each part's rows are quantized, or taken with their stored scales."""
    layer = Fp8Linear(16, 12, None)
    top, bottom = torch.randn(4, 16), torch.randn(8, 16) * 50
    assert layer.load_rows(0, top) is False  # quantized here, scales included
    q, scale = fp8_module.quantize_rows(bottom)
    assert layer.load_rows(4, q) is True  # stored e4m3: its scales must follow
    layer.load_scales(4, scale)
    assert torch.equal(layer.weight[4:].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(layer.weight_scale[4:], scale)
    torch.testing.assert_close(dequantize_rows(layer.weight, layer.weight_scale,
                                               torch.float32)[:4], top, rtol=0.07, atol=1e-3)


# ----- published checkpoints ---------------------------------------------------------------


def write_fp8_checkpoint(source, folder, scheme: str):
    """The tiny model's projections in float8 as the Hub publishes them. scheme: "channel"
    and "tensor" (compressed-tensors), "fp8-tensor" and "fp8-block" (quant_method fp8)."""
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    expected = {}
    for name in list(tensors):
        if not any(f".{p}." in name for p in PROJECTIONS):
            continue
        w = tensors[name].double()
        if scheme == "fp8-block":
            blocks = torch.zeros(math.ceil(w.shape[0] / 16), math.ceil(w.shape[1] / 16))
            for i in range(blocks.shape[0]):
                for j in range(blocks.shape[1]):
                    blocks[i, j] = w[i * 16 : i * 16 + 16, j * 16 : j * 16 + 16].abs().max() / 448
            full = blocks.double().repeat_interleave(16, 0).repeat_interleave(16, 1)
            q = reference_quantize(w, full[: w.shape[0], : w.shape[1]])
            tensors[name + "_scale_inv"] = blocks.float()
            expected[name] = q.double() * full[: w.shape[0], : w.shape[1]]  # (within rounding)
        else:
            scale = (w.abs().amax(dim=1, keepdim=True) if scheme == "channel"
                     else w.abs().max().reshape(1)) / 448
            q = reference_quantize(w, scale if scheme == "channel" else scale.reshape(1, 1))
            tensors[name + "_scale"] = scale.float()
            tensors[name.replace(".weight", ".input_scale")] = torch.ones(1)  # static: unused
            # The weights the file stands for: its e4m3 values times its float32 scales.
            expected[name] = (q.float() * scale.float().reshape(-1, 1)).double()
        tensors[name] = q
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    if scheme.startswith("fp8-"):
        quant = {"quant_method": "fp8", "activation_scheme": "dynamic"}
        if scheme == "fp8-block":
            quant["weight_block_size"] = [16, 16]
    else:
        quant = {"quant_method": "compressed-tensors", "format": "float-quantized",
                 "config_groups": {"group_0": {
                     "targets": ["Linear"],
                     "weights": {"num_bits": 8, "type": "float", "strategy": scheme},
                     "input_activations": {"num_bits": 8, "type": "float", "dynamic": True,
                                           "strategy": "token"}}},
                 "ignore": ["lm_head"]}
    config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    return folder, expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("fp8-source"))


def fused_part(model, name: str) -> torch.Tensor:
    """A checkpoint projection's rows of the loaded model's fused weight, dequantized."""
    layer = int(name.split(".")[2])
    block = model.layers[layer]
    c = model.config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    rows = {"q_proj": (block.attn.qkv_proj, 0, q), "k_proj": (block.attn.qkv_proj, q, kv),
            "v_proj": (block.attn.qkv_proj, q + kv, kv), "o_proj": (block.attn.o_proj, 0, None),
            "gate_proj": (block.mlp.gate_up_proj, 0, c.intermediate_size),
            "up_proj": (block.mlp.gate_up_proj, c.intermediate_size, c.intermediate_size),
            "down_proj": (block.mlp.down_proj, 0, None)}
    linear, start, count = next(v for k, v in rows.items() if f".{k}." in name)
    assert isinstance(linear, Fp8Linear)
    full = dequantize_rows(linear.weight, linear.weight_scale, torch.float64)
    return full[start:] if count is None else full[start : start + count]


@pytest.mark.parametrize("scheme", ["channel", "tensor", "fp8-tensor"])
def test_published_checkpoints_load_exactly(tiny, tmp_path, scheme):
    folder, expected = write_fp8_checkpoint(tiny, tmp_path / scheme, scheme)
    assert load_source(str(folder)).quantization == "fp8"
    llm = LLM(str(folder), device="cpu", max_num_seqs=2, state_size=16)  # FP8 from the file
    model = llm.engine.core.executor.worker.model
    for name, want in expected.items():
        assert torch.equal(fused_part(model, name), want), name
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0,
                                                      ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_block_scaled_checkpoints_load_within_rounding(tiny, tmp_path):
    """Blocks are dequantized and quantized again per row: within e4m3's rounding."""
    folder, expected = write_fp8_checkpoint(tiny, tmp_path / "block", "fp8-block")
    llm = LLM(str(folder), device="cpu", max_num_seqs=2, state_size=16)
    model = llm.engine.core.executor.worker.model
    for name, want in expected.items():
        got = fused_part(model, name)
        row_max = want.abs().amax(dim=1, keepdim=True)
        assert ((got - want).abs() <= want.abs() * E4M3_STEP + row_max / 448 * 2**-9).all()


def test_a_bfloat16_checkpoint_quantized_at_load_equals_its_rows_quantized(tiny):
    llm = LLM(str(tiny), device="cpu", max_num_seqs=2, state_size=16, quantization="fp8")
    model = llm.engine.core.executor.worker.model
    tensors = load_file(tiny / "model.safetensors")
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = tensors[name].double()
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        want = reference_quantize(w, scale).double() * scale
        torch.testing.assert_close(fused_part(model, name), want, rtol=1e-6, atol=0)
    assert model.lm_head.weight.dtype == torch.float32  # the head and embedding stay


def test_fp8_weights_follow_the_float_model_closely(tiny):
    """Greedy tokens are robust on the tiny model's sharpened weights; a few e4m3 steps of
    error in the logits at most."""
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 3]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    ref = LLM(str(tiny), device="cpu", max_num_seqs=2, state_size=16)
    fp8 = LLM(str(tiny), device="cpu", max_num_seqs=2, state_size=16, quantization="fp8")
    for a, b in zip(ref.generate(prompts, params, use_tqdm=False),
                    fp8.generate(prompts, params, use_tqdm=False), strict=True):
        assert b.outputs[0].token_ids[0] == a.outputs[0].token_ids[0]
        first = a.outputs[0].token_ids[0]
        assert abs(b.outputs[0].logprobs[0][first].logprob
                   - a.outputs[0].logprobs[0][first].logprob) < 0.5


def test_dummy_weights_are_fp8_and_smaller(tiny):
    from tova_engine.execution.memory import weight_bytes

    engines = {}

    def model(**options):
        llm = LLM(str(tiny / "config.json"), load_format="dummy", device="cpu", max_num_seqs=1,
                  state_size=16, **options)
        engines[options.get("quantization", "none")] = llm.engine.core
        return llm.engine.core.executor.worker.model

    full, fp8 = model(), model(quantization="fp8")
    # What the start-up log, /metrics (tova_engine_info) and the dashboard show.
    assert (engines["fp8"].info.quantization, engines["none"].info.quantization) == ("fp8", "none")
    linears = [m for m in fp8.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 4 * full.config.num_layers
    assert all(torch.isfinite(m.weight_scale).all() and (m.weight_scale > 0).all()
               for m in linears)
    # float32 -> 1 byte (+ 4 per row) for the projections: most of this model's weights.
    assert weight_bytes(fp8) < 0.7 * weight_bytes(full)


# ----- refused ------------------------------------------------------------------------------


def test_a_missing_or_misshapen_scale_is_refused_naming_it(tiny, tmp_path):
    folder, _ = write_fp8_checkpoint(tiny, tmp_path / "missing", "channel")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has no"):
        load_source(str(folder))  # from the headers: before any memory is allocated
    tensors["model.layers.1.mlp.up_proj.weight_scale"] = torch.ones(3, 1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj\.weight_scale has shape \[3, 1\]"):
        load_source(str(folder))


def test_a_block_scale_of_the_wrong_shape_is_refused(tiny, tmp_path):
    folder, _ = write_fp8_checkpoint(tiny, tmp_path / "blocks", "fp8-block")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj\.weight_scale_inv has shape \[2, 2\]"):
        load_source(str(folder))


@pytest.mark.parametrize(("quant", "message"), [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "int"}}}}, "4-bit int"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
])
def test_other_quantizations_are_refused(tiny, tmp_path, quant, message):
    folder = tmp_path / "other"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quant}))
    with pytest.raises(ValueError, match=message):
        load_source(str(folder))


def test_the_setting_is_validated():
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        EngineConfig(quantization="int8")


def test_gpus_without_fp8_matmuls_are_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    problem = fp8_matmul_problem(torch.device("cuda"))
    assert "A100 (compute capability 8.0) has no FP8 matmuls" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_matmul_problem(torch.device("cuda")) is None
    assert fp8_matmul_problem(torch.device("cpu")) is None


def test_fp8_weights_over_two_ranks(tmp_path):
    """Column-parallel rows take their scales with them, row-parallel layers keep all of
    theirs; each rank scales its own slice of a token's activations, so two ranks are close
    to one, not equal."""
    folder = save_tiny_model(tmp_path / "tp", num_attention_heads=8, num_key_value_heads=4)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    outputs = []
    for size in (1, 2):
        llm = LLM(str(folder), device="cpu", max_num_seqs=2, state_size=16, quantization="fp8",
                  tensor_parallel_size=size)
        try:
            outputs.append(llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0].outputs[0])
        finally:
            llm.close()
    one, two = outputs
    assert two.token_ids[0] == one.token_ids[0]
    first = one.token_ids[0]
    assert abs(two.logprobs[0][first].logprob - one.logprobs[0][first].logprob) < 0.3
