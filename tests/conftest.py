"""Shared fixtures: tiny seeded Mixtral checkpoints saved like a user's, and their conversions.

Conversions are session-scoped (an export takes seconds); tests must not modify them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def run_cli(*args: str, timeout: int = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    exe = Path(sys.executable).with_name("moerun")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, env=env, input=stdin)


FIXTURE = Path(__file__).parent / "fixtures" / "tiny-moe"


@pytest.fixture(scope="session")
def tiny_moe_fixture() -> Path:
    """The small trained MoE language model (scripts/train_tiny_moe.py), committed under tests/fixtures."""
    assert (FIXTURE / "model.safetensors").is_file(), "run scripts/train_tiny_moe.py to rebuild the fixture"
    return FIXTURE


@pytest.fixture(scope="session")
def tiny_moe_converted(tiny_moe_fixture, tmp_path_factory) -> Path:
    """The trained fixture converted with the defaults (fp32, fused attention, its tokenizer); read-only."""
    from moerun.converter.convert import convert

    return convert(tiny_moe_fixture, tmp_path_factory.mktemp("tiny-moe-onnx") / "tiny-moe").output


@pytest.fixture(scope="session")
def lfm2_moe_exports(tmp_path_factory) -> dict[str, Path]:
    """The tiny seeded LFM2-MoE of tests/test_hybrid_families.py saved ("ckpt"), converted ("fp32") and quantized
    ("int4", block 16): shared by its parity tests and the genai deploy test (the export takes ~40 s); read-only."""
    from test_hybrid_families import build

    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    root = tmp_path_factory.mktemp("lfm2_moe")
    build().save_pretrained(root / "ckpt")
    fp32 = convert(root / "ckpt", root / "fp32").output
    int4 = quantize_model(fp32, root / "int4", QuantizeOptions(bits=4, block_size=16)).output
    return {"ckpt": root / "ckpt", "fp32": fp32, "int4": int4}


def hf_logits_prefill_and_steps(hf, ids, mask, pos, split: int, steps: int = 2):
    """Oracle logits from PyTorch: the full prefill, and `steps` one-token decode steps after `split`."""
    t = {k: torch.from_numpy(v) for k, v in dict(input_ids=ids, attention_mask=mask, position_ids=pos).items()}
    with torch.no_grad():
        full = hf(**t).logits.float().numpy()
        out = hf(input_ids=t["input_ids"][:, :split], attention_mask=t["attention_mask"][:, :split],
                 position_ids=t["position_ids"][:, :split], use_cache=True)
        cache, decoded = out.cache, []
        for i in range(split, split + steps):
            out = hf(input_ids=t["input_ids"][:, i:i + 1], attention_mask=t["attention_mask"][:, :i + 1],
                     position_ids=t["position_ids"][:, i:i + 1], cache=cache, use_cache=True)
            cache = out.cache
            decoded.append(out.logits.float().numpy())
    return full, decoded


def hybrid_logits_error(hf, model, vocab_size: int):
    """Max |Δlogits| of a hybrid (recurrent-state) ONNX model against PyTorch on a left-padded batch of prompts of
    11, 4 and 8 tokens, along the three paths its states must follow: the full prefill, two one-token decode steps
    with past after position 8, and a 3-token continuation with past from position 6, where row 1 is still
    padding (compared with the full prefill). Returns the error, the prompts and PyTorch's prefill logits."""
    import numpy as np

    from moerun.converter.verify import padded, sample_prompts

    prompts = sample_prompts(vocab_size, seed=1, lengths=(11, 4, 8))
    ids, mask, pos = padded(prompts, pad_id=0)
    valid = mask.astype(bool)
    split = 8
    full, decoded = hf_logits_prefill_and_steps(hf, ids, mask, pos, split, steps=2)
    ours, _ = model.forward(ids, mask, pos)
    worst = float(np.abs(ours - full)[valid].max())
    _, past = model.forward(ids[:, :split], mask[:, :split], pos[:, :split])
    for n, i in enumerate(range(split, split + 2)):
        step, past = model.forward(ids[:, i:i + 1], mask[:, :i + 1], pos[:, i:i + 1], past=past)
        worst = max(worst, float(np.abs(step - decoded[n]).max()))
    _, past = model.forward(ids[:, :6], mask[:, :6], pos[:, :6])  # row 1 is padding up to position 6
    chunk, _ = model.forward(ids[:, 6:9], mask[:, :9], pos[:, 6:9], past=past)
    worst = max(worst, float(np.abs(chunk - full[:, 6:9])[valid[:, 6:9]].max()))
    return worst, prompts, full


def hybrid_state_errors(hf, model, vocab_size: int, layers, states=("conv",), steps: int = 32) -> dict[str, float]:
    """Max |Δ| of each state (``present.{i}.{state}`` of ``layers``) and of the logits against transformers' cache,
    over ``steps`` one-token decode steps after a left-padded prefill of prompts of 9, 1 and 5 tokens (1: padding
    inside the convolution window). transformers' cache keeps d_conv inputs per convolution state, the first of
    which never reaches an output: its last d_conv - 1 are compared. ``alive``: the smallest largest |value| of the
    recurrent states over the steps (0 without one), so that a state decayed to nothing cannot pass unnoticed."""
    import numpy as np

    from moerun.converter.verify import padded, sample_prompts

    names = model.runner.present_names
    prompts = sample_prompts(vocab_size, seed=4, lengths=(9, 1, 5))
    ids, mask, pos = padded(prompts, pad_id=0)
    tokens = np.random.default_rng(5).integers(3, vocab_size, (len(prompts), steps))
    worst = dict.fromkeys([*states, "logits"], 0.0)
    alive = np.inf if "recurrent" in states else 0.0
    t = {k: torch.from_numpy(v) for k, v in dict(input_ids=ids, attention_mask=mask, position_ids=pos).items()}
    with torch.no_grad():
        out = hf(**t, use_cache=True)
        _, past = model.forward(ids, mask, pos)
        next_pos = mask.sum(-1, keepdims=True)
        for step in range(steps):
            for layer in layers:
                cache = out.cache.layers[layer]
                for name in states:
                    theirs = (cache.conv_states[0][..., 1:] if name == "conv" else cache.recurrent_states[0]).numpy()
                    ours = past[names.index(f"present.{layer}.{name}")]
                    worst[name] = max(worst[name], float(np.abs(ours - theirs).max()))
                    if name == "recurrent":
                        alive = min(alive, float(np.abs(theirs).max()))
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            token = tokens[:, step:step + 1]
            out = hf(input_ids=torch.from_numpy(token), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(next_pos), cache=out.cache, use_cache=True)
            logits, past = model.forward(token, mask, next_pos, past=past)
            worst["logits"] = max(worst["logits"], float(np.abs(logits - out.logits.numpy()).max()))
            next_pos = next_pos + 1
    return {**worst, "alive": alive}


def assert_matches_pytorch(hf, onnx, tol: float = 1e-4, seed: int = 1, steps: int = 2) -> float:
    """Prefill and decode-with-past logits of the ONNX model within `tol` of PyTorch; returns the max error."""
    import numpy as np

    from moerun.converter.verify import padded, sample_prompts

    prompts = sample_prompts(hf.config.vocab_size, seed=seed, lengths=(11, 4, 8))
    ids, mask, pos = padded(prompts, pad_id=0, right=onnx.manifest.fused_attention)
    valid = mask.astype(bool)
    split = 6
    full, decoded = hf_logits_prefill_and_steps(hf, ids, mask, pos, split, steps)
    ours, _ = onnx.forward(ids, mask, pos)
    worst = float(np.abs(ours - full)[valid].max())
    _, past = onnx.forward(ids[:, :split], mask[:, :split], pos[:, :split])
    for n, i in enumerate(range(split, split + steps)):
        step, past = onnx.forward(ids[:, i:i + 1], mask[:, :i + 1], pos[:, i:i + 1], past=past)
        assert past[0].shape[2] == i + 1
        worst = max(worst, float(np.abs(step - decoded[n])[valid[:, i:i + 1]].max()))
    assert worst < tol, f"max |Δlogits| {worst:.2e} over {tol}"
    return worst


def assert_experts_only_in_fused_nodes(fp32: Path, int4: Path, sparse: int, skip=lambda name: False,
                                        scans: int = 0) -> None:
    """One MoE (fp32) / QMoE (int4) node per sparse block, no control flow, and every 3-D expert weight feeds the
    fused node and nothing else: no per-expert subgraph, no gathers of expert matrices (TopK may appear in
    routing). ``skip`` names 3-D initializers that are not MoE experts (JetMoE's attention experts). ``scans``: the
    Scan nodes a hybrid graph holds by design (one time scan per recurrent layer), the only control flow allowed."""
    import onnx

    for path, op in ((fp32, "MoE"), (int4, "QMoE")):
        graph = onnx.load(path / "model.onnx").graph
        ops = [n.op_type for n in graph.node]
        assert ops.count(op) == sparse
        assert not {"Loop", "If", "NonZero"} & set(ops) and ops.count("Scan") == scans
        experts = {i.name for i in graph.initializer if len(i.dims) == 3 and not skip(i.name)}
        assert experts and all(n.op_type == op for n in graph.node if experts & set(n.input))


# Margins for the int4 agreement below: two flipped next-token predictions; one free-running row derailed.
POSITION_MARGIN, FREE_RUNNING_MARGIN = 2, 16


def assert_int4_agrees(name: str, vocab: int, fp32: Path, int4: Path, measured: tuple[int, int]) -> None:
    """Next-token (greedy) agreement of int4 with fp32 at the 28 positions of the same prompts, and over 48
    free-running greedy tokens (3 x 16), each held within its margin of the measurement.

    Tiny random models have nearly flat logits, so one flipped token derails a free-running sequence; the
    per-position agreement under the same prefix is the stable figure."""
    from moerun import MoEModel
    from moerun.converter.verify import padded, sample_prompts

    prompts = sample_prompts(vocab, seed=3, lengths=(12, 9, 7))
    a, b = MoEModel.load(fp32, provider="cpu"), MoEModel.load(int4, provider="cpu")
    ids, mask, pos = padded(prompts, pad_id=0, right=a.manifest.fused_attention)
    la, lb = a.forward(ids, mask, pos)[0], b.forward(ids, mask, pos)[0]
    valid = mask.astype(bool)
    per_position = int(np.sum(la.argmax(-1)[valid] == lb.argmax(-1)[valid]))
    a.manifest.eos_token_id = b.manifest.eos_token_id = []
    free = int(np.sum(np.array(a.generate_ids(prompts, 16)) == np.array(b.generate_ids(prompts, 16))))
    figures = f"{name}: int4 agrees with fp32 on {per_position}/28 next tokens, {free}/48 free-running tokens"
    print("\n" + figures)
    assert valid.sum() == 28 and per_position >= measured[0] - POSITION_MARGIN, figures
    assert free >= measured[1] - FREE_RUNNING_MARGIN, figures


def assert_greedy_matches_generate(hf, model_dir, alone: bool = False) -> None:
    """16 greedy tokens of the runtime's generation loop (left-padded prompts of different lengths, no EOS) equal
    transformers' ``generate``; with ``alone``, each prompt run alone gives the same (the batch changes nothing)."""
    from moerun import MoEModel
    from moerun.converter.verify import sample_prompts

    prompts = sample_prompts(hf.config.vocab_size, seed=2, lengths=(3, 10, 6))
    model = MoEModel.load(model_dir, provider="cpu")
    model.manifest.eos_token_id = []
    expected = hf_greedy(hf, prompts, 16)
    assert model.generate_ids(prompts, max_new_tokens=16) == expected
    if alone:
        assert [model.generate_ids([p], max_new_tokens=16)[0] for p in prompts] == expected


def hf_greedy(hf, prompts, new_tokens: int) -> list[list[int]]:
    """`model.generate` greedy on left-padded prompts, no EOS: every row has `new_tokens` tokens."""
    from moerun.converter.verify import padded

    ids, mask, _ = padded(prompts, pad_id=0)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


# --- encoder-decoder (translation) models ------------------------------------------------------

def tiny_nllb_moe(seed: int = 0, **overrides):
    """A tiny random NLLB-MoE: 2+2 layers, MoE every 2nd layer, 4 experts, top-2."""
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    params = dict(vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48,
                  decoder_ffn_dim=48, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4,
                  encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=128,
                  decoder_start_token_id=2, init_std=0.1, scale_embedding=False)
    params.update(overrides)
    config = NllbMoeConfig(**params)
    config.architectures = ["NllbMoeForConditionalGeneration"]
    torch.manual_seed(seed)
    model = NllbMoeForConditionalGeneration(config).eval()
    with torch.no_grad():  # a pull towards eos: generations end at different lengths
        eos = model.model.shared.weight[config.eos_token_id]
        model.model.decoder.layer_norm.bias.add_(1.5 * eos / eos.norm())
    return model


def tiny_switch(seed: int = 0, **overrides):
    """A tiny random Switch Transformers: 2+2 blocks, MoE in every 2nd block, 4 experts, top-1."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    params = dict(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                  num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1, initializer_factor=1.5)
    params.update(overrides)
    config = SwitchTransformersConfig(**params)
    config.architectures = ["SwitchTransformersForConditionalGeneration"]
    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():  # a pull towards eos: generations end at different lengths
        model.lm_head.weight[config.eos_token_id].mul_(1.5)
    return model


def _nllb_experts_as_fairseq(self, hidden_states, router_mask, router_probs):
    # The oracle's fix for transformers 5.x (its loop one-hot encodes the one-hot top-1 mask, so only
    # experts 0 and 1 run): fairseq's mixing, every expert applied densely, weighted by its gate.
    outputs = torch.stack([self[f"expert_{e}"](hidden_states) for e in range(self.num_experts)], dim=1)
    return (router_probs.unsqueeze(-1) * outputs).sum(dim=1) * (1 - self.moe_token_dropout)


@pytest.fixture(scope="session", autouse=True)
def nllb_moe_reference_semantics():
    """Hugging Face NLLB-MoE as fairseq (and transformers 4.x) computes it, for every test."""
    from transformers.models.nllb_moe import modeling_nllb_moe

    original = modeling_nllb_moe.NllbMoeExperts.forward
    modeling_nllb_moe.NllbMoeExperts.forward = _nllb_experts_as_fairseq
    yield
    modeling_nllb_moe.NllbMoeExperts.forward = original


SEQ2SEQ = {"nllb_moe": tiny_nllb_moe, "switch": tiny_switch}


@pytest.fixture(scope="session")
def seq2seq_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq2seq")
    return {name: save_checkpoint(build(seed=3), root / name) for name, build in SEQ2SEQ.items()}


@pytest.fixture(scope="session")
def seq2seq_converted(seq2seq_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from moerun.converter.convert import convert

    root = tmp_path_factory.mktemp("seq2seq-onnx")
    return {name: convert(path, root / name).output for name, path in seq2seq_checkpoints.items()}


def random_sources(vocab: int, eos: int, lengths=(7, 3, 11, 5), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() + [eos] for n in lengths]


def train_sentencepiece(directory: Path, filename: str, vocab_size: int = 300, model_type: str = "bpe",
                        **options) -> Path:
    """A tiny SentencePiece model (BPE, or "unigram" as T5's) trained offline on the fixture's held-out text;
    ``options`` go to the trainer (e.g. T5's special ids)."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    lines = [line.strip() for line in (FIXTURE / "heldout.txt").read_text().splitlines() if line.strip()]
    corpus.write_text("\n".join(lines[:4000]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=vocab_size,
                                   model_type=model_type, character_coverage=1.0, minloglevel=2, **options)
    (directory / "sp.model").rename(directory / filename)
    corpus.unlink()
    (directory / "sp.vocab").unlink()
    return directory


@pytest.fixture(scope="session")
def nllb_tokenizer(tmp_path_factory):
    """transformers' NLLB tokenizer built from a SentencePiece model trained here, with the 202 language codes."""
    from transformers import NllbTokenizer
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    spm_dir = train_sentencepiece(tmp_path_factory.mktemp("nllb-spm"), "sentencepiece.bpe.model")
    return NllbTokenizer.from_pretrained(spm_dir, extra_special_tokens=FAIRSEQ_LANGUAGE_CODES)


@pytest.fixture(scope="session")
def t5_tokenizer(tmp_path_factory):
    """transformers' T5 tokenizer (Switch Transformers uses it) from a SentencePiece model trained here."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(train_sentencepiece(tmp_path_factory.mktemp("t5-spm"), "spiece.model"))
