"""Mamba hybrids, each against its Hugging Face model: Granite-MoE-hybrid (Mamba-2) and Jamba (Mamba-1).

Both interleave Mamba layers (a convolution state and an SSM state, graph I/O `past.{i}.conv` / `past.{i}.recurrent`)
with attention layers (a KV cache) and MoE feed-forwards. Per family: prefill, decode-with-past and chunked
continuation logits within 1e-4 of PyTorch on a left-padded batch; both states carried over 32 decode steps within
1e-4 of transformers' cache; 16 greedy tokens identical to `generate` on prompts of different lengths; one fused
node per MoE layer; int4 runs and agrees. The Mamba parameters (A_log, D, dt bias, norms) are perturbed from
their initial values and the pad token's embedding is not zero, so that neither a constant nor padding can hide.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from conftest import (
    assert_experts_only_in_fused_nodes,
    assert_greedy_matches_generate,
    assert_int4_agrees,
    hybrid_logits_error,
    hybrid_state_errors,
)
from moerun import MoEModel
from moerun.converter.verify import padded, sample_prompts

# Two layers each (every Mamba layer adds ~7 s of tracing): Granite's Mamba layer before its attention layer, Jamba's
# after (its states come after a KV cache in the graph's inputs).
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, mamba_d_conv=4, mamba_expand=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Mamba-2 with 2 groups of B/C over 8 heads, rotary attention, Granite's multipliers, MoE on every layer.
GRANITE = dict(COMMON, shared_intermediate_size=48, num_local_experts=4,
               layer_types=["linear_attention", "full_attention"],
               mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_head=16, mamba_chunk_size=4,
               position_embedding_type="rope", embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
               attention_multiplier=0.2)
# Mamba-1; layers attention / mamba, MoE on layer 1 only (layer 0's MLP dense), as Jamba's periods say.
JAMBA = dict(COMMON, num_experts=4, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
             attn_layer_offset=0, mamba_d_state=8, mamba_dt_rank=8)
# config class, kwargs, architecture, experts class, MoE layers, Mamba layer
FAMILIES = {
    "Granite-MoE-hybrid": (transformers.GraniteMoeHybridConfig, GRANITE, "GraniteMoeHybridForCausalLM",
                           "GraniteMoeHybridExperts", 2, 0),
    "Jamba": (transformers.JambaConfig, JAMBA, "JambaForCausalLM", "JambaExperts", 1, 1),
}
# int4 (block 16) against fp32 on these tiny models, measured: next tokens agreeing out of 28 prompt positions, and
# out of 48 free-running greedy tokens (3 x 16).
INT4_AGREEMENT = {"Granite-MoE-hybrid": (28, 48), "Jamba": (28, 48)}


def build(family: str, seed: int = 0):
    config_class, kwargs, architecture, *_ = FAMILIES[family]
    config = config_class(**kwargs)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # away from the initial ones and zeros, which could hide a mistake
            if name.endswith(("A_log", ".D", "dt_bias", "conv1d.bias")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
        model.model.embed_tokens.weight[0].normal_()  # padding must be masked to keep out of the states
    return model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread here: its decode steps on tiny matrices run 10x slower on two contended cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILIES))
def mamba(request, tmp_path_factory):
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    family = request.param
    root = tmp_path_factory.mktemp(family)
    build(family).save_pretrained(root / "ckpt")
    fp32 = convert(root / "ckpt", root / "fp32").output
    quantize_model(fp32, root / "int4", QuantizeOptions(bits=4, block_size=16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "ckpt").eval()
    return family, hf, fp32, root / "int4"


def test_manifest_declares_mamba_states(mamba):
    family, hf, fp32, _ = mamba
    m = MoEModel.load(fp32, provider="cpu").manifest
    mamba, attention = FAMILIES[family][5], 1 - FAMILIES[family][5]
    assert m.layer_types == (["mamba", "full_attention"] if mamba == 0 else ["full_attention", "mamba"])
    conv_dim = 128 + 2 * 2 * 16 if family == "Granite-MoE-hybrid" else 128  # x (and grouped B, C) channels
    recurrent = [8, 16, 16] if family == "Granite-MoE-hybrid" else [128, 8]  # transformers' SSM state layout
    assert m.states == {"mamba": {"conv": [conv_dim, 3], "recurrent": recurrent}}  # conv: d_conv - 1 inputs
    layers = {mamba: [f"{{}}.{mamba}.conv", f"{{}}.{mamba}.recurrent"],
              attention: [f"past_key_values.{attention}.key", f"past_key_values.{attention}.value"]}
    assert m.inputs[3:] == [name.format("past") for i in (0, 1) for name in layers[i]]
    assert m.outputs[1:] == [name.format("present").replace("past_key_values", "present") for i in (0, 1)
                             for name in layers[i]]


def test_logits_match_pytorch(mamba):
    """Prefill, one-token decode steps with past, and a 3-token continuation with past that starts on a padded
    position, on a left-padded batch. The continuation is compared with the full prefill: Jamba's own multi-token
    forward with a cache restarts its SSM state from zero (transformers' Mamba-1 scan takes no initial state)."""
    family, hf, fp32, _ = mamba
    model = MoEModel.load(fp32, provider="cpu")
    worst, prompts, full = hybrid_logits_error(hf, model, hf.config.vocab_size)
    # each prompt alone, unpadded: the left-padded batch above gave the same logits
    for row, prompt in enumerate(prompts):
        alone, _ = model.forward(np.array([prompt]), np.ones((1, len(prompt)), np.int64), np.arange(len(prompt))[None])
        worst = max(worst, float(np.abs(alone[0] - full[row, -len(prompt):]).max()))
    print(f"\n{family}: max |Δlogits| {worst:.1e}")
    assert worst < 1e-4


def test_states_follow_pytorch_over_32_steps(mamba):
    """Each step's present.{i}.conv equals the last d_conv - 1 inputs transformers' cache keeps (it keeps d_conv;
    the oldest never reaches an output) and present.{i}.recurrent its SSM state; prompts left-padded, one of
    length 1, so that padding sits inside the convolution window."""
    family, hf, fp32, _ = mamba
    errors = hybrid_state_errors(hf, MoEModel.load(fp32, provider="cpu"), hf.config.vocab_size, FAMILIES[family][5:],
                                 states=("conv", "recurrent"))
    worst_state, worst_logits = max(errors["conv"], errors["recurrent"]), errors["logits"]
    print(f"\n{family} over 32 steps: max |Δstate| {worst_state:.1e}, max |Δlogits| {worst_logits:.1e}")
    assert worst_state < 1e-4 and worst_logits < 1e-4


def test_right_padded_batch_matches_each_prompt_alone(mamba):
    """onnxruntime-genai's batches: right-padded prompts (one shorter than the convolution state), then 2 decode steps
    at each row's own length; logits and both states as each prompt alone gives them (padding neither enters the
    convolution state nor steps the recurrence)."""
    from right_padded import right_padded_vs_alone

    family, hf, fp32, _ = mamba
    logits, state = right_padded_vs_alone(fp32, sample_prompts(hf.config.vocab_size, seed=7, lengths=(9, 2, 5)))
    print(f"\n{family} right-padded vs alone: max |Δlogits| {logits:.1e}, max |Δstate| {state:.1e}")
    assert logits < 1e-5 and state < 1e-5


def test_greedy_matches_generate(mamba):
    """The runtime's generation loop carries both states step to step (left-padded prompts of different lengths)."""
    _, hf, fp32, _ = mamba
    assert_greedy_matches_generate(hf, fp32)


def test_one_fused_node_per_moe_layer(mamba):
    """One MoE/QMoE node per sparse block; the only control flow is one time Scan per Mamba layer."""
    family, hf, fp32, int4 = mamba
    sparse = sum(type(m).__name__ == FAMILIES[family][3] for m in hf.modules())
    assert sparse == FAMILIES[family][4]
    assert_experts_only_in_fused_nodes(fp32, int4, sparse, skip=lambda name: "conv1d" in name, scans=1)


def test_int4_agrees_with_fp32_as_measured(mamba):
    family, hf, fp32, int4 = mamba
    assert MoEModel.load(int4, provider="cpu").manifest.states == MoEModel.load(fp32, provider="cpu").manifest.states
    assert_int4_agrees(family, hf.config.vocab_size, fp32, int4, INT4_AGREEMENT[family])


def test_jamba_verify_oracle_continues_from_the_cached_state():
    """transformers' Jamba drops the cached SSM state when several tokens follow a cache; --verify's oracle
    (``prepare_reference``) runs them through transformers' decode step one at a time, which matches the full
    prefill, as the exported graph does."""
    from moerun.converter.architectures.jamba import Jamba

    model = build("Jamba")
    ids, mask, pos = (torch.from_numpy(a) for a in padded(sample_prompts(160, seed=6, lengths=(9, 4)), pad_id=0))

    def continuation():
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            first = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], use_cache=True)
            rest = model(input_ids=ids[:, 6:], attention_mask=mask, position_ids=pos[:, 6:], cache=first.cache,
                         use_cache=True).logits
        return float((rest - full[:, 6:]).abs().max())

    assert continuation() > 1e-3  # transformers as it is: the SSM state restarts from zero
    Jamba().prepare_reference(model)
    assert continuation() < 1e-5



@pytest.mark.parametrize("family, overrides", [("Granite-MoE-hybrid", dict(num_local_experts=0)),
                                               ("Jamba", dict(num_experts=1)),
                                               ("Jamba", dict(expert_layer_period=4, expert_layer_offset=3))])
def test_configs_without_moe_layers_are_refused(family, overrides):
    from moerun.converter.architectures import adapter_for
    from moerun.runtime.errors import UnsupportedModelError

    config_class, kwargs, architecture, *_ = FAMILIES[family]
    config = config_class(**(kwargs | overrides))
    config.architectures = [architecture]
    with pytest.raises(UnsupportedModelError, match="dense model"):
        adapter_for(config)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp16_export_passes_verify(family, tmp_path):
    """`convert --dtype fp16 --verify`: the scan runs in float32 inside the fp16 graph (as transformers' scans do),
    the states are carried in fp16. Measured on these models: 6.9e-4 (Granite-MoE-hybrid), 4.0e-4 (Jamba)."""
    from moerun.converter.convert import convert

    build(family).save_pretrained(tmp_path / "ckpt")
    report = convert(tmp_path / "ckpt", tmp_path / "fp16", dtype="fp16", verify=True).report
    print(f"\n{family} fp16: max |Δlogits| {report.max_abs:.1e}, greedy agreement {report.greedy_agreement:.0%}")
    assert report.passed and report.max_abs < 5e-3
