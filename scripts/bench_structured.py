"""Constrained decoding's cost: decode tokens/s with and without a JSON schema (llguidance's token mask applied to the
logits before the pick) at batch 1 and 16 on the bench shape (scripts/bench_models.py), and the mask's share of a
decode step, including the mask alone at a 151,936-token vocabulary (Qwen's size).

    python scripts/bench_structured.py --out docs/bench_structured

The bench shape is GPT-OSS-shaped (scripts/bench_models.py) with a byte-level BPE tokenizer of 8,000 tokens trained
here on the trained fixture's text (the bench's word-level tokenizer cannot spell JSON). The 151,936-token tokenizer
is synthetic: byte-level tokens of the words and symbols of Python's standard library sources, as an LLM vocabulary
holds words and code pieces; its masks are timed on the same JSON documents the model writes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "maxItems": 400}},
    "required": ["name", "values"], "additionalProperties": False}


def byte_level_tokenizer(vocab_size: int, words: list[str]):
    """A byte-level BPE tokenizer (GPT-2's byte alphabet) whose vocabulary is the 256 bytes then ``words``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    byte_map = _byte_map()
    for word in words:
        if len(vocab) >= vocab_size - 1:  # and </s>
            break
        vocab.setdefault("".join(byte_map[b] for b in word.encode()), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    return tok


def _byte_map() -> dict[int, str]:
    """GPT-2's bytes_to_unicode."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def stdlib_words() -> list[str]:
    """Words, numbers and symbol runs of Python's standard library, most frequent first, each also with a space."""
    counts: Counter[str] = Counter()
    for path in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"):
        if "site-packages" in path.parts:
            continue
        try:
            counts.update(re.findall(r"[A-Za-z_]+|\d{1,4}|[^\sA-Za-z\d]{1,3}", path.read_text(errors="ignore")))
        except OSError:
            continue
        if len(counts) > 400_000:
            break
    words = [w for w, _ in counts.most_common()]
    return [v for w in words for v in (w, " " + w)]


def mask_cost_large_vocab(documents: list[str], vocab_size: int = 151_936) -> dict:
    """Milliseconds per token to compute and apply the mask at ``vocab_size``, over the given JSON documents."""
    import llguidance

    from moerun.runtime.grammar import GrammarMatcher

    tok = byte_level_tokenizer(vocab_size, stdlib_words())
    eos = tok.token_to_id("</s>")
    ll = llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab_size, eos_token=[eos],
                              slices=llguidance.LLTokenizer.json_slices())
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    logits = np.random.default_rng(0).standard_normal(vocab_size).astype(np.float32)
    seconds, tokens = 0.0, 0
    for doc in documents:
        matcher = GrammarMatcher(llguidance.LLMatcher(ll, grammar, log_level=0), vocab_size)
        for token in ll.tokenize_bytes(doc.encode()):
            start = time.perf_counter()
            allowed = matcher.allowed()
            masked = np.where(allowed, logits, -np.inf)
            seconds += time.perf_counter() - start
            assert np.isfinite(masked[token]), "the document left the grammar"
            matcher.consume(token)
            tokens += 1
    return {"vocab": vocab_size, "tokens": tokens, "mask_ms_per_token": 1000 * seconds / tokens,
            "tokenizer_words": len(tok.get_vocab())}


def run_scheduler(model, batch: int, constrained: bool, new_tokens: int) -> dict:
    """``batch`` requests decoded together; tokens/s over the decode steps, and the time the masks took."""
    from moerun.runtime.generation import SamplingConfig
    from moerun.runtime.grammar import GrammarMatcher, schema_grammar
    from moerun.runtime.logits import TokenPicker
    from moerun.serve.scheduler import Request, Scheduler

    scheduler = Scheduler(model, max_batch=batch, max_queue=batch, max_len=256)
    decode = scheduler.engine.decode
    timing = {"decode_s": 0.0, "steps": 0, "mask_s": 0.0}

    def timed_decode(tokens):
        start = time.perf_counter()
        out = decode(tokens)
        timing["decode_s"] += time.perf_counter() - start
        timing["steps"] += 1
        return out

    allowed = GrammarMatcher.allowed

    def timed_allowed(self):
        start = time.perf_counter()
        out = allowed(self)
        timing["mask_s"] += time.perf_counter() - start
        return out

    scheduler.engine.decode = timed_decode
    GrammarMatcher.allowed = timed_allowed
    grammar = schema_grammar(SCHEMA, model.tokenizer, model.runner.vocab, model.manifest.eos_token_id) \
        if constrained else None
    done, texts = threading.Semaphore(0), {}
    prompt = model.tokenizer.encode("Write the data as JSON:")
    try:
        start = time.perf_counter()
        for i in range(batch):
            texts[i] = []
            picker = TokenPicker(SamplingConfig(), grammar=grammar.matcher()) if grammar else None

            def emit(kind, value, i=i):
                texts[i].append(value) if kind == "token" else done.release()

            scheduler.submit(Request(prompt, new_tokens, SamplingConfig(), emit, picker=picker))
        for _ in range(batch):
            done.acquire()
        wall = time.perf_counter() - start
    finally:
        GrammarMatcher.allowed = allowed
        scheduler.close()
    generated = sum(len(t) for t in texts.values())
    documents = [model.tokenizer.decode(t) for t in texts.values()]
    return {"batch": batch, "constrained": constrained, "tokens": generated, "wall_s": wall,
            "decode_tok_s": generated / timing["decode_s"] if timing["decode_s"] else 0.0,
            "step_ms": 1000 * timing["decode_s"] / max(timing["steps"], 1),
            "mask_ms_per_step": 1000 * timing["mask_s"] / max(timing["steps"], 1), "documents": documents}


def build_model(directory: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    import transformers
    from bench_models import SHAPES
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moerun.converter.convert import convert

    config_class, arch, params = SHAPES["gpt-oss"]
    config = getattr(transformers, config_class)(**params, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    config.architectures = [arch]
    torch.manual_seed(0)
    checkpoint = directory / "ckpt"
    getattr(transformers, arch)(config).eval().save_pretrained(checkpoint)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-moe" / "heldout.txt"
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                         bos_token="<s>").save_pretrained(checkpoint)
    return convert(checkpoint, directory / "onnx").output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from moerun.runtime import MoEModel

    records = []
    with tempfile.TemporaryDirectory(prefix="moerun-structured-") as tmp:
        model = MoEModel.load(build_model(Path(tmp)), provider="cpu", threads=args.threads)
        model.manifest.eos_token_id = [2]
        for batch in map(int, args.batch.split(",")):
            run_scheduler(model, batch, False, 8)  # warm-up
            for constrained in (False, True):
                records.append(run_scheduler(model, batch, constrained, args.new_tokens))
    documents = [d for r in records if r["constrained"] for d in r["documents"]]
    large = mask_cost_large_vocab(documents[:8])
    lines = ["| batch | schema | decode tok/s | step ms | mask ms/step | mask share of a free step |",
             "| ---: | :--- | ---: | ---: | ---: | ---: |"]
    free = {r["batch"]: r for r in records if not r["constrained"]}
    for r in records:
        share = r["mask_ms_per_step"] / free[r["batch"]]["step_ms"]
        lines.append(f"| {r['batch']} | {'yes' if r['constrained'] else 'no'} | {r['decode_tok_s']:.1f} | "
                     f"{r['step_ms']:.1f} | {r['mask_ms_per_step']:.2f} | {100 * share:.1f}% |")
    for batch, r in free.items():
        lines.append(f"\nAt {large['vocab']:,} tokens the mask costs {large['mask_ms_per_token']:.3f} ms per token "
                     f"({large['tokens']} tokens of the model's JSON): {batch} constrained rows "
                     f"{batch * large['mask_ms_per_token']:.2f} ms, "
                     f"{100 * batch * large['mask_ms_per_token'] / r['step_ms']:.1f}% of this free step at batch "
                     f"{batch}.")
    table = "\n".join(lines)
    print(table)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"records": [{k: v for k, v in r.items() if k != "documents"} for r in records], "large_vocab": large},
        indent=2))


if __name__ == "__main__":
    main()
