"""The command line as a user meets it: bad input is one line and a non-zero exit; good input works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForSequenceClassification

from conftest import run_cli, save_checkpoint, tiny_mixtral, tiny_nllb_moe


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def small_checkpoint(tmp_path):
    return save_checkpoint(tiny_mixtral(hidden_size=32, intermediate_size=16, num_attention_heads=2,
                                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                                        num_hidden_layers=1), tmp_path / "ckpt")


def test_missing_directory(tmp_path):
    out = tmp_path / "out"
    _assert_one_line_error(run_cli("convert", str(tmp_path / "nope"), "-o", str(out)), "no such checkpoint directory")
    assert not out.exists()


def test_missing_config(small_checkpoint, tmp_path):
    (small_checkpoint / "config.json").unlink()
    out = tmp_path / "out"
    _assert_one_line_error(run_cli("convert", str(small_checkpoint), "-o", str(out)), "no config.json")
    assert not out.exists()


def test_corrupt_safetensors(small_checkpoint, tmp_path):
    weights = small_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    _assert_one_line_error(run_cli("convert", str(small_checkpoint), "-o", str(out)), "corrupt or truncated")
    assert not out.exists()


def test_dense_model_is_refused(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    src = save_checkpoint(LlamaForCausalLM(config), tmp_path / "llama")
    out = tmp_path / "out"
    _assert_one_line_error(run_cli("convert", str(src), "-o", str(out)), "dense", "LlamaForCausalLM")
    assert not out.exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, pad_token_id=0)
    config.architectures = ["MixtralForSequenceClassification"]
    torch.manual_seed(0)
    src = save_checkpoint(MixtralForSequenceClassification(config), tmp_path / "cls")
    out = tmp_path / "out"
    _assert_one_line_error(run_cli("convert", str(src), "-o", str(out)),
                           "MixtralForSequenceClassification", "supported: ", "MixtralForCausalLM", "GptOssForCausalLM")
    assert not out.exists()


def test_existing_output_needs_overwrite(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_one_line_error(run_cli("convert", str(small_checkpoint), "-o", str(out)), "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_verify_leaves_nothing_behind(small_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", str(small_checkpoint), "-o", str(out), "--verify", "--tolerance", "1e-12")
    assert result.returncode == 1
    assert "Error: ONNX logits differ from PyTorch" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [small_checkpoint], "no output or staging directory is left"


def test_convert_sharded_with_verify_overwrite_then_generate(tmp_path):
    sharded = tmp_path / "sharded"
    tiny = tiny_mixtral(hidden_size=32, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                        num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2)
    tiny.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "onnx"
    out.mkdir()
    result = run_cli("convert", str(sharded), "-o", str(out), "--verify", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "verify (whole model): max |Δlogits|" in result.stderr and "passed" in result.stderr
    assert "greedy agreement with PyTorch 100.0%" in result.stderr and "generation loop 100%" in result.stderr
    report = json.loads((out / "moerun.json").read_text())["verify"]
    assert report["passed"] and report["max_abs_prefill"] < 1e-4

    gen = run_cli("generate", str(out), "--prompt", "unused", "--max-new-tokens", "4")
    # No tokenizer in this checkpoint: a clear error, not a crash.
    _assert_one_line_error(gen, "no tokenizer.json")


def test_bad_provider_and_bad_model_dir(tmp_path):
    _assert_one_line_error(run_cli("generate", str(tmp_path), "--prompt", "x"), "no moerun.json")
    result = run_cli("generate", str(tmp_path), "--prompt", "x", "--provider", "tpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_messages_and_paths_are_not_wrapped_when_piped(small_checkpoint, tmp_path):
    out = tmp_path / ("a-directory-name-long-enough-that-a-path-would-not-fit-in-eighty-columns-" * 2) / "onnx"
    result = run_cli("convert", str(small_checkpoint), "-o", str(out), "--verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n", "the output path is one line, as scripts read it"
    verify = [line for line in result.stderr.splitlines() if line.startswith("verify (")]
    assert len(verify) == 1 and verify[0].endswith("passed"), result.stderr


def test_quantize_a_model_directory_missing_its_graph(small_checkpoint, tmp_path):
    from moerun.converter.convert import convert

    onnx_dir = convert(small_checkpoint, tmp_path / "onnx").output
    (onnx_dir / "model.onnx").unlink()
    out = tmp_path / "int4"
    _assert_one_line_error(run_cli("quantize", str(onnx_dir), "-o", str(out)), "model.onnx", "convert")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "onnx"]


def test_translate_refuses_stdin_that_is_not_utf8(tmp_path):
    from moerun.converter.convert import convert

    onnx_dir = convert(save_checkpoint(tiny_nllb_moe(), tmp_path / "nllb"), tmp_path / "onnx").output
    exe = Path(sys.executable).with_name("moerun")
    result = subprocess.run([str(exe), "translate", str(onnx_dir)], input="fine\ncafé au lait\n".encode("latin-1"),
                            capture_output=True, timeout=600)
    assert result.stdout == b""
    result.stderr = result.stderr.decode()
    _assert_one_line_error(result, "not UTF-8", "line 2")


def test_bench_refuses_unwritable_outputs_before_measuring(small_checkpoint, tmp_path):
    work = tmp_path / "work"
    for option, path in (("--json", tmp_path / "missing-dir" / "bench.json"), ("--markdown", tmp_path)):
        result = run_cli("bench", str(small_checkpoint), "--quick", "--compare", "hf", "--variants", "fp32",
                         "--workdir", str(work), option, str(path))
        _assert_one_line_error(result, option, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "nothing measured, nothing written"
