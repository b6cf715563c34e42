"""The runtime: provider choice, no torch, tokenizer and sampling against transformers, text generation."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from moerun import MoEModel, MoerunError
from moerun.runtime import Manifest
from moerun.runtime.generation import SamplingConfig, filter_logits, pick_next
from moerun.runtime.session import choose_provider, cuda_usable, resolve_provider

DEMO_SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from moerun.converter.convert import convert
    from moerun.demo import build_demo_checkpoint

    root = tmp_path_factory.mktemp("demo")
    checkpoint = build_demo_checkpoint(root / "ckpt", seed=3, **DEMO_SMALL)
    return checkpoint, convert(checkpoint, root / "onnx").output


def test_serving_imports_no_torch_onnx_or_transformers_and_prints_no_cuda_noise(demo_model):
    _, onnx_dir = demo_model
    code = (
        "import sys\n"
        "heavy = ('onnx', 'onnxscript', 'torch', 'transformers')\n"
        "import moerun.runtime\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "from moerun.runtime import MoEModel\n"
        f"m = MoEModel.load({str(onnx_dir)!r})\n"
        "print(m.provider, m.execution_provider)\n"
        "m.generate(['Hello world'], max_new_tokens=3)\n"
        "m.generate_ids([[1, 5, 9]], max_new_tokens=3, do_sample=True, top_k=5, top_p=0.9)\n"
        "import moerun.custom_ops\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    chosen, _ = choose_provider("auto", Manifest.load(onnx_dir))  # an fp32 GQA model runs on the CPU even with CUDA
    expected = "cuda CUDAExecutionProvider" if chosen == "cuda" else "cpu CPUExecutionProvider"
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


def test_logit_filters_match_transformers_on_a_large_vocabulary():
    """The candidate-set filters (partial top-k, top-p grown from a few candidates) against transformers' warpers:
    peaked and flat rows, top-p sets larger than the first candidates, and ties at the k-th score."""
    rng = np.random.default_rng(1)
    flat = rng.standard_normal((3, 20000)).astype(np.float32) * 3
    peaked = rng.standard_normal((3, 20000)).astype(np.float32) * 8
    tied = np.round(flat)
    for logits, temperature, top_k, top_p in [(flat, 1.0, 0, 0.9), (flat, 0.7, 0, 0.5), (peaked, 1.0, 0, 0.9),
                                              (peaked, 1.3, 40, 0.95), (flat, 1.0, 600, 0.99), (tied, 1.0, 7, 1.0),
                                              (tied, 1.0, 300, 1.0)]:
        scores = torch.from_numpy(logits)
        for warper in [TemperatureLogitsWarper(temperature), *([TopKLogitsWarper(top_k)] if top_k else []),
                       *([TopPLogitsWarper(top_p)] if top_p < 1 else [])]:
            scores = warper(None, scores)
        ours = filter_logits(logits, SamplingConfig(True, temperature, top_k, top_p))
        assert ours.dtype == np.float32, "sampling works in float32"
        assert np.array_equal(np.isinf(ours), torch.isinf(scores).numpy()), (temperature, top_k, top_p)
        np.testing.assert_allclose(ours[~np.isinf(ours)], scores.numpy()[~np.isinf(ours)], rtol=1e-6)


def test_sampling_draws_follow_the_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    rng = np.random.default_rng(0)
    draws = np.array([pick_next(logits, SamplingConfig(do_sample=True), rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    top2 = np.array([pick_next(logits, SamplingConfig(True, top_k=2), rng)[0] for _ in range(2000)])
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.array([pick_next(logits, SamplingConfig(True, top_p=0.7), rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(nucleus, minlength=4) / len(nucleus), [0.625, 0.375, 0, 0], atol=0.015)


def test_one_model_serves_threads(demo_model):
    """Concurrent generate calls on one model give what sequential calls give, and each thread's last_stats
    are its own request's."""
    _, onnx_dir = demo_model
    m = MoEModel.load(onnx_dir, provider="cpu")
    prompts = [[1, 5, 9], [1, 7, 3, 8, 20, 11, 4], [1, 30], [1, 2 + 40, 50, 60, 70]]
    options = [dict(), dict(do_sample=True, seed=3, temperature=1.4), dict(do_sample=True, seed=4, top_k=5), dict()]
    expected = [m.generate_ids([p], max_new_tokens=6, **o) for p, o in zip(prompts, options)]
    barrier = threading.Barrier(len(prompts))
    got: dict[int, tuple] = {}

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            ids = m.generate_ids([prompts[i]], max_new_tokens=6, **options[i])
        barrier.wait()  # every thread has finished before any reads its stats
        got[i] = ids, m.last_stats.prefill_tokens, m.last_stats.decode_tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(prompts):
        ids, prefill, decoded = got[i]
        assert ids == expected[i]
        assert (prefill, decoded) == (len(prompt), len(ids[0]) - 1)


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
