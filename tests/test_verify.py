"""What --verify proves and what the manifest says was verified."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, save_checkpoint, tiny_mixtral


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_mixtral(seed=11, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=4, num_hidden_layers=2),
                           tmp_path_factory.mktemp("verify") / "ckpt")


def test_a_broken_generation_loop_fails_verification(checkpoint, tmp_path, monkeypatch):
    """Raw logits can match while the runtime's loop (KV buffers, padding) is wrong: --verify must catch it."""
    from moerun.converter.convert import convert
    from moerun.runtime.errors import VerificationError
    from moerun.runtime.model import MoEModel

    load = MoEModel.load

    def broken_load(*args, **kwargs):
        model = load(*args, **kwargs)
        generate_ids = model.generate_ids

        def rows_mixed_up(prompts, *a, **kw):  # as a padding bug would: each row gets another's tokens
            out = generate_ids(prompts, *a, **kw)
            return out[1:] + out[:1]

        model.generate_ids = rows_mixed_up
        return model

    monkeypatch.setattr(MoEModel, "load", broken_load)
    with pytest.raises(VerificationError, match="generation loop's greedy tokens agree with the graph's own"):
        convert(checkpoint, tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists()


def test_quantizing_an_export_records_that_it_was_not_verified(checkpoint, tmp_path):
    from moerun.converter.convert import convert

    fp32 = convert(checkpoint, tmp_path / "fp32", verify=True)
    assert fp32.manifest.verify["passed"] and fp32.manifest.verify["scope"] == "whole model"
    done = run_cli("quantize", str(fp32.output), "-o", str(tmp_path / "int4"), "--block-size", "16")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "int4" / "moerun.json").read_text())
    assert manifest["verify"] == {"scope": "not verified after quantization (convert --quantize --verify verifies)"}
    written = manifest["weights"]["model.onnx"]["sha256"]
    assert any(name.endswith(".qweight") for name in written)
    assert written != fp32.manifest.weights["model.onnx"]["sha256"]


def test_quantize_refuses_an_output_inside_its_source(checkpoint, tmp_path):
    from moerun.converter.convert import convert

    fp32 = convert(checkpoint, tmp_path / "fp32")
    done = run_cli("quantize", str(fp32.output), "-o", str(fp32.output / "int4"), "--block-size", "16")
    assert done.returncode == 1 and "would overwrite the checkpoint" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (fp32.output / "int4").exists()
