"""`moerun demo`, the README's main job, runs end to end on the CPU and reports parity with PyTorch."""

from __future__ import annotations

from conftest import run_cli
from moerun.demo import PROMPTS


def test_demo_converts_verifies_and_generates_python_like_text(tmp_path):
    result = run_cli("demo", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "greedy agreement with PyTorch" in result.stdout and "100.0% of 60 tokens" in result.stdout
    assert "CPUExecutionProvider" in result.stdout
    assert "4 (one per MoE layer)" in result.stdout and "int4 experts (QMoE)" in result.stdout
    assert (tmp_path / "tiny-moe-onnx" / "model.onnx").is_file()
    assert (tmp_path / "tiny-moe-int4" / "model.onnx").is_file()
    assert "Traceback" not in result.stderr
    # results on stdout (`moerun demo > f` keeps them), progress on stderr
    assert "converting the trained MoE" in result.stderr and "greedy continuations" not in result.stderr
    # the trained model writes plausible Python, whole characters only: no gibberish, no broken UTF-8
    samples = result.stdout.split("greedy continuations by the ONNX model")[1].split("moerun demo")[0]
    assert "\ufffd" not in samples and samples.isascii(), samples
    assert all(f"\n{prompt}" in samples for prompt in PROMPTS), samples
    assert sum(samples.count(word) for word in ("self", "return", '"""', "def ")) >= 5, samples
