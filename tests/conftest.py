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
