"""Checkpoint formats real MoE releases ship, written here from their published definitions and converted
against the PyTorch model holding the same (decoded) weights: MXFP4 experts (GPT-OSS) and FP8 weights
with block scales (DeepSeek-V3)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import assert_matches_pytorch
from moerun import MoEModel


def _e2m1(codes: np.ndarray) -> np.ndarray:
    """FP4 E2M1 values of 4-bit codes, from the OCP Microscaling spec's bit layout: sign bit 3, two exponent
    bits (bias 1), one mantissa bit; exponent 0 is subnormal (0 or 0.5)."""
    sign = np.where(codes & 8, -1.0, 1.0)
    exponent, mantissa = (codes >> 1) & 3, codes & 1
    magnitude = np.where(exponent == 0, 0.5 * mantissa, (1 + 0.5 * mantissa) * 2.0 ** (exponent - 1))
    return sign * magnitude


def _mxfp4(rows: int, cols: int, experts: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random MXFP4 weights (E, rows, cols): packed blocks (E, rows, cols/32, 16) as GPT-OSS's release stores
    them (two codes a byte, the even element in the low nibble), E8M0 scales (E, rows, cols/32), and the
    float weights they encode (value * 2^(scale - 127))."""
    codes = rng.integers(0, 16, (experts, rows, cols)).astype(np.uint8)
    scales = rng.integers(119, 124, (experts, rows, cols // 32)).astype(np.uint8)
    weights = _e2m1(codes) * np.repeat(2.0 ** (scales.astype(np.float64) - 127), 32, axis=-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(experts, rows, cols // 32, 16)
    return packed, scales, weights.astype(np.float32)


def test_gpt_oss_mxfp4_release_converts(tmp_path):
    config = transformers.GptOssConfig(
        vocab_size=160, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    config.architectures = ["GptOssForCausalLM"]
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    quantized = {}
    for i, layer in enumerate(model.model.layers):
        experts, hidden, inter = layer.mlp.experts, config.hidden_size, config.intermediate_size
        # the release stores each projection as (E, out, in) blocks along `in`; the model holds (E, in, out)
        for name, out_dim, in_dim in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
            blocks, scales, weights = _mxfp4(out_dim, in_dim, config.num_local_experts, rng)
            getattr(experts, name).data = torch.from_numpy(weights).transpose(1, 2).contiguous()
            prefix = f"model.layers.{i}.mlp.experts.{name}"
            quantized[f"{prefix}_blocks"], quantized[f"{prefix}_scales"] = blocks, scales
    model = model.to(torch.bfloat16)  # the release's other weights are bf16; FP4 x 2^k values are exact in bf16
    checkpoint = tmp_path / "gpt-oss-mxfp4"
    model.save_pretrained(checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    for key in [k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))]:
        del tensors[key]
    tensors.update({k: torch.from_numpy(v) for k, v in quantized.items()})
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((checkpoint / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                         "model.layers.*.mlp.router",
                                                                                         "model.embed_tokens",
                                                                                         "lm_head"]}
    (checkpoint / "config.json").write_text(json.dumps(saved))

    from moerun.converter.convert import convert

    result = convert(checkpoint, tmp_path / "onnx")
    assert result.manifest.source_quantization == ["mxfp4"]
    reference = model.to(torch.float32)
    reference.config._attn_implementation = "eager"
    assert_matches_pytorch(reference, MoEModel.load(result.output, provider="cpu"), tol=1e-4)
    assert "quantization_config" not in json.loads((result.output / "config.json").read_text())


def _fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's FP8 format: E4M3 values and one fp32 scale per block (``weight_scale_inv``: the value is
    fp8 * scale), blocks of ``block`` from the top-left, partial at the edges. Returns fp8, scales, decoded."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    fp8 = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(grid, dtype=torch.float32)
    decoded = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(grid[0]):
        for c in range(grid[1]):
            window = (slice(r * block[0], (r + 1) * block[0]), slice(c * block[1], (c + 1) * block[1]))
            scale = weight[window].abs().max().clamp(min=1e-12) / 448.0  # 448: E4M3's largest finite value
            fp8[window] = (weight[window] / scale).to(torch.float8_e4m3fn)
            scales[r, c] = scale
            decoded[window] = fp8[window].float() * scale
    return fp8, scales, decoded


def test_deepseek_v3_fp8_release_converts(tmp_path):
    config = transformers.DeepseekV3Config(
        vocab_size=160, hidden_size=64, num_attention_heads=4, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    config.architectures = ["DeepseekV3ForCausalLM"]
    torch.manual_seed(0)
    plain = tmp_path / "plain"
    transformers.DeepseekV3ForCausalLM(config).eval().save_pretrained(plain)
    block = (16, 24)  # partial blocks at the edges of most weights
    tensors = load_file(plain / "model.safetensors")
    fp8_tensors, decoded_tensors = dict(tensors), dict(tensors)
    # as the release: every linear weight of the layers in FP8, except the router; norms, embeddings, head stay
    for key, weight in tensors.items():
        if key.startswith("model.layers.") and key.endswith(".weight") and weight.dim() == 2 \
                and "norm" not in key and not key.endswith("mlp.gate.weight"):
            fp8, scales, decoded = _fp8_blocks(weight, block)
            fp8_tensors[key], fp8_tensors[f"{key}_scale_inv"] = fp8, scales
            decoded_tensors[key] = decoded
    assert sum(k.endswith("_scale_inv") for k in fp8_tensors) > 20
    save_file(decoded_tensors, plain / "model.safetensors", metadata={"format": "pt"})
    reference = transformers.AutoModelForCausalLM.from_pretrained(plain).eval()  # the decoded weights, loaded by HF

    checkpoint = tmp_path / "fp8"
    checkpoint.mkdir()
    save_file(fp8_tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((plain / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(block)}
    (checkpoint / "config.json").write_text(json.dumps(saved))

    from moerun.converter.convert import convert

    result = convert(checkpoint, tmp_path / "onnx")
    assert result.manifest.source_quantization == ["fp8"]
    assert_matches_pytorch(reference, MoEModel.load(result.output, provider="cpu"), tol=1e-4)
