"""`moerun bench --compare llamacpp`: llama.cpp (llama-cpp-python, built in its own venv) measured beside
moerun's exports, each GGUF type beside its moerun pair; llama.cpp's F32 GGUF reproduces Hugging Face's
greedy tokens (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import run_cli, tiny_mixtral
from moerun.bench import _with_llamacpp_pairs, word_level_tokenizer


def test_llamacpp_variants_sit_beside_their_moerun_pairs():
    assert _with_llamacpp_pairs(["hf", "llamacpp", "fp32", "int8", "int4"]) == [
        "hf", "fp32", "llamacpp-f32", "int8", "llamacpp-q8_0", "int4", "llamacpp-q4_0"]
    assert _with_llamacpp_pairs(["llamacpp", "int4"]) == ["int4", "llamacpp-q4_0"]
    # int4 and int4-dense are both paired with Q4_0, which is measured once
    assert _with_llamacpp_pairs(["llamacpp", "int4", "int4-dense"]) == ["int4", "llamacpp-q4_0", "int4-dense"]
    assert _with_llamacpp_pairs(["hf", "llamacpp"]) == ["hf", "llamacpp-f32"]
    assert _with_llamacpp_pairs(["hf", "fp32"]) == ["hf", "fp32"]


def _gpt_oss():
    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, tie_word_embeddings=False)
    config.architectures = ["GptOssForCausalLM"]
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(config).eval()


def _mixtral():
    return tiny_mixtral(vocab_size=128, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2)


@pytest.mark.slow  # compiles llama.cpp into its venv on first use (10+ minutes on 2 cores)
@pytest.mark.parametrize("build", [_gpt_oss, _mixtral], ids=["gpt-oss", "mixtral"])
def test_bench_compares_against_llamacpp(build, tmp_path):
    model = build()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    word_level_tokenizer(model.config.vocab_size).save_pretrained(ckpt)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = run_cli("bench", str(ckpt), "--quick", "--compare", "hf,llamacpp", "--json", str(out),
                     "--markdown", str(md), timeout=3600)
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    assert [r["variant"] for r in records] == ["hf", "fp32", "llamacpp-f32", "int8", "llamacpp-q8_0", "int4",
                                                "llamacpp-q4_0"]
    by = {r["variant"]: r for r in records}
    for kind in ("f32", "q8_0", "q4_0"):
        r = by[f"llamacpp-{kind}"]
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_mb"] > 0
    assert by["llamacpp-q4_0"]["file_mb"] < by["llamacpp-q8_0"]["file_mb"] < by["llamacpp-f32"]["file_mb"]
    assert by["llamacpp-q4_0"]["bytes_per_token"] < by["llamacpp-f32"]["bytes_per_token"]
    # llama.cpp's F32 conversion and moerun's fp32 export both reproduce Hugging Face's greedy tokens
    assert by["llamacpp-f32"]["hf_agreement"] == 1.0 and by["fp32"]["hf_agreement"] == 1.0
    assert "| int4 | Q4_0 | 1 | 16 |" in md.read_text()
