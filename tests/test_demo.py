"""`moerun demo`, the README's main job, runs end to end on the CPU and reports parity with PyTorch."""

from __future__ import annotations

from conftest import run_cli


def test_demo_builds_converts_verifies_and_generates(tmp_path):
    result = run_cli("demo", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "greedy agreement with PyTorch" in result.stdout and "100.0% of 60 tokens" in result.stdout
    assert "CPUExecutionProvider" in result.stdout
    assert "4 (one per MoE layer)" in result.stdout
    assert (tmp_path / "mixtral-demo-onnx" / "model.onnx").is_file()
    assert "Traceback" not in result.stderr
