"""Every supported decoder-only MoE family against its Hugging Face PyTorch implementation.

For each: a tiny seeded config with MoE and dense layers mixed where the family allows; prefill and
decode-with-past logits within 1e-4; greedy tokens identical to `generate`; exactly one fused node
per MoE layer; the int4 export agrees with fp32 as measured (INT4_AGREEMENT).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import (
    assert_experts_only_in_fused_nodes,
    assert_greedy_matches_generate,
    assert_int4_agrees,
    assert_matches_pytorch,
    run_cli,
)
from moerun import MoEModel

COMMON = dict(vocab_size=160, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

FAMILIES = {
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])),
    "OlmoeForCausalLM": ("OlmoeConfig", dict(
        intermediate_size=48, num_hidden_layers=2, num_key_value_heads=4, num_experts=16, num_experts_per_tok=8,
        norm_topk_prob=False)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80, num_hidden_layers=3,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[0])),
    "GraniteMoeForCausalLM": ("GraniteMoeConfig", dict(
        intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=6,
        num_experts_per_tok=2, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0,
        attention_multiplier=0.2)),
    "GraniteMoeSharedForCausalLM": ("GraniteMoeSharedConfig", dict(
        intermediate_size=48, shared_intermediate_size=40, num_hidden_layers=2, num_key_value_heads=2,
        num_local_experts=6, num_experts_per_tok=2, embedding_multiplier=2.0, residual_multiplier=0.5,
        logits_scaling=4.0, attention_multiplier=0.2)),
    "GptOssForCausalLM": ("GptOssConfig", dict(
        intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2, head_dim=16, num_local_experts=8,
        num_experts_per_tok=4, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "PhimoeForCausalLM": ("PhimoeConfig", dict(
        intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=6,
        num_experts_per_tok=2, router_jitter_noise=0.01)),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
}

# The module class of each family's sparse block, counted from the PyTorch model (the oracle).
SPARSE_BLOCKS = ("SparseMoeBlock", "GraniteMoeMoE", "GraniteMoeSharedMoE", "GptOssMLP", "DeepseekV3MoE",
                 "DeepseekV2Moe")


def build(architecture: str, seed: int = 0):
    config_class, params = FAMILIES[architecture]
    config = getattr(transformers, config_class)(**COMMON, **params)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    return getattr(transformers, architecture)(config).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions

    root = tmp_path_factory.mktemp(request.param)
    hf = build(request.param)
    hf.save_pretrained(root / "ckpt")
    fp32 = convert(root / "ckpt", root / "fp32").output
    int4 = convert(root / "ckpt", root / "int4", quantize=QuantizeOptions(bits=4, block_size=16)).output
    attn = "eager" if request.param == "GptOssForCausalLM" else "sdpa"
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "ckpt", attn_implementation=attn).eval()
    return request.param, hf, fp32, int4


# Families whose attention is exported as one GroupQueryAttention per layer (the others stay traced).
FUSED_ATTENTION = {"Qwen3MoeForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM", "GraniteMoeForCausalLM",
                   "GraniteMoeSharedForCausalLM", "GptOssForCausalLM"}


def test_logits_match_pytorch(family):
    name, hf, fp32, _ = family
    model = MoEModel.load(fp32, provider="cpu")
    assert model.manifest.fused_attention == (name in FUSED_ATTENTION)
    worst = assert_matches_pytorch(hf, model)
    print(f"\n{name}: max |Δlogits| {worst:.1e}")


def test_greedy_matches_generate(family):
    _, hf, fp32, _ = family
    assert_greedy_matches_generate(hf, fp32)


def test_one_fused_node_per_moe_layer(family):
    _, hf, fp32, int4 = family
    sparse = sum(type(m).__name__.endswith(SPARSE_BLOCKS) for m in hf.modules())
    assert 0 < sparse
    assert_experts_only_in_fused_nodes(fp32, int4, sparse)


# int4 (block 16) against fp32 on each family's tiny model, measured: tokens agreeing out of the 28
# next-token predictions at the prompts' positions, and out of 48 free-running greedy tokens (3 x 16).
INT4_AGREEMENT = {
    "Qwen3MoeForCausalLM": (28, 48),
    "OlmoeForCausalLM": (28, 48),
    "Qwen2MoeForCausalLM": (28, 48),
    "GraniteMoeForCausalLM": (28, 48),
    "GraniteMoeSharedForCausalLM": (28, 35),
    "GptOssForCausalLM": (24, 26),
    "PhimoeForCausalLM": (28, 48),
    "DeepseekV3ForCausalLM": (27, 40),
}


def test_inspect_strict_passes_on_every_family(family):
    """`moerun inspect --strict`: every op of both exports is ONNX standard or com.microsoft (tests/test_deploy.py
    shows it failing on a foreign op)."""
    from moerun.deploy.inspect import inspect_model

    architecture, _, fp32, int4 = family
    for model_dir in (fp32, int4):
        report = inspect_model(model_dir)
        assert report.strict_ok, (architecture, report.foreign_ops)
        assert report.min_onnxruntime != "unknown" and report.execution_providers["CPU"].startswith("yes")


def test_int4_agrees_with_fp32_as_measured(family):
    name, hf, fp32, int4 = family
    assert_int4_agrees(name, hf.config.vocab_size, fp32, int4, INT4_AGREEMENT[name])


# Families transformers ships that moerun refuses, with the words of each reason.
REFUSED = {
    "Gemma4ForCausalLM": ("Gemma4TextConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0),
        "gate only with SiLU"),
    "DeepseekV32ForCausalLM": ("DeepseekV32Config", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_group=1, topk_group=1), "indexer"),
    "LongcatFlashForCausalLM": ("LongcatFlashConfig", dict(
        vocab_size=128, hidden_size=64, ffn_hidden_size=96, expert_ffn_hidden_size=32, num_layers=2,
        num_attention_heads=4, n_routed_experts=4, moe_topk=2, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16), "zero-computation"),
}


@pytest.mark.parametrize("architecture", list(REFUSED))
def test_refused_families_say_why_and_write_nothing(architecture, tmp_path):
    config_class, params, reason = REFUSED[architecture]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**params)
    getattr(transformers, architecture)(config).save_pretrained(tmp_path / "ckpt")
    result = run_cli("convert", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and reason in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
