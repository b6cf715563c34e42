"""Families on transformers' standard experts interface, each against its Hugging Face PyTorch model.

For each: a tiny seeded config (MoE and dense layers mixed where the family allows, router correction
biases set non-zero so a trained value must reach the graph); prefill and decode-with-past logits
within 1e-4; 16 greedy tokens identical to `generate` on prompts of different lengths; one fused
node per experts module of the PyTorch model; the int4 export runs and agrees with fp32 as measured.
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
)
from moerun import MoEModel

COMMON = dict(vocab_size=160, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

FAMILIES = {
    "Ernie4_5_MoeForCausalLM": ("Ernie4_5_MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, moe_num_experts=4, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1)),
    "Glm4MoeForCausalLM": ("Glm4MoeConfig", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True)),
    "HunYuanMoEV1ForCausalLM": ("HunYuanMoEV1Config", dict(
        intermediate_size=48, num_hidden_layers=2, head_dim=16, num_experts=4, moe_topk=2, use_qk_norm=True)),
    "Dots1ForCausalLM": ("Dots1Config", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=1.5, norm_topk_prob=True)),
    "MiniMaxM2ForCausalLM": ("MiniMaxM2Config", dict(
        intermediate_size=32, num_hidden_layers=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    "FlexOlmoForCausalLM": ("FlexOlmoConfig", dict(
        intermediate_size=48, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    "DeepseekV2ForCausalLM": ("DeepseekV2Config", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", first_k_dense_replace=1, routed_scaling_factor=2.0, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
    # DBRX names its sizes itself; transformers 5.24's DBRX needs rope_theta and clip_qkv in attn_config
    # (released checkpoints set both)
    "DbrxForCausalLM": ("DbrxConfig", dict(
        d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=160, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2))),
    # layer 0: chunked attention (chunks of 4) with rotary, dense MLP; layer 1: global NoPE attention, MoE
    "Llama4ForCausalLM": ("Llama4TextConfig", dict(
        head_dim=16, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=2, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 0], attention_chunk_size=4)),
    # attention heads are experts too (MoA): 2 kv heads x top-2 = 4 query heads
    "JetMoeForCausalLM": ("JetMoeConfig", dict(
        intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16, num_local_experts=4,
        num_experts_per_tok=2)),
}
OWN_SIZES = {"DbrxForCausalLM"}


def build(architecture: str, seed: int = 0):
    config_class, params = FAMILIES[architecture]
    config = getattr(transformers, config_class)(**({} if architecture in OWN_SIZES else COMMON) | params)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # trained correction biases are not zero: they must come from the checkpoint
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith(("e_score_correction_bias", "mlp.bias")):  # mlp.bias: JetMoE's output bias
                tensor.copy_(torch.randn(tensor.shape) * 0.1)
    return model


# Families whose only code is a `standard_family` line (the generic path GLM-4-MoE exercises in the default
# run): their full checks are marked slow to keep the default suite's time (each conversion takes ~20 s).
REGISTRY_LINE_ONLY = {"Ernie4_5_MoeForCausalLM", "HunYuanMoEV1ForCausalLM", "Dots1ForCausalLM", "MiniMaxM2ForCausalLM",
                      "FlexOlmoForCausalLM"}


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] * (name in REGISTRY_LINE_ONLY))
                                        for name in FAMILIES])
def family(request, tmp_path_factory):
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    root = tmp_path_factory.mktemp(request.param)
    build(request.param).save_pretrained(root / "ckpt")
    fp32 = convert(root / "ckpt", root / "fp32").output
    # int4 by `moerun quantize` of the export (the passes convert --quantize runs, without a second trace)
    quantize_model(fp32, root / "int4", QuantizeOptions(bits=4, block_size=16))
    int4 = root / "int4"
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "ckpt").eval()
    return request.param, hf, fp32, int4


def test_logits_match_pytorch(family):
    name, hf, fp32, _ = family
    model = MoEModel.load(fp32, provider="cpu")
    worst = assert_matches_pytorch(hf, model)
    print(f"\n{name}: max |Δlogits| {worst:.1e}")


def test_greedy_matches_generate(family):
    _, hf, fp32, _ = family
    assert_greedy_matches_generate(hf, fp32)


def test_one_fused_node_per_experts_module(family):
    _, hf, fp32, int4 = family
    # the PyTorch model's experts modules (each family here names its class *Experts; JetMoE's MLP is
    # JetMoeMoE, and its attention experts (MoA) are computed densely, not by the op)
    sparse = sum(type(m).__name__.endswith("Experts") and not type(m).__name__.startswith("JetMoe")
                 or type(m).__name__ == "JetMoeMoE" for m in hf.modules())
    assert 0 < sparse < hf.config.num_hidden_layers + 1
    assert_experts_only_in_fused_nodes(fp32, int4, sparse, skip=lambda name: "self_attention" in name)


# int4 (block 16) against fp32 on each tiny model, measured: next tokens agreeing out of 28 prompt positions,
# and out of 48 free-running greedy tokens (3 x 16); margins in conftest.assert_int4_agrees.
INT4_AGREEMENT = {
    "Ernie4_5_MoeForCausalLM": (28, 48),
    "Glm4MoeForCausalLM": (28, 48),
    "HunYuanMoEV1ForCausalLM": (28, 48),
    "Dots1ForCausalLM": (28, 48),
    "MiniMaxM2ForCausalLM": (28, 43),
    "FlexOlmoForCausalLM": (24, 34),
    "DeepseekV2ForCausalLM": (28, 48),
    "DbrxForCausalLM": (28, 48),
    "Llama4ForCausalLM": (28, 48),
    "JetMoeForCausalLM": (28, 48),
}


def test_int4_agrees_with_fp32_as_measured(family):
    name, hf, fp32, int4 = family
    assert_int4_agrees(name, hf.config.vocab_size, fp32, int4, INT4_AGREEMENT[name])


def test_experts_the_op_cannot_compute_are_refused(tmp_path):
    """Standard experts with a gate activation other than silu, or their own gate function, say why;
    `convert` then leaves nothing on disk."""
    from moerun.converter.architectures.standard import StandardExperts, is_standard_experts
    from moerun.converter.convert import convert
    from moerun.runtime.errors import UnsupportedModelError

    config = transformers.FlexOlmoConfig(**COMMON | FAMILIES["FlexOlmoForCausalLM"][1] | dict(hidden_act="gelu"))
    config.architectures = ["FlexOlmoForCausalLM"]
    transformers.FlexOlmoForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(UnsupportedModelError, match="FlexOlmo .*activation GELUActivation"):
        convert(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    adapter = StandardExperts()
    adapter.family = "test"
    config = transformers.GptOssConfig(**COMMON | dict(intermediate_size=32, num_hidden_layers=1, num_local_experts=4,
                                                        num_experts_per_tok=2, head_dim=16))
    experts = [m for m in transformers.GptOssForCausalLM(config).modules() if is_standard_experts(m)]
    with pytest.raises(UnsupportedModelError, match="custom expert gate"):
        adapter.fuse(experts[0], config)
