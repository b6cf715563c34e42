"""The exported graph computes what Hugging Face's PyTorch Mixtral computes (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SHAPES
from moerun import MoEModel
from moerun.converter.verify import padded, sample_prompts

TOL = 1e-4


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_and_decode_logits_match_pytorch(shape, checkpoints, converted):
    hf = _hf(checkpoints[shape])
    onnx = MoEModel.load(converted[shape], provider="cpu")
    prompts = sample_prompts(hf.config.vocab_size, seed=1, lengths=(11, 4, 8))
    ids, mask, pos = padded(prompts, pad_id=0)
    valid = mask.astype(bool)
    t = {k: torch.from_numpy(v) for k, v in dict(input_ids=ids, attention_mask=mask, position_ids=pos).items()}
    with torch.no_grad():
        full = hf(**t).logits.numpy()
        split = 6
        first = hf(input_ids=t["input_ids"][:, :split], attention_mask=t["attention_mask"][:, :split],
                   position_ids=t["position_ids"][:, :split], use_cache=True)
        # Two decode steps of one token each, with the cache growing.
        steps = []
        cache = first.cache
        for i in range(split, split + 2):
            out = hf(input_ids=t["input_ids"][:, i:i + 1], attention_mask=t["attention_mask"][:, :i + 1],
                     position_ids=t["position_ids"][:, i:i + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits.numpy())

    ours, _ = onnx.forward(ids, mask, pos)
    assert np.abs(ours - full)[valid].max() < TOL

    _, past = onnx.forward(ids[:, :split], mask[:, :split], pos[:, :split])
    for n, i in enumerate(range(split, split + 2)):
        step, past = onnx.forward(ids[:, i:i + 1], mask[:, :i + 1], pos[:, i:i + 1], past=past)
        assert past[0].shape[2] == i + 1
        assert np.abs(step - steps[n])[valid[:, i:i + 1]].max() < TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_matches_hf_generate(shape, checkpoints, converted):
    hf = _hf(checkpoints[shape])
    onnx = MoEModel.load(converted[shape], provider="cpu")
    prompts = sample_prompts(hf.config.vocab_size, seed=2, lengths=(3, 12, 7))
    ids, mask, _ = padded(prompts, pad_id=0)
    with torch.no_grad():
        # eos_token_id=None: all 20 tokens are compared, none cut short by a random EOS.
        out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = out[:, ids.shape[1]:].tolist()
    onnx.manifest.eos_token_id = []
    assert onnx.generate_ids(prompts, max_new_tokens=20) == expected


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


def test_fp16_export_stays_close_to_fp32_pytorch(checkpoints, tmp_path):
    from moerun.converter.convert import convert

    out = convert(checkpoints["k1_e4_h72"], tmp_path / "fp16", dtype="fp16").output
    onnx = MoEModel.load(out, provider="cpu")
    assert onnx.manifest.dtype == "fp16"
    hf = _hf(checkpoints["k1_e4_h72"])
    prompts = sample_prompts(hf.config.vocab_size, seed=5, lengths=(7, 4))
    ids, mask, pos = padded(prompts, pad_id=0)
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(pos)).logits.numpy()
    ours, presents = onnx.forward(ids, mask, pos)
    assert ours.dtype == np.float16 and presents[0].dtype == np.float16
    assert np.abs(ours.astype(np.float32) - expected)[mask.astype(bool)].max() < 1e-2
    assert len(onnx.generate_ids(prompts, max_new_tokens=5)[0]) >= 1
