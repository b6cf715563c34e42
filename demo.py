"""`moerun demo`: convert the small trained MoE shipped with moerun, verify it against PyTorch, generate,
quantize the experts to int4, and summarise. Also builds seeded random checkpoints for tests."""

from __future__ import annotations

from pathlib import Path

from .runtime.errors import MoerunError

__all__ = ["DEMO_CONFIG", "TRAINED_MODEL", "build_demo_checkpoint", "build_tokenizer", "run_demo"]

# A 3.6M-parameter Mixtral-style MoE trained on the Python standard library's source by
# scripts/train_tiny_moe.py; shipped in the wheel as package data (pyproject.toml).
TRAINED_MODEL = Path(__file__).resolve().parent / "tests" / "fixtures" / "tiny-moe"
PROMPTS = ["def ", "with open(", "def __init__(self"]
NEW_TOKENS = 32

# Seeded random checkpoints with a tokenizer, for tests (random weights: their text is gibberish).
# A few paragraphs to train the byte-level BPE tokenizer on: no download, same on every machine.
_CORPUS = """\
Mixture-of-Experts models route every token to a few experts out of many, so a model with billions of
parameters reads only a fraction of them for each token. Serving them is hard: the weights are huge,
and a generic export turns each expert layer into a tangle of small graphs.
moerun converts a checkpoint into an ONNX graph in which each expert layer is one fused operator,
quantizes the expert weights to four or eight bits, and runs the result on ONNX Runtime.
The quick brown fox jumps over the lazy dog. Hello world, hello experts, hello ONNX Runtime.
Once upon a time there was a small model that wanted to run fast on a CPU with two cores.
"""

DEMO_CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a fixed text (deterministic), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_demo_checkpoint(directory: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a seeded random Mixtral-style checkpoint (safetensors) and its tokenizer to ``directory``."""
    import torch
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    directory = Path(directory)
    params = {**DEMO_CONFIG, **overrides}
    tokenizer = build_tokenizer(params["vocab_size"])
    config = MixtralConfig(**params, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _text(tokenizer, ids: list[int]) -> str:
    """The decoded ids, less a last character that max_new_tokens cut in half (byte-level BPE tokens are
    bytes, so a token can end inside a UTF-8 character)."""
    text = tokenizer.decode(ids)
    while ids and text.endswith("\ufffd"):
        ids = ids[:-1]
        text = tokenizer.decode(ids)
    return text


def run_demo(workdir: Path | None, provider: str, console, results=None):
    """The README's main job, end to end: progress on ``console``, the continuations on ``results`` (default:
    ``console``); returns a rich table summarising what happened."""
    import tempfile
    import time

    from rich.text import Text

    from .console import human_size, run_convert, summary_table
    from .converter.quantize import QuantizeOptions, quantize_model
    from .runtime import MoEModel

    if not (TRAINED_MODEL / "model.safetensors").is_file():
        raise MoerunError(f"the demo's trained model is missing from {TRAINED_MODEL}: reinstall moerun")
    with tempfile.TemporaryDirectory(prefix="moerun-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        onnx_dir = root / "tiny-moe-onnx"
        console.print(f"converting the trained MoE in {TRAINED_MODEL}")
        start = time.perf_counter()
        result = run_convert(TRAINED_MODEL, onnx_dir, verify=True, overwrite=True)
        convert_s = time.perf_counter() - start
        model = MoEModel.load(onnx_dir, provider=provider)
        prompts = [model.tokenizer.encode(p) for p in PROMPTS]
        ref = model.generate_ids(prompts, NEW_TOKENS)
        stats = model.last_stats
        console.print("quantizing the experts to int4 (block 64, mse)")
        int4 = quantize_model(onnx_dir, root / "tiny-moe-int4", QuantizeOptions(), overwrite=True)
        q = MoEModel.load(int4.output, provider=provider)
        got = q.generate_ids(prompts, NEW_TOKENS)
        same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g)) / sum(max(len(r), len(g))
                                                                                for r, g in zip(ref, got))
        results = results or console
        results.print(f"\ngreedy continuations by the ONNX model ({NEW_TOKENS} new tokens):\n")
        for prompt, ids in zip(PROMPTS, ref):
            results.print(Text.assemble((prompt, "bold cyan"), _text(model.tokenizer, ids)), end="\n\n")
        m, r = result.manifest, result.report
        rows = [
            ("model", f"{m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, "
                      f"{m.num_experts} experts top-{m.experts_per_token}, trained on Python source"),
            ("fused MoE nodes", f"{m.moe_layers} (one per MoE layer)"),
            ("attention", "one GroupQueryAttention per layer, KV cache updated in place" if m.fused_attention
             else "traced"),
            ("checkpoint (fp16 safetensors)", human_size(result.checkpoint_bytes)),
            ("ONNX model (fp32)", human_size(result.onnx_bytes)),
            ("convert + verify time", f"{convert_s:.1f} s"),
            ("parity, max |Δlogits|", f"prefill {r.max_abs_prefill:.1e}, decode with past {r.max_abs_decode:.1e}"),
            ("greedy agreement with PyTorch", f"{r.greedy_agreement:.1%} of {r.greedy_tokens} tokens"),
            ("execution provider", model.execution_provider),
            ("prefill", f"{stats.prefill_tokens} tokens, {stats.prefill_tokens_per_s:.0f} tok/s"),
            ("decode", f"batch {len(PROMPTS)}, {stats.decode_tokens_per_s:.0f} tok/s"),
            ("int4 experts (QMoE)", f"{human_size(int4.onnx_bytes)} ({int4.onnx_bytes / result.onnx_bytes:.2f}x), "
                                    f"greedy agreement with fp32 {same:.0%}, decode "
                                    f"{q.last_stats.decode_tokens_per_s:.0f} tok/s"),
            ("output", str(onnx_dir) if workdir else "(temporary; pass --workdir to keep it)"),
        ]
        return summary_table(rows, "moerun demo")
