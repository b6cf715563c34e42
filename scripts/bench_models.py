"""Build the realistic benchmark checkpoints (seeded) and run `moerun bench` on one of them.

    python scripts/bench_models.py --model gpt-oss --out docs/bench_gpt_oss   # the GPT-OSS-shaped anchor
    python scripts/bench_models.py --model gpt-oss --prompt-len 128,512 --batch 1,4 --threads 1 --repeats 3 \
        --out /tmp/gpt_oss_long   # docs/bench_gpt_oss_128.md and _512.md: this run, split by prompt length
    python scripts/bench_models.py --model mixtral --out docs/bench_mixtral
    python scripts/bench_models.py --model fixture --out docs/bench_fixture  # the trained tiny MoE

Writes OUT.md (the table) and OUT.json (one record per variant, batch and prompt length).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

from moerun.bench import markdown, run_bench, word_level_tokenizer, write_json

SHAPES = {
    # The GPT-OSS shape of the performance anchor: 228M parameters.
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        vocab_size=8000, hidden_size=1024, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, num_local_experts=16, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=4096)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)),
}


def build(model: str, directory: Path) -> Path:
    config_class, arch, params = SHAPES[model]
    config = getattr(transformers, config_class)(**params, tie_word_embeddings=False)
    config.architectures = [arch]
    torch.manual_seed(0)
    getattr(transformers, arch)(config).eval().save_pretrained(directory)
    word_level_tokenizer(config.vocab_size).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*SHAPES, "fixture"], default="gpt-oss")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--prompt-len", default="128")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="hf,genai,fp32,int8,int4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moerun-models-") as tmp:
        if args.model == "fixture":
            checkpoint = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-moe"
        else:
            checkpoint = build(args.model, Path(tmp) / args.model)
        records = run_bench(checkpoint, [int(b) for b in args.batch.split(",")],
                            [int(p) for p in args.prompt_len.split(",")], args.new_tokens,
                            args.variants.split(","), args.repeats, args.threads, Path(tmp) / "variants",
                            on_stage=lambda s: print(s, flush=True))
    table = markdown(records)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"# moerun bench: {args.model}\n\n{table}")
    write_json(records, args.out.with_suffix(".json"))


if __name__ == "__main__":
    main()
