"""The paper's Table 3 on this machine: input tokens/s translating a fixed set of sentences with an
encoder-decoder MoE of the paper's shape, Hugging Face PyTorch eager against moerun, side by side.

    python scripts/bench_translation.py --out docs/bench_translation          # ~25 min on 2 cores
    python scripts/bench_translation.py --quick --out /tmp/bt                  # smoke run, ~2 min
    python scripts/bench_translation.py --checkpoint tests/fixtures/tiny-translation-moe \
        --out docs/bench_translation_trained                                     # the trained fixture

With --checkpoint, the model is that Hugging Face directory (the trained translation fixture) and the sentences
are its held-out sources (heldout.src) tokenized with its tokenizer: real text, real output lengths.

The model is built here (seeded, random weights, nothing downloaded): the paper's translation MoE
(24 encoder / 12 decoder layers, d 1024, FFN 4096, MoE every other layer, 32 experts, top-1) scaled
to d 512, FFN 2048, 6 / 3 layers, as Switch Transformers (top-1 routing, encoder-decoder), expert
capacity lifted so that Hugging Face drops no token and both sides compute the same function. The
eos logit is pulled up so that sentences finish at different lengths (as real translations do):
some end within a few tokens, others run to --max-new-tokens.
Every measurement runs in its own process; rounds are interleaved; medians with min..max.
Writes OUT.md (the table) and OUT.json (one record per variant, batch and beam).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("hf", "fp32", "int8", "int4", "int4-noprune", "int8-dense", "int4-dense")
NOPRUNE = "-noprune"  # the variant without batch pruning (same model files)
DENSE = "-dense"  # experts and the dense MatMuls (attention, feed-forwards, lm_head) quantized at the same bits
SHAPE = dict(vocab_size=8000, d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=3,
             num_experts=32, encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=10**6,
             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=1.0)
QUICK = dict(SHAPE, d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2, num_decoder_layers=2, num_experts=8)


def build(directory: Path, shape: dict, eos_pull: float) -> Path:
    """Random weights, except: the pad token is never predicted, and the eos row of the (untied) output
    projection points along the decoder's mean final hidden state, scaled by ``eos_pull``, so that some
    sentences end early and others run to the limit (pruning has something to prune)."""
    import torch
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(**shape, tie_word_embeddings=False)
    config.architectures = ["SwitchTransformersForConditionalGeneration"]
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(config).eval()
    probe = torch.tensor(sources(8, config.vocab_size, config.eos_token_id, seed=1)[-1:])
    with torch.no_grad():
        out = model.generate(input_ids=probe, max_new_tokens=8, do_sample=False)
        hidden = model(input_ids=probe, decoder_input_ids=out, output_hidden_states=True).decoder_hidden_states[-1]
        mean = hidden.reshape(-1, config.d_model).mean(0)
        model.lm_head.weight[config.pad_token_id].zero_()
        model.lm_head.weight[config.eos_token_id] = eos_pull * mean / mean.norm()
    model.save_pretrained(directory)
    return directory


def sources(n: int, vocab: int, eos: int, seed: int = 0) -> list[list[int]]:
    """Seeded sentences of 8..48 tokens (eos last), sorted by length as a server batches them."""
    rng = np.random.default_rng(seed)
    out = [rng.integers(2, vocab, int(k)).tolist() + [eos] for k in rng.integers(8, 49, n)]
    return sorted(out, key=len)


def _trim(row: list[int], eos: int) -> list[int]:
    """Generated tokens after the start token, up to and including the first eos."""
    row = row[1:]
    return row[: row.index(eos) + 1] if eos in row else row


def worker(variant: str, path: str, batch: int, beams: int, max_new: int, threads: int, sents: str) -> dict:
    sentences = json.loads(Path(sents).read_text())
    batches = [sentences[i: i + batch] for i in range(0, len(sentences), batch)]
    outputs, rows = [], 0
    if variant == "hf":
        import torch
        from transformers import AutoModelForSeq2SeqLM

        torch.set_num_threads(threads)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
        eos, pad = model.config.eos_token_id, model.config.pad_token_id

        def run(group):
            width = max(map(len, group))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in group])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=(ids != pad).long(), num_beams=beams,
                                     max_new_tokens=max_new, do_sample=False)
            return out.tolist(), 0
    else:
        from moerun import MoEModel

        model = MoEModel.load(path, provider="cpu", threads=threads)
        eos = model.manifest.eos_token_id[0]

        def run(group):
            out = model.translate_ids(group, num_beams=beams, max_new_tokens=max_new,
                                      prune=not variant.endswith(NOPRUNE))
            return out, model.last_stats.extra["decoder_rows"]

    run(batches[0][:1])  # warm-up
    start = time.perf_counter()
    for group in batches:
        out, r = run(group)
        outputs += [_trim(row, eos) for row in out]
        rows += r
    seconds = time.perf_counter() - start
    from moerun.runtime.memory import peak_rss_mb

    tokens = sum(map(len, sentences))
    return {"input_tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "decoder_rows": rows,
            "peak_rss_mb": peak_rss_mb(), "outputs": outputs}


def measure(variant: str, path: Path, batch: int, beams: int, max_new: int, threads: int, sents: Path) -> dict:
    from moerun.converter.report import run_worker

    stdout = run_worker([sys.executable, __file__, "--worker", variant, path, batch, beams, max_new, threads, sents],
                        f"{variant} batch {batch} beam {beams}")
    return json.loads(stdout.strip().splitlines()[-1])


def heldout_sources(checkpoint: Path, n: int) -> list[list[int]]:
    """The first ``n`` held-out sources of a trained fixture as token ids (eos last), sorted by length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lines = (checkpoint / "heldout.src").read_text(encoding="utf-8").splitlines()[:n]
    return sorted((tokenizer(line)["input_ids"] for line in lines), key=len)


def pruning_table(records: list[dict]) -> str:
    """Each variant against its -noprune twin: decoder rows, speed, and whether the outputs are identical."""
    lines = ["| variant | batch | beam | decoder rows pruned / not | rows saved | tok/s pruned / not | speed-up | "
             "identical outputs |", "|---|---|---|---|---|---|---|---|"]
    by_key = {(r["variant"], r["batch"], r["beams"]): r for r in records}
    for r in records:
        twin = by_key.get((r["variant"] + NOPRUNE, r["batch"], r["beams"]))
        if twin is None:
            continue
        lines.append(f"| {r['variant']} | {r['batch']} | {r['beams']} | {r['decoder_rows']} / {twin['decoder_rows']} | "
                     f"{1 - r['decoder_rows'] / twin['decoder_rows']:.0%} | {r['input_tok_s']:.0f} / "
                     f"{twin['input_tok_s']:.0f} | {r['input_tok_s'] / twin['input_tok_s']:.2f}x | "
                     f"{'yes' if r['outputs'] == twin['outputs'] else 'NO'} |")
    return "\n".join(lines)


def table(records: list[dict]) -> str:
    lines = ["| variant | batch | beam | sentences | input tok/s | vs HF | decoder rows | agreement with HF | "
             "peak RSS MB | model MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["batch"], r["beams"]): r for r in records if r["variant"] == "hf"}
    for r in records:
        b = base.get((r["batch"], r["beams"]))
        lo, hi = r["spread"]
        ratio = f"{r['input_tok_s'] / b['input_tok_s']:.2f}x" if b else ""
        rows = r["decoder_rows"] if r["variant"] != "hf" else ""
        lines.append(f"| {r['variant']} | {r['batch']} | {r['beams']} | {r['sentences']} | {r['input_tok_s']:.0f} "
                     f"({lo:.0f}..{hi:.0f}) | {ratio} | {rows} | {r['agreement']:.0%} | {r['peak_rss_mb']:.0f} | "
                     f"{r['model_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Writes OUT.md and OUT.json.")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--beams", default="1,2")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch1-sentences", type=int, default=16, help="Sentences for batch 1 (time).")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eos-pull", type=float, default=6.5, help="Length of the eos row of lm_head.")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="A trained Hugging Face translation model with heldout.src, instead of random weights.")
    parser.add_argument("--block-size", type=int, default=64, help="Quantization block size of int8/int4.")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.beams, args.sentences, args.batch1_sentences = "1,8", "1,2", 16, 4
        args.max_new_tokens, args.repeats = 16, 1
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    variants = args.variants.split(",")
    batches, beams_list = [int(b) for b in args.batch.split(",")], [int(b) for b in args.beams.split(",")]
    with tempfile.TemporaryDirectory(prefix="moerun-bt-") as tmp:
        root = args.workdir or Path(tmp)
        print("building the model and converting it", file=sys.stderr)
        ckpt = args.checkpoint or build(root / "hf", QUICK if args.quick else SHAPE, args.eos_pull)
        dirs = {"hf": ckpt, "fp32": convert(ckpt, root / "fp32", overwrite=True).output}
        for bits in (8, 4):
            for name, dense in ((f"int{bits}", "none"), (f"int{bits}{DENSE}", f"int{bits}")):
                if name in variants or f"{name}{NOPRUNE}" in variants:
                    options = QuantizeOptions(bits=bits, block_size=args.block_size, dense=dense)
                    dirs[name] = quantize_model(dirs["fp32"], root / name, options, overwrite=True).output
        for v in variants:
            if v.endswith(NOPRUNE):
                dirs[v] = dirs[v.removesuffix(NOPRUNE)]
        sizes = {v: sum(f.stat().st_size for f in dirs[v].iterdir() if f.suffix in (".onnx", ".safetensors")
                        or f.name.endswith(".onnx.data")) / 2**20 for v in variants}
        cfg = json.loads((ckpt / "config.json").read_text())
        all_sents = (heldout_sources(ckpt, args.sentences) if args.checkpoint
                     else sources(args.sentences, cfg["vocab_size"], cfg["eos_token_id"]))
        sent_files = {}
        for batch in batches:
            n = args.batch1_sentences if batch == 1 else args.sentences
            chosen = [all_sents[i] for i in np.linspace(0, len(all_sents) - 1, n).astype(int)] if n < len(
                all_sents) else all_sents
            sent_files[batch] = root / f"sources-{batch}.json"
            sent_files[batch].write_text(json.dumps(chosen))
        samples: dict[tuple, list[dict]] = {}
        for r in range(args.repeats):
            for batch in batches:
                for beams in beams_list:
                    for v in variants:
                        print(f"round {r + 1}/{args.repeats}: {v}, batch {batch}, beam {beams}", file=sys.stderr)
                        samples.setdefault((v, batch, beams), []).append(
                            measure(v, dirs[v], batch, beams, args.max_new_tokens, args.threads, sent_files[batch]))
    records = []
    for (v, batch, beams), runs in samples.items():
        ref = samples.get(("hf", batch, beams), [runs[0]])[0]["outputs"]
        outs = runs[0]["outputs"]
        speeds = [x["input_tok_s"] for x in runs]
        records.append({
            "variant": v, "batch": batch, "beams": beams, "sentences": len(outs),
            "input_tok_s": statistics.median(speeds), "spread": [min(speeds), max(speeds)],
            "decoder_rows": runs[0]["decoder_rows"], "agreement": sum(a == b for a, b in zip(outs, ref)) / len(outs),
            "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in runs), "model_mb": sizes[v],
            "runs": len(runs), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
            "output_lengths": [len(o) for o in outs], "outputs": outs,
        })
    lengths = records[0]["output_lengths"]
    md = table(records)
    if any(r["variant"].endswith(NOPRUNE) for r in records):
        md += "\n\nBatch pruning (finished sentences leave the batch), each variant against itself without it:\n\n"
        md += pruning_table(records)
    note = (f"\n\nOutput lengths (HF, batch {records[0]['batch']}, beam {records[0]['beams']}): min {min(lengths)}, "
            f"median {int(np.median(lengths))}, max {max(lengths)} of {args.max_new_tokens}.\n")
    print(md + note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md + note)
    args.out.with_suffix(".json").write_text(json.dumps([{k: v for k, v in r.items() if k != "outputs"}
                                                        for r in records], indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        v, path, batch, beams, max_new, threads, sents = sys.argv[2:]
        print(json.dumps(worker(v, path, int(batch), int(beams), int(max_new), int(threads), sents)))
    else:
        main()
