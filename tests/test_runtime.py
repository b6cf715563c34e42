"""The runtime: provider choice, no torch, tokenizer and sampling against transformers, text generation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from moerun import MoEModel, MoerunError
from moerun.runtime.generation import SamplingConfig, filter_logits, pick_next
from moerun.runtime.session import cuda_usable, resolve_provider

DEMO_SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from moerun.converter.convert import convert
    from moerun.demo import build_demo_checkpoint

    root = tmp_path_factory.mktemp("demo")
    checkpoint = build_demo_checkpoint(root / "ckpt", seed=3, **DEMO_SMALL)
    return checkpoint, convert(checkpoint, root / "onnx").output


def test_serving_needs_no_torch_and_prints_no_cuda_noise(demo_model):
    _, onnx_dir = demo_model
    code = (
        "import sys\n"
        "from moerun.runtime import MoEModel\n"
        f"m = MoEModel.load({str(onnx_dir)!r})\n"
        "print(m.provider, m.execution_provider)\n"
        "m.generate(['Hello world'], max_new_tokens=3)\n"
        "assert 'torch' not in sys.modules, 'the runtime imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = "cuda CUDAExecutionProvider" if cuda_usable() else "cpu CPUExecutionProvider"
    assert result.stdout.strip() == expected
    assert result.stderr == "", "loading and generating must print nothing on stderr"


def test_cuda_without_a_device_is_a_clear_error():
    if cuda_usable():
        pytest.skip("this machine has a usable CUDA device")
    assert resolve_provider("auto") == "cpu"
    with pytest.raises(MoerunError, match="no usable CUDA device"):
        resolve_provider("cuda")


def test_tokenizer_matches_transformers_autotokenizer(demo_model):
    checkpoint, onnx_dir = demo_model
    ours = MoEModel.load(onnx_dir, provider="cpu").tokenizer
    theirs = AutoTokenizer.from_pretrained(checkpoint)
    for text in ["Hello world", "moerun converts a checkpoint, quickly!", "naïve café 🚀"]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_text_generation_matches_hf_generate(demo_model):
    checkpoint, onnx_dir = demo_model
    tok = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    hf = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    prompts = ["Hello world", "Once upon a time there was a model"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=12, do_sample=False)
    expected = [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
    assert MoEModel.load(onnx_dir, provider="cpu").generate(prompts, max_new_tokens=12) == expected


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 7, 0.6)])
def test_logit_filters_match_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    scores = torch.from_numpy(logits)
    for warper in [TemperatureLogitsWarper(temperature),
                   *([TopKLogitsWarper(top_k)] if top_k else []),
                   *([TopPLogitsWarper(top_p)] if top_p < 1 else [])]:
        scores = warper(None, scores)
    ours = filter_logits(logits, SamplingConfig(True, temperature, top_k, top_p))
    assert np.array_equal(np.isinf(ours), torch.isinf(scores).numpy())
    np.testing.assert_allclose(ours[~np.isinf(ours)], scores.numpy()[~np.isinf(ours)], rtol=1e-5)


def test_sampling_draws_follow_the_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    rng = np.random.default_rng(0)
    draws = np.array([pick_next(logits, SamplingConfig(do_sample=True), rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    top2 = np.array([pick_next(logits, SamplingConfig(True, top_k=2), rng)[0] for _ in range(2000)])
    assert set(top2.tolist()) == {0, 1}


def test_seeded_sampling_is_reproducible(demo_model):
    _, onnx_dir = demo_model
    m = MoEModel.load(onnx_dir, provider="cpu")
    a = m.generate_ids([[1, 5, 9]], max_new_tokens=10, do_sample=True, temperature=1.5, seed=7)
    b = m.generate_ids([[1, 5, 9]], max_new_tokens=10, do_sample=True, temperature=1.5, seed=7)
    c = m.generate_ids([[1, 5, 9]], max_new_tokens=10, do_sample=True, temperature=1.5, seed=8)
    assert a == b and a != c


def test_impossible_options_are_clear_errors(demo_model):
    _, onnx_dir = demo_model
    m = MoEModel.load(onnx_dir, provider="cpu")
    with pytest.raises(MoerunError, match="temperature"):
        m.generate("Hi", do_sample=True, temperature=0)
    with pytest.raises(MoerunError, match="max_new_tokens"):
        m.generate("Hi", max_new_tokens=0)
    with pytest.raises(MoerunError, match="unknown provider"):
        MoEModel.load(onnx_dir, provider="tpu")
