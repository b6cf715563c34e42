"""The exported graph computes what Hugging Face's PyTorch Mixtral computes (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SHAPES, assert_matches_pytorch, hf_greedy
from moerun import MoEModel
from moerun.converter.verify import padded, sample_prompts

TOL = 1e-4


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_and_decode_logits_match_pytorch(shape, checkpoints, converted):
    assert_matches_pytorch(_hf(checkpoints[shape]), MoEModel.load(converted[shape], provider="cpu"), TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_matches_hf_generate(shape, checkpoints, converted):
    hf = _hf(checkpoints[shape])
    onnx = MoEModel.load(converted[shape], provider="cpu")
    prompts = sample_prompts(hf.config.vocab_size, seed=2, lengths=(3, 12, 7))
    onnx.manifest.eos_token_id = []  # as hf_greedy: all 20 tokens are compared, none cut short by a random EOS
    assert onnx.generate_ids(prompts, max_new_tokens=20) == hf_greedy(hf, prompts, 20)


def test_eos_ends_a_row_and_the_others_continue(checkpoints, converted):
    shape = "k2_e8_h96"
    hf = _hf(checkpoints[shape])
    onnx = MoEModel.load(converted[shape], provider="cpu")
    prompts = sample_prompts(hf.config.vocab_size, seed=3, lengths=(5, 9, 6))
    ids, mask, _ = padded(prompts, pad_id=0)
    with torch.no_grad():
        free = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 3])  # make row 0's 4th new token the EOS
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    onnx.manifest.eos_token_id = [eos]
    ours = onnx.generate_ids(prompts, max_new_tokens=12)
    for row, new in zip(out[:, ids.shape[1]:].tolist(), ours):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert new == row[:cut]
    assert len(ours[0]) <= 4


@pytest.mark.parametrize("shape", ["k1_e4_h72", "k2_e8_h96"])  # traced attention, fused attention
def test_fp16_export_stays_close_to_fp32_pytorch(shape, checkpoints, tmp_path):
    from moerun.converter.convert import convert

    out = convert(checkpoints[shape], tmp_path / "fp16", dtype="fp16").output
    onnx = MoEModel.load(out, provider="cpu")
    assert onnx.manifest.dtype == "fp16"
    hf = _hf(checkpoints[shape])
    prompts = sample_prompts(hf.config.vocab_size, seed=5, lengths=(7, 4))
    ids, mask, pos = padded(prompts, pad_id=0, right=onnx.manifest.fused_attention)
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(pos)).logits.numpy()
    ours, presents = onnx.forward(ids, mask, pos)
    assert ours.dtype == np.float16 and presents[0].dtype == np.float16
    assert np.abs(ours.astype(np.float32) - expected)[mask.astype(bool)].max() < 1e-2
    # and fp16 decoding picks fp32 PyTorch's greedy tokens (measured: identical on both shapes, also over 20)
    onnx.manifest.eos_token_id = []
    assert onnx.generate_ids(prompts, max_new_tokens=5) == hf_greedy(hf, prompts, 5)
