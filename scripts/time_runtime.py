"""Time the runtime's hot paths on tiny models with a large vocabulary: decoder prefill and decode (fused and
traced attention) and encoder-decoder greedy and beam search. Not a test: it prints numbers to compare
two versions of the runtime side by side on one machine.

    python scripts/time_runtime.py --models /tmp/time-models           # builds the models once, then times
    PYTHONPATH=/path/to/other/checkout python scripts/time_runtime.py --models /tmp/time-models

The models are random (seeded) and built here from transformers configs; nothing is downloaded.
Times are CPU seconds (one intra-op thread by default), the fastest of --repeats calls. "peak MB" is how far the
process's resident memory rose above where it was during the first call (Linux: VmHWM after resetting it through
/proc/self/clear_refs); "tok" is what the runtime reports as decode tokens against the tokens really generated.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DECODER = dict(vocab_size=32000, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=1024,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
SEQ2SEQ = dict(vocab_size=32000, d_model=256, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=256,
               decoder_ffn_dim=256, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4,
               encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=512, decoder_start_token_id=2,
               init_std=0.1, scale_embedding=False)


def build(models: Path) -> dict[str, Path]:
    """The converted models under ``models`` (built on the first run)."""
    out = {"fused": models / "decoder-gqa", "traced": models / "decoder-traced", "seq2seq": models / "nllb-moe"}
    if all((p / "moerun.json").is_file() for p in out.values()):
        return out
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, NllbMoeConfig, NllbMoeForConditionalGeneration

    from moerun.converter.convert import convert

    torch.manual_seed(0)
    config = MixtralConfig(**DECODER)
    config.architectures = ["MixtralForCausalLM"]
    MixtralForCausalLM(config).eval().save_pretrained(models / "decoder-ckpt")
    convert(models / "decoder-ckpt", out["fused"], overwrite=True)
    convert(models / "decoder-ckpt", out["traced"], overwrite=True, fusions=False)
    torch.manual_seed(0)
    config = NllbMoeConfig(**SEQ2SEQ)
    config.architectures = ["NllbMoeForConditionalGeneration"]
    NllbMoeForConditionalGeneration(config).eval().save_pretrained(models / "nllb-ckpt")
    convert(models / "nllb-ckpt", out["seq2seq"], overwrite=True)
    return out


def _rss_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0])


def measure(call, repeats: int) -> tuple[float, float]:
    """(CPU seconds of the fastest of ``repeats`` calls, MB the resident set rose above its level before the first
    call). CPU time, on one thread by default: on a shared machine it moves far less than wall time."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    call()
    peak = (_rss_kb("VmHWM") - before) / 1024
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return min(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    models = build(args.models)

    import moerun
    from moerun import MoEModel

    print(f"runtime: {Path(moerun.__file__).parent}")
    rng = np.random.default_rng(0)
    batch, prompt, new = 8, 128, 32
    prompts = [rng.integers(3, DECODER["vocab_size"], prompt - 4 * i).tolist() for i in range(batch)]
    for name in ("fused", "traced"):
        m = MoEModel.load(models[name], provider="cpu", threads=args.threads)
        m.manifest.eos_token_id = []
        prefill_s, prefill_mb = measure(lambda m=m: m.generate_ids(prompts, max_new_tokens=1), args.repeats)
        total_s, total_mb = measure(lambda m=m: m.generate_ids(prompts, max_new_tokens=new), args.repeats)
        decode_s = (total_s - prefill_s) / (new - 1)
        print(f"{name:7s} prefill b{batch}x{prompt} {prefill_s * 1e3:7.1f} ms  peak {prefill_mb:6.1f} MB | "
              f"decode {decode_s * 1e3:6.2f} ms/step  ({batch / decode_s:6.0f} tok/s)  peak {total_mb:6.1f} MB")
        # tok/s honesty: rows that end early must not count afterwards
        free = m.generate_ids(prompts, max_new_tokens=new)
        m.manifest.eos_token_id = [free[0][2]]  # row 0 ends at its 3rd token
        out = m.generate_ids(prompts, max_new_tokens=new)
        really = sum(len(r) - 1 for r in out)
        print(f"{'':7s} with row 0 ending early: reported decode tokens {m.last_stats.decode_tokens}, "
              f"really generated after the first {really}")

    m = MoEModel.load(models["seq2seq"], provider="cpu", threads=args.threads)
    sources = [rng.integers(3, SEQ2SEQ["vocab_size"], 32 - 2 * i).tolist() + [2] for i in range(batch)]
    for beams in (1, 4):
        def run(beams=beams):
            return m.translate_ids(sources, num_beams=beams, max_new_tokens=new)
        seconds, mb = measure(run, args.repeats)
        out = run()
        stats = m.last_stats
        tokens = sum(len(r) - 1 for r in out)
        print(f"seq2seq beams {beams}: {seconds * 1e3:7.1f} ms per batch of {batch}  peak {mb:6.1f} MB | "
              f"{stats.extra['decoder_steps']} steps, {stats.extra['decoder_rows']} decoder rows, "
              f"reported decode tokens {stats.decode_tokens}, output tokens {tokens}")


if __name__ == "__main__":
    main()
