"""Train the small Mixtral-style MoE language model that the quantization report and tests measure.

Random weights say little about quantization error, so the fixture is a real (tiny) language model,
trained offline on text every machine has: the Python standard library's own source files. Fixed
seeds and a fixed step count make it reproducible on one machine (PyTorch CPU kernels may differ
slightly across versions). Writes an HF checkpoint (safetensors, fp16 to stay under 10 MB), its
tokenizer, and held-out text the training never saw.

    python scripts/train_tiny_moe.py --out tests/fixtures/tiny-moe --steps 1200
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

CONFIG = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, tie_word_embeddings=False, router_aux_loss_coef=0.02, output_router_logits=True,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
HELDOUT_CHARS = 60_000


def corpus() -> tuple[list[str], list[str]]:
    """Standard-library modules, sorted; every 10th file is held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [(i, f.read_text(encoding="utf-8", errors="replace")) for i, f in enumerate(files)]
    return [t for i, t in texts if i % 10], [t for i, t in texts if i % 10 == 0]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/tiny-moe"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    train_texts, heldout_texts = corpus()
    tokenizer = train_tokenizer(train_texts, CONFIG["vocab_size"])
    ids = torch.tensor([t for text in train_texts for t in tokenizer(text)["input_ids"]], dtype=torch.long)
    print(f"{len(train_texts)} training files, {len(ids):,} tokens")

    config = MixtralConfig(**CONFIG)
    config.architectures = ["MixtralForCausalLM"]
    model = MixtralForCausalLM(config)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = args.steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step in range(args.steps):
        offsets = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[o:o + args.seq] for o in offsets.tolist()])
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.3f}  {time.time() - start:.0f} s", flush=True)

    model.eval()
    config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    heldout = "\n".join(heldout_texts)[:HELDOUT_CHARS]
    (args.out / "heldout.txt").write_text(heldout, encoding="utf-8")
    (args.out / "TRAINING.json").write_text(json.dumps({
        "command": f"python scripts/train_tiny_moe.py --out {args.out} --steps {args.steps} --batch {args.batch} "
                   f"--seq {args.seq} --lr {args.lr} --seed {args.seed}",
        "torch": torch.__version__, "train_tokens": len(ids), "final_loss": round(out.loss.item(), 4),
        "seconds": round(time.time() - start), "config": CONFIG,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
