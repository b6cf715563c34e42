"""Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5-MoE), each against its Hugging Face model.

Linear-attention layers (a causal convolution, then the gated delta rule: state (value heads, dk, dv)) between
gated attention layers, Qwen2-MoE feed-forwards with a shared expert. Prefill, decode-with-past and chunked
continuation logits within 1e-4 of PyTorch on a left-padded batch (PyTorch runs its chunked algorithm at prefill,
its recurrent one at decode; the graph scans the recurrence for both); the convolution and recurrent states carried
over 32 decode steps within 1e-4 of transformers' cache; 16 greedy tokens identical to `generate` on prompts of
different lengths; one fused node per MoE layer and one Scan per linear-attention layer; int4 runs and agrees.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers

from conftest import (
    assert_experts_only_in_fused_nodes,
    assert_greedy_matches_generate,
    assert_int4_agrees,
    hf_greedy,
    hf_logits_prefill_and_steps,
    hybrid_logits_error,
    hybrid_state_errors,
)
from moerun import MoEModel
from moerun.converter.verify import padded, sample_prompts

# Two value heads per key head (grouped, as released checkpoints), a kernel of 4 (theirs). Layer 0 is linear
# attention as in released checkpoints: the first past input is a state. One linear-attention layer each: tracing
# a scan costs ~10 s of export (docs/design.md), and each layer is the same code.
COMMON = dict(vocab_size=160, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
              linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
              linear_num_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
FAMILIES = {
    # Qwen3-Next: a dense first layer (mlp_only_layers), then MoE; [q k v z] projected interleaved per key head
    "Qwen3-Next": (transformers.Qwen3NextConfig, "Qwen3NextForCausalLM",
                   dict(COMMON, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                        intermediate_size=96, decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True)),
    # Qwen3.5-MoE's text model: separate projections, partial rotary (its default 0.25), MoE on every layer
    "Qwen3.5-MoE": (transformers.Qwen3_5MoeTextConfig, "Qwen3_5MoeForCausalLM",
                    dict(COMMON, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])),
}


def build(family: str, seed: int = 0):
    config_class, architecture, params = FAMILIES[family]
    config = config_class(**params)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):  # slow decays (theirs reach exp(-20) per step): the state must carry far
                p.copy_(torch.empty_like(p).uniform_(0.01, 0.3).log())
            elif name.endswith("dt_bias"):
                p.normal_(0, 0.5)
            elif "linear_attn.conv1d" in name:  # the init's 0.02 leaves q, k, v (and the state) near zero
                p.normal_(0, 0.5)
            elif "linear_attn.out_proj" in name:  # so that the linear attention moves the logits (by ~0.5, measured)
                p.normal_(0, 0.2)
            elif "norm" in name:  # zero-centred norms start at 0 (scale 1): make the (1 + weight) visible
                p.normal_(0, 0.2)
        # the pad token's embedding is not zero (as in a trained model): padding must be masked to keep out of state
        model.model.embed_tokens.weight[0].normal_()
    return model


def linear_layers(family: str) -> list[int]:
    return [i for i, kind in enumerate(FAMILIES[family][2]["layer_types"]) if kind == "linear_attention"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted_family(request, tmp_path_factory):
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    family = request.param
    root = tmp_path_factory.mktemp(family)
    build(family).save_pretrained(root / "ckpt")
    fp32 = convert(root / "ckpt", root / "fp32").output
    quantize_model(fp32, root / "int4", QuantizeOptions(bits=4, block_size=16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "ckpt").eval()
    return family, hf, fp32, root / "int4"


def test_manifest_declares_layer_kinds_and_states(converted_family):
    family, _, fp32, _ = converted_family
    m = MoEModel.load(fp32, provider="cpu").manifest
    assert m.layer_types == FAMILIES[family][2]["layer_types"]
    # conv: q, k, v channels (2 * 2*8 + 4*12) x (kernel - 1); recurrent: value heads x dk x dv
    assert m.states == {"linear_attention": {"conv": [80, 3], "recurrent": [4, 8, 12]}}
    assert m.inputs[3:7] == ["past.0.conv", "past.0.recurrent", "past_key_values.1.key", "past_key_values.1.value"]
    assert m.outputs[1:5] == ["present.0.conv", "present.0.recurrent", "present.1.key", "present.1.value"]


def test_logits_match_pytorch(converted_family):
    """Prefill, one-token decode steps with past, and a 3-token continuation with past that starts on a padded
    position, on a left-padded batch (on which PyTorch itself agrees with each prompt run alone, to 2e-7)."""
    family, hf, fp32, _ = converted_family
    model = MoEModel.load(fp32, provider="cpu")
    worst, _, _ = hybrid_logits_error(hf, model, hf.config.vocab_size)
    print(f"\n{family}: max |Δlogits| {worst:.1e}")
    assert worst < 1e-4


def test_states_follow_pytorch_over_32_steps(converted_family):
    """Each step's present.{i}.conv equals the last kernel - 1 inputs transformers' cache keeps (the first of its
    kernel never reaches an output) and present.{i}.recurrent its recurrent state; prompts left-padded (one of
    length 1: padding inside the convolution state)."""
    family, hf, fp32, _ = converted_family
    errors = hybrid_state_errors(hf, MoEModel.load(fp32, provider="cpu"), hf.config.vocab_size,
                                 linear_layers(family), states=("conv", "recurrent"))
    worst_conv, worst_recurrent, worst_logits = errors["conv"], errors["recurrent"], errors["logits"]
    smallest_state = errors["alive"]
    print(f"\n{family} over 32 steps: max |Δconv| {worst_conv:.1e}, max |Δrecurrent| {worst_recurrent:.1e}, "
          f"max |Δlogits| {worst_logits:.1e}")
    assert smallest_state > 1e-2  # the state is alive (not decayed to nothing), so the comparison means something
    assert worst_conv < 1e-4 and worst_recurrent < 1e-4 and worst_logits < 1e-4


def test_right_padded_batch_matches_each_prompt_alone(converted_family):
    """onnxruntime-genai's batches: right-padded prompts (one shorter than the convolution state), then 2 decode steps
    at each row's own length; logits and both states as each prompt alone gives them (padding neither enters the
    convolution state nor steps the recurrence)."""
    from right_padded import right_padded_vs_alone

    family, hf, fp32, _ = converted_family
    logits, state = right_padded_vs_alone(fp32, sample_prompts(hf.config.vocab_size, seed=7, lengths=(9, 2, 5)))
    print(f"\n{family} right-padded vs alone: max |Δlogits| {logits:.1e}, max |Δstate| {state:.1e}")
    assert logits < 1e-5 and state < 1e-5


def test_greedy_matches_generate(converted_family):
    """The runtime's generation loop carries both states step to step (left-padded prompts of different lengths)."""
    _, hf, fp32, _ = converted_family
    assert_greedy_matches_generate(hf, fp32, alone=True)


def test_one_fused_node_per_moe_layer_and_one_scan_per_linear_layer(converted_family):
    family, hf, fp32, int4 = converted_family
    sparse = sum(type(m).__name__.endswith("SparseMoeBlock") for m in hf.modules())
    assert sparse == {"Qwen3-Next": 1, "Qwen3.5-MoE": 2}[family]  # Qwen3-Next's layer 0 is dense
    assert_experts_only_in_fused_nodes(fp32, int4, sparse, skip=lambda name: "conv1d" in name,
                                      scans=len(linear_layers(family)))
    # the recurrence is the only control flow, and no expert is inside it
    graph = onnx.load(fp32 / "model.onnx").graph
    body = {n.op_type for s in graph.node if s.op_type == "Scan" for a in s.attribute if a.g for n in a.g.node}
    assert body and not {"MoE", "QMoE", "Loop", "If", "Scan", "NonZero"} & body


def test_the_export_check_counts_the_scans(converted_family):
    """CheckFusedMoE allows exactly one Scan per layer with a recurrent state: a Scan elsewhere (a loop left over
    from an unfused block) or one missing fails the conversion."""
    import onnx_ir as ir

    from moerun.converter.passes import CheckFusedMoE
    from moerun.converter.passes.check_fused import recurrent_scans
    from moerun.runtime.errors import ExportError

    family, _, fp32, _ = converted_family
    manifest = MoEModel.load(fp32, provider="cpu").manifest
    assert recurrent_scans(manifest.state_layers()) == len(linear_layers(family))
    graph = ir.load(fp32 / "model.onnx")
    CheckFusedMoE(manifest.moe_layers, len(linear_layers(family)))(graph)
    for wrong in (0, len(linear_layers(family)) + 1):
        with pytest.raises(ExportError, match=f"expected {wrong} Scan nodes"):
            CheckFusedMoE(manifest.moe_layers, wrong)(graph)


# int4 (block 16) against fp32 on the tiny models, measured: next tokens agreeing out of 28 prompt positions, and
# out of 48 free-running greedy tokens (3 x 16); conftest's margins.
INT4_AGREEMENT = {"Qwen3-Next": (28, 48), "Qwen3.5-MoE": (28, 47)}


def test_int4_agrees_with_fp32_as_measured(converted_family):
    family, hf, fp32, int4 = converted_family
    assert MoEModel.load(int4, provider="cpu").manifest.states == MoEModel.load(fp32, provider="cpu").manifest.states
    assert_int4_agrees(family, hf.config.vocab_size, fp32, int4, INT4_AGREEMENT[family])


def test_triton_deploy_refuses_them(converted_family, tmp_path):
    """Triton's implicit state for Gated DeltaNet layers is not written yet: it says so, and leaves nothing on disk
    (onnxruntime-genai carries these states: tests/test_deploy.py)."""
    from moerun.deploy.triton import export_triton
    from moerun.runtime.errors import MoerunError

    _, _, fp32, _ = converted_family
    with pytest.raises(MoerunError, match=r"recurrent state \(linear_attention\)"):
        export_triton(fp32, tmp_path / "triton")
    assert not (tmp_path / "triton").exists()


def test_server_batches_them_statically(converted_family):
    """Continuous batching shares slot rows of KV buffers, which hold no recurrent state: the static-batching
    engine, whose step loop carries the states."""
    from moerun.serve.engine import GroupEngine, make_engine

    _, _, fp32, _ = converted_family
    assert isinstance(make_engine(MoEModel.load(fp32, provider="cpu").runner, 4, 64, 0), GroupEngine)


def test_layer_kinds_it_cannot_map_are_refused(tmp_path):
    """One line saying why, before any work, and nothing on disk."""
    from moerun.converter.convert import convert
    from moerun.runtime.errors import UnsupportedModelError

    config_class, architecture, params = FAMILIES["Qwen3.5-MoE"]
    config = config_class(**params)
    config.architectures = [architecture]
    torch.manual_seed(0)
    getattr(transformers, architecture)(config).save_pretrained(tmp_path / "ckpt")
    config.layer_types = ["linear_attention", "sliding_attention"]
    config.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(UnsupportedModelError, match=r"layer_types \['linear_attention', 'sliding_attention'\]"):
        convert(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fp16_export_runs_and_matches(tmp_path):
    """fp16 (traced in fp16, ORT fusions on): the zero-centred RMSNorms computed in float32 fuse with a float16
    scale (ONNX Runtime refuses two types in one SkipSimplifiedLayerNormalization); logits within 1e-2 of fp32
    PyTorch, the same greedy tokens."""
    from moerun.converter.convert import convert

    build("Qwen3.5-MoE").save_pretrained(tmp_path / "ckpt")
    fp16 = convert(tmp_path / "ckpt", tmp_path / "fp16", dtype="fp16").output
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    model = MoEModel.load(fp16, provider="cpu")
    ids, mask, pos = padded(sample_prompts(hf.config.vocab_size, seed=1, lengths=(11, 4, 8)), pad_id=0)
    full, _ = hf_logits_prefill_and_steps(hf, ids, mask, pos, 8, steps=1)
    worst = float(np.abs(model.forward(ids, mask, pos)[0] - full)[mask.astype(bool)].max())
    print(f"\nQwen3.5-MoE fp16: max |Δlogits| {worst:.1e}")
    assert worst < 1e-2
    prompts = sample_prompts(hf.config.vocab_size, seed=2, lengths=(3, 10, 6))
    model.manifest.eos_token_id = []
    assert model.generate_ids(prompts, max_new_tokens=16) == hf_greedy(hf, prompts, 16)
