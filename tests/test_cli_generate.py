"""`moerun generate`: the continuation on stdout (the prompt only with --echo), token ids in and out for models
without tokenizer files, and bad input as one line on stderr."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from moerun import MoEModel

SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
PROMPTS = ["Hello world", "Once upon a time"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from moerun.converter.convert import convert
    from moerun.demo import build_demo_checkpoint

    root = tmp_path_factory.mktemp("cli-generate")
    return convert(build_demo_checkpoint(root / "ckpt", seed=2, **SMALL), root / "onnx").output


@pytest.fixture(scope="module")
def ids_only_dir(model_dir, tmp_path_factory):
    """The model without its tokenizer files."""
    copy = shutil.copytree(model_dir, tmp_path_factory.mktemp("ids-only") / "onnx")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    return copy


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_prints_the_continuation_only(model_dir):
    texts = MoEModel.load(model_dir, provider="cpu").generate(PROMPTS, max_new_tokens=6)
    args = ["generate", str(model_dir), "-p", PROMPTS[0], "-p", PROMPTS[1], "--max-new-tokens", "6"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{text}\n" for text in texts)
    echoed = run_cli(*args, "--echo")
    assert echoed.stdout == "".join(f"{prompt}{text}\n" for prompt, text in zip(PROMPTS, texts))


def test_prompt_ids_on_a_model_without_tokenizer(ids_only_dir):
    prompts = [[1, 15, 27], [1, 5]]
    expected = MoEModel.load(ids_only_dir, provider="cpu").generate_ids(prompts, max_new_tokens=5)
    args = ["generate", str(ids_only_dir), "--prompt-ids", "1,15,27", "--prompt-ids", "1,5", "--max-new-tokens", "5"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(",".join(map(str, row)) + "\n" for row in expected)
    echoed = run_cli(*args, "--echo")
    assert echoed.stdout.splitlines() == [",".join(map(str, p + row)) for p, row in zip(prompts, expected)]


def test_text_prompt_without_tokenizer_points_to_prompt_ids(ids_only_dir):
    _one_line_error(run_cli("generate", str(ids_only_dir), "-p", "Hello"), "no tokenizer.json", "--prompt-ids")


@pytest.mark.parametrize("args,needles", [
    (["--prompt-ids", "1,x"], ["--prompt-ids", "1,x"]),
    (["--prompt-ids", "1,-4"], ["-4", "vocabulary"]),
    ([], ["--prompt", "--prompt-ids"]),
    (["-p", "Hello", "--prompt-ids", "1,2"], ["--prompt", "--prompt-ids"]),
])
def test_bad_prompts_are_one_line(model_dir, args, needles):
    _one_line_error(run_cli("generate", str(model_dir), *args), *needles)


def test_prompt_that_is_not_utf8_is_one_line(model_dir):
    exe = Path(sys.executable).with_name("moerun")
    result = subprocess.run([str(exe), "generate", str(model_dir), "-p", b"caf\xe9"], capture_output=True, timeout=300)
    assert result.stdout == b""
    result.stderr = result.stderr.decode(errors="replace")
    _one_line_error(result, "prompt 0", "UTF-8")
