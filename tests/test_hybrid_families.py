"""Hybrid families whose layers carry fixed-size state beside the KV cache, each against its Hugging Face model.

LFM2-MoE: short-convolution layers (state: the convolution's last inputs) and attention layers, MoE
feed-forwards on the standard experts interface with a trained (non-zero) expert-bias buffer. Prefill,
decode-with-past and chunked continuation logits within 1e-4 of PyTorch on a left-padded batch; the
convolution states carried over 32 decode steps within 1e-4 of transformers' cache; 16 greedy tokens
identical to `generate` on prompts of different lengths; one fused node per MoE layer; int4 runs and agrees.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers

from conftest import (
    assert_greedy_matches_generate,
    assert_int4_agrees,
    hybrid_logits_error,
    hybrid_state_errors,
)
from moerun import MoEModel
from moerun.converter.verify import padded, sample_prompts

# Layer 0 is a convolution (as in released LFM2 checkpoints): the first past input is a state, not a key.
LFM2_MOE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, num_dense_layers=1,
                conv_L_cache=3, routed_scaling_factor=1.5, layer_types=["conv", "conv", "full_attention", "conv"],
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
CONV_LAYERS = [0, 1, 3]


def build(seed: int = 0):
    config = transformers.Lfm2MoeConfig(**LFM2_MOE)
    config.architectures = ["Lfm2MoeForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.Lfm2MoeForCausalLM(config).eval()
    with torch.no_grad():  # a trained expert bias changes which experts are chosen: it must come from the checkpoint
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("expert_bias"):
                tensor.copy_(torch.randn(tensor.shape) * 0.5)
        # the pad token's embedding is not zero (as in a trained model): padding must be masked to keep out of state
        model.model.embed_tokens.weight[0].normal_()
    return model


@pytest.fixture(scope="module")
def lfm2(lfm2_moe_exports):
    hf = transformers.AutoModelForCausalLM.from_pretrained(lfm2_moe_exports["ckpt"]).eval()
    return hf, lfm2_moe_exports["fp32"], lfm2_moe_exports["int4"]


def test_manifest_declares_layer_kinds_and_states(lfm2):
    _, fp32, _ = lfm2
    m = MoEModel.load(fp32, provider="cpu").manifest
    assert m.layer_types == LFM2_MOE["layer_types"]
    assert m.states == {"conv": {"conv": [64, 2]}}  # hidden, conv_L_cache - 1
    assert m.inputs[3:] == ["past.0.conv", "past.1.conv", "past_key_values.2.key", "past_key_values.2.value",
                            "past.3.conv"]
    assert m.outputs[1:] == ["present.0.conv", "present.1.conv", "present.2.key", "present.2.value", "present.3.conv"]


def test_logits_match_pytorch(lfm2):
    """Prefill, one-token decode steps with past, and a 3-token continuation with past that starts on a padded
    position, on a left-padded batch. (transformers masks padding only when several tokens are new: a one-token
    step is a generated token, never padding. So the one-token steps here start after every row's padding.)"""
    hf, fp32, _ = lfm2
    model = MoEModel.load(fp32, provider="cpu")
    worst, _, _ = hybrid_logits_error(hf, model, hf.config.vocab_size)
    print(f"\nLFM2-MoE: max |Δlogits| {worst:.1e}")
    assert worst < 1e-4


def test_right_padded_batch_matches_each_prompt_alone(lfm2):
    """onnxruntime-genai's batches: right-padded prompts (one shorter than the state), then 2 decode steps at each
    row's own length; logits and convolution states as each prompt alone gives them."""
    from right_padded import right_padded_vs_alone

    hf, fp32, _ = lfm2
    logits, state = right_padded_vs_alone(fp32, sample_prompts(hf.config.vocab_size, seed=7, lengths=(9, 1, 5)))
    print(f"\nLFM2-MoE right-padded vs alone: max |Δlogits| {logits:.1e}, max |Δstate| {state:.1e}")
    assert logits < 1e-5 and state < 1e-5


def test_expert_bias_comes_from_the_checkpoint(lfm2):
    """The parity above could not hold with the skeleton's zero expert bias: without it PyTorch differs."""
    hf, fp32, _ = lfm2
    ids, mask, pos = padded(sample_prompts(hf.config.vocab_size, seed=1, lengths=(11, 4, 8)), pad_id=0)
    ours, _ = MoEModel.load(fp32, provider="cpu").forward(ids, mask, pos)
    unbiased = build()
    with torch.no_grad():
        for name, tensor in unbiased.state_dict(keep_vars=True).items():
            if name.endswith("expert_bias"):
                tensor.zero_()
        logits = unbiased(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          position_ids=torch.from_numpy(pos)).logits.numpy()
    assert np.abs(ours - logits)[mask.astype(bool)].max() > 1e-2


def test_conv_state_follows_pytorch_over_32_steps(lfm2):
    """Each step's present.{i}.conv equals the inputs transformers' cache keeps for the next step (its last
    conv_L_cache - 1: the first of its conv_L_cache never reaches an output); prompts left-padded, so the
    padded positions must not reach the state."""
    hf, fp32, _ = lfm2
    errors = hybrid_state_errors(hf, MoEModel.load(fp32, provider="cpu"), hf.config.vocab_size, CONV_LAYERS)
    worst_state, worst_logits = errors["conv"], errors["logits"]
    print(f"\nLFM2-MoE over 32 steps: max |Δstate| {worst_state:.1e}, max |Δlogits| {worst_logits:.1e}")
    assert worst_state < 1e-4 and worst_logits < 1e-4


def test_greedy_matches_generate(lfm2):
    """The runtime's generation loop carries the states step to step (left-padded prompts of different lengths)."""
    hf, fp32, _ = lfm2
    assert_greedy_matches_generate(hf, fp32, alone=True)


def test_one_fused_node_per_moe_layer(lfm2):
    hf, fp32, int4 = lfm2
    sparse = sum(type(m).__name__ == "Lfm2MoeExperts" for m in hf.modules())
    assert sparse == LFM2_MOE["num_hidden_layers"] - LFM2_MOE["num_dense_layers"]
    for path, op in ((fp32, "MoE"), (int4, "QMoE")):
        ops = [n.op_type for n in onnx.load(path / "model.onnx").graph.node]
        assert ops.count(op) == sparse
        assert not {"Loop", "If", "NonZero", "Scan"} & set(ops)


# int4 (block 16) against fp32 on the tiny model, measured: next tokens agreeing out of 28 prompt positions, and
# out of 48 free-running greedy tokens (3 x 16); margins in tests/conftest.py.
INT4_AGREEMENT = (27, 48)


def test_int4_agrees_with_fp32_as_measured(lfm2):
    hf, fp32, int4 = lfm2
    a, b = MoEModel.load(fp32, provider="cpu"), MoEModel.load(int4, provider="cpu")
    assert b.manifest.states == a.manifest.states and b.manifest.inputs == a.manifest.inputs
    assert_int4_agrees("LFM2-MoE", hf.config.vocab_size, fp32, int4, INT4_AGREEMENT)


def test_server_batches_stateful_models_statically(lfm2):
    """Continuous batching shares slot rows of KV buffers, which hold no convolution state: a stateful model gets
    the static-batching engine (the runner's own step loop carries the states), whatever its attention
    (tests/test_serve.py serves it)."""
    from moerun.serve.engine import GroupEngine, make_engine

    _, fp32, _ = lfm2
    model = MoEModel.load(fp32, provider="cpu")
    model.manifest.attention = "gqa"  # even were its attention fused
    assert isinstance(make_engine(model.runner, 4, 64, 0), GroupEngine)


def test_manifest_with_mismatched_layer_types_is_refused(lfm2, tmp_path):
    import json
    import shutil

    from moerun.runtime.errors import ModelDirError

    _, fp32, _ = lfm2
    shutil.copytree(fp32, tmp_path / "m")
    path = tmp_path / "m" / "moerun.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"layer_types": ["conv"]}))
    with pytest.raises(ModelDirError, match="layer_types has 1 entries for num_layers 4"):
        MoEModel.load(tmp_path / "m", provider="cpu")
    path.write_text(json.dumps(data | {"states": {"conv": {"conv": [64, 3]}}}))
    with pytest.raises(ModelDirError, match=r"past.0.conv has shape .* but moerun.json says \[64, 3\]"):
        MoEModel.load(tmp_path / "m", provider="cpu")


def test_deploy_targets_for_stateful_models(lfm2, tmp_path):
    """Triton's implicit state for past.{i}.conv is not written yet: it says so. genai carries the states itself
    (tests/test_deploy.py runs it)."""
    from moerun.deploy.inspect import inspect_model
    from moerun.deploy.triton import export_triton
    from moerun.runtime.errors import MoerunError

    _, fp32, _ = lfm2
    with pytest.raises(MoerunError, match=r"recurrent state \(conv\)"):
        export_triton(fp32, tmp_path / "triton")
    assert not (tmp_path / "triton").exists()
    targets = inspect_model(fp32).deploy_targets
    assert targets["genai"].startswith("ready") and targets["triton"].startswith("no: ")


def test_manifest_states_without_layer_types_are_refused(lfm2, tmp_path):
    import json
    import shutil

    from moerun.runtime.errors import ModelDirError, RequestError

    _, fp32, _ = lfm2
    model = MoEModel.load(fp32, provider="cpu")
    with pytest.raises(RequestError, match="past must hold 5 arrays .*states per stateful layer.*got 4"):
        model.forward(np.ones((1, 1), dtype=np.int64), past=[np.zeros((1, 64, 2), np.float32)] * 4)
    shutil.copytree(fp32, tmp_path / "m")
    path = tmp_path / "m" / "moerun.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"layer_types": []}))
    with pytest.raises(ModelDirError, match="no layer_types"):
        MoEModel.load(tmp_path / "m", provider="cpu")
