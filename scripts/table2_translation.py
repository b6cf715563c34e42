"""The paper's Table 2 on this machine: BLEU and chrF of fp32, int8 and int4 experts on a trained translation MoE.

    python scripts/table2_translation.py --out docs/translation_quality          # ~10 min on 2 cores
    python scripts/table2_translation.py --dense --out docs/translation_quality_dense  # + dense MatMuls quantized

The model is the committed fixture tests/fixtures/tiny-translation-moe (scripts/train_translation_moe.py): a
small Switch Transformers trained here on standard-library docstrings -> a rule-based target language, with
held-out pairs. Each variant is converted (`moerun convert`'s code path, with the quantization options that
`moerun quantize` exposes: bits, block size, rtn/mse) and translates the held-out sources through
Seq2SeqModel.translate (what `moerun translate` calls), beam 1 and 4; Hugging Face PyTorch generate on the same
sources is the oracle row. Scores are sacrebleu's corpus BLEU and chrF against the rule-based references.
Writes OUT.md (the table, with the paper's deltas beside ours) and OUT.json (one record per variant and beam).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-translation-moe"
# (bits, block size, method); the first of each bits is its headline row (moerun's defaults: block 64, mse)
QUANT = ((8, 64, "mse"), (8, 64, "rtn"), (8, 128, "mse"), (8, 0, "rtn"),
         (4, 64, "mse"), (4, 64, "rtn"), (4, 32, "mse"), (4, 128, "mse"), (4, 128, "rtn"), (4, 0, "rtn"))
PAPER = {"int8": -0.007, "int4": -0.167}  # Table 2: average BLEU delta vs fp16 over its language pairs
MAX_NEW_TOKENS = 96


def read_pairs(fixture: Path, limit: int | None) -> tuple[list[str], list[str]]:
    src = (fixture / "heldout.src").read_text(encoding="utf-8").splitlines()
    ref = (fixture / "heldout.ref").read_text(encoding="utf-8").splitlines()
    return src[:limit], ref[:limit]


def scores(hyps: list[str], refs: list[str]) -> dict:
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}


def hf_translate(fixture: Path, sources: list[str], beams: int, batch: int, threads: int) -> list[str]:
    """Hugging Face PyTorch generate (fp32 compute on the fixture's weights): the oracle."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForSeq2SeqLM.from_pretrained(fixture, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(fixture)
    out = []
    for i in range(0, len(sources), batch):
        enc = tokenizer(sources[i: i + batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, num_beams=beams, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        out += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


def moerun_translate(model_dir: Path, sources: list[str], beams: int, batch: int, threads: int) -> list[str]:
    from moerun import MoEModel

    model = MoEModel.load(model_dir, provider="cpu", threads=threads)
    out = []
    for i in range(0, len(sources), batch):
        out += model.translate(sources[i: i + batch], num_beams=beams, max_new_tokens=MAX_NEW_TOKENS)
    return out


def build_variants(fixture: Path, root: Path, quant, dense: bool = False) -> dict[str, Path]:
    """fp32 and each quantized setting; ``dense``: the attention and feed-forward MatMuls and lm_head quantized too,
    at the experts' bits (`moerun quantize --dense intN`)."""
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    dirs = {"fp32": convert(fixture, root / "fp32", overwrite=True).output}
    for bits, block, method in quant:  # as `moerun quantize` does it: from the fp32 export
        options = QuantizeOptions(bits=bits, block_size=block, method=method,
                                  dense=f"int{bits}" if dense else "none")
        dirs[options.label] = quantize_model(dirs["fp32"], root / options.label, options, overwrite=True).output
    return dirs


def table(records: list[dict]) -> str:
    lines = ["| variant | beam | BLEU | ΔBLEU vs fp32 | chrF | ΔchrF vs fp32 | same as HF | paper ΔBLEU |",
             "|---|---|---|---|---|---|---|---|"]
    fp32 = {r["beams"]: r for r in records if r["variant"] == "fp32"}
    for r in records:
        base = fp32[r["beams"]]
        delta = "" if r["variant"] in ("hf", "fp32") else f"{r['bleu'] - base['bleu']:+.3f}"
        dchrf = "" if r["variant"] in ("hf", "fp32") else f"{r['chrf'] - base['chrf']:+.3f}"
        paper = next((f"{v:+.3f}" for k, v in PAPER.items() if r["variant"].startswith(k)), "")
        name = "Hugging Face PyTorch (oracle)" if r["variant"] == "hf" else r["variant"]
        lines.append(f"| {name} | {r['beams']} | {r['bleu']:.2f} | {delta} | {r['chrf']:.2f} | {dchrf} | "
                     f"{r['same_as_hf']:.1%} | {paper} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Writes OUT.md and OUT.json.")
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--sentences", type=int, default=None, help="First N held-out pairs (default: all).")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 sentences, two quantized variants.")
    parser.add_argument("--dense", action="store_true", help="The default int8 and int4 with the dense MatMuls "
                        "quantized at the same bits (the paper quantized experts only).")
    args = parser.parse_args()
    quant = QUANT[:1] + QUANT[4:5] if args.quick or args.dense else QUANT
    sources, refs = read_pairs(args.fixture, 64 if args.quick else args.sentences)
    beams_list = [int(b) for b in args.beams.split(",")]
    records = []
    with tempfile.TemporaryDirectory(prefix="moerun-t2-") as tmp:
        print("converting fp32 and the quantized variants", file=sys.stderr)
        dirs = build_variants(args.fixture, Path(tmp), quant, args.dense)
        for beams in beams_list:
            outputs = {}
            for variant in ["hf", *dirs]:
                start = time.perf_counter()
                if variant == "hf":
                    outputs[variant] = hf_translate(args.fixture, sources, beams, args.batch, args.threads)
                else:
                    outputs[variant] = moerun_translate(dirs[variant], sources, beams, args.batch, args.threads)
                same = sum(a == b for a, b in zip(outputs[variant], outputs["hf"])) / len(sources)
                records.append({"variant": variant, "beams": beams, **scores(outputs[variant], refs),
                                "same_as_hf": same, "sentences": len(sources),
                                "seconds": round(time.perf_counter() - start, 1)})
                print(f"beam {beams} {variant}: BLEU {records[-1]['bleu']:.2f} chrF {records[-1]['chrf']:.2f} "
                      f"same as HF {same:.1%}", file=sys.stderr)
    summary = {}
    for bits in ("int8", "int4"):
        rows = [r for r in records if r["variant"].startswith(bits)]
        fp32 = {r["beams"]: r["bleu"] for r in records if r["variant"] == "fp32"}
        summary[bits] = {"mean_delta_bleu": sum(r["bleu"] - fp32[r["beams"]] for r in rows) / len(rows),
                         "paper_delta_bleu": PAPER[bits]}
    md = table(records)
    mean = {bits: f"{summary[bits]['mean_delta_bleu']:+.3f} (paper {PAPER[bits]:+.3f})" for bits in PAPER}
    note = (f"\n\n{len(sources)} held-out sentences of {args.fixture.name}, max {MAX_NEW_TOKENS} new tokens, "
            f"{args.threads} threads. Mean ΔBLEU vs fp32 over the quantized rows: int8 {mean['int8']}, "
            f"int4 {mean['int4']}.\n")
    print(md + note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md + note)
    args.out.with_suffix(".json").write_text(json.dumps({"records": records, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
