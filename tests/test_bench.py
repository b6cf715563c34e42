"""`moerun bench --quick` runs end to end and writes one complete JSON record per variant (no timing asserts)."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
import transformers

from conftest import run_cli, save_checkpoint, tiny_mixtral
from moerun.bench import Record


def test_bench_quick_writes_every_field(tmp_path):
    ckpt = save_checkpoint(tiny_mixtral(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                        num_hidden_layers=2), tmp_path / "ckpt")
    out = tmp_path / "bench.json"
    result = run_cli("bench", str(ckpt), "--quick", "--variants", "fp32,int8,int4,int4-dense", "--json", str(out),
                     "--markdown", str(tmp_path / "bench.md"))
    assert result.returncode == 0, result.stderr
    # the stages on stderr while it works (a bar counts the runs on a terminal), the table alone on stdout
    for stage in ("convert fp32", "generic export (batched_mm)", "quantize int4", "measure: round 1 of 1"):
        assert f"  • {stage}\n" in result.stderr, result.stderr
    assert result.stdout.startswith("| variant |"), result.stdout
    records = json.loads(out.read_text())
    assert [r["variant"] for r in records] == ["hf", "generic", "fp32", "int8", "int4", "int4-dense"]
    names = {f.name for f in fields(Record)}
    for r in records:
        assert set(r) == names
        assert r["batch"] == 1 and r["prompt_len"] == 16 and r["new_tokens"] == 8 and r["runs"] == 1
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb", "file_mb", "bytes_per_token",
                    "bandwidth_bound_tok_s", "bound_pct"):
            assert r[key] > 0, key
    by = {r["variant"]: r for r in records}
    assert by["int4"]["file_mb"] < by["int8"]["file_mb"] < by["fp32"]["file_mb"]
    assert by["int4"]["bytes_per_token"] < by["fp32"]["bytes_per_token"]
    # -dense quantizes attention and lm_head too: fewer bytes per step than experts-only int4
    assert by["int4-dense"]["bytes_per_token"] < by["int4"]["bytes_per_token"]
    assert by["int4-dense"]["file_mb"] < by["int4"]["file_mb"]
    # the fp32 exports are exact: their greedy tokens are Hugging Face's, measured in the same run
    assert by["fp32"]["hf_agreement"] == 1.0 and by["generic"]["hf_agreement"] == 1.0
    assert "| int4 | 1 | 16 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow  # builds the onnxruntime-genai venv on first use (minutes)
def test_bench_compares_against_onnxruntime_genai(tmp_path):
    from moerun.bench import word_level_tokenizer

    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, tie_word_embeddings=False)
    config.architectures = ["GptOssForCausalLM"]
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    transformers.GptOssForCausalLM(config).eval().save_pretrained(ckpt)
    word_level_tokenizer(config.vocab_size).save_pretrained(ckpt)
    out = tmp_path / "bench.json"
    result = run_cli("bench", str(ckpt), "--quick", "--compare", "hf,genai", "--variants", "fp32", "--json", str(out),
                     timeout=1800)
    assert result.returncode == 0, result.stderr
    by = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(by) == {"hf", "genai", "fp32"}
    assert by["genai"]["decode_tok_s"] > 0 and by["genai"]["file_mb"] > 0
    # onnxruntime-genai's export and moerun's both reproduce Hugging Face's greedy tokens
    assert by["genai"]["hf_agreement"] == 1.0 and by["fp32"]["hf_agreement"] == 1.0
