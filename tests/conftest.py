"""Shared fixtures: tiny seeded Mixtral checkpoints saved like a user's, and their conversions.

Conversions are session-scoped (an export takes seconds); tests must not modify them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

# name -> config overrides: k=1 and k=2, 4 and 8 experts, hidden sizes that are not powers of two, GQA.
SHAPES = {
    "k1_e4_h72": dict(hidden_size=72, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                      num_local_experts=4, num_experts_per_tok=1, num_hidden_layers=2),
    "k2_e8_h96": dict(hidden_size=96, intermediate_size=56, num_attention_heads=6, num_key_value_heads=3,
                      num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=3),
    "k2_e4_h60": dict(hidden_size=60, intermediate_size=36, num_attention_heads=3, num_key_value_heads=1,
                      num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2),
}


def tiny_mixtral(seed: int = 0, **overrides) -> MixtralForCausalLM:
    params = dict(vocab_size=160, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    params.update(overrides)
    config = MixtralConfig(**params)
    config.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


def save_checkpoint(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_checkpoint(tiny_mixtral(seed=i, **shape), root / name)
            for i, (name, shape) in enumerate(SHAPES.items())}


@pytest.fixture(scope="session")
def converted(checkpoints, tmp_path_factory) -> dict[str, Path]:
    from moerun.converter.convert import convert

    root = tmp_path_factory.mktemp("onnx")
    return {name: convert(path, root / name).output for name, path in checkpoints.items()}


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    exe = Path(sys.executable).with_name("moerun")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env)


FIXTURE = Path(__file__).parent / "fixtures" / "tiny-moe"


@pytest.fixture(scope="session")
def tiny_moe_fixture() -> Path:
    """The small trained MoE language model (scripts/train_tiny_moe.py), committed under tests/fixtures."""
    assert (FIXTURE / "model.safetensors").is_file(), "run scripts/train_tiny_moe.py to rebuild the fixture"
    return FIXTURE


def hf_logits_prefill_and_steps(hf, ids, mask, pos, split: int, steps: int = 2):
    """Oracle logits from PyTorch: the full prefill, and `steps` one-token decode steps after `split`."""
    t = {k: torch.from_numpy(v) for k, v in dict(input_ids=ids, attention_mask=mask, position_ids=pos).items()}
    with torch.no_grad():
        full = hf(**t).logits.float().numpy()
        out = hf(input_ids=t["input_ids"][:, :split], attention_mask=t["attention_mask"][:, :split],
                 position_ids=t["position_ids"][:, :split], use_cache=True)
        cache, decoded = out.cache, []
        for i in range(split, split + steps):
            out = hf(input_ids=t["input_ids"][:, i:i + 1], attention_mask=t["attention_mask"][:, :i + 1],
                     position_ids=t["position_ids"][:, i:i + 1], cache=cache, use_cache=True)
            cache = out.cache
            decoded.append(out.logits.float().numpy())
    return full, decoded


def assert_matches_pytorch(hf, onnx, tol: float = 1e-4, seed: int = 1, steps: int = 2) -> float:
    """Prefill and decode-with-past logits of the ONNX model within `tol` of PyTorch; returns the max error."""
    import numpy as np

    from moerun.converter.verify import padded, sample_prompts

    prompts = sample_prompts(hf.config.vocab_size, seed=seed, lengths=(11, 4, 8))
    ids, mask, pos = padded(prompts, pad_id=0)
    valid = mask.astype(bool)
    split = 6
    full, decoded = hf_logits_prefill_and_steps(hf, ids, mask, pos, split, steps)
    ours, _ = onnx.forward(ids, mask, pos)
    worst = float(np.abs(ours - full)[valid].max())
    _, past = onnx.forward(ids[:, :split], mask[:, :split], pos[:, :split])
    for n, i in enumerate(range(split, split + steps)):
        step, past = onnx.forward(ids[:, i:i + 1], mask[:, :i + 1], pos[:, i:i + 1], past=past)
        assert past[0].shape[2] == i + 1
        worst = max(worst, float(np.abs(step - decoded[n])[valid[:, i:i + 1]].max()))
    assert worst < tol, f"max |Δlogits| {worst:.2e} over {tol}"
    return worst


def hf_greedy(hf, prompts, new_tokens: int) -> list[list[int]]:
    """`model.generate` greedy on left-padded prompts, no EOS: every row has `new_tokens` tokens."""
    from moerun.converter.verify import padded

    ids, mask, _ = padded(prompts, pad_id=0)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()
