"""Write a seeded random Hugging Face checkpoint of any size, one layer at a time, in a release's layout.

    python scripts/synthetic_checkpoint.py --shape olmoe-7b --out /data/olmoe-7b-synthetic

Tensor names and shapes come from transformers itself: the model is built with its parameters on
the meta device, each layer's random tensors are mapped back to the checkpoint layout the family's
releases use (transformers' ``revert_weight_conversion``: per-expert ``w1``/``gate_proj`` tensors
where the released checkpoints have them) and written as one safetensors shard, with the index
file ``from_pretrained`` reads. Memory stays at one layer; the model never exists in memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from moerun.converter.weights import build_skeleton, group_of

SHAPES = {
    # OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): 6.9B parameters, 13.8 GB in bf16.
    "olmoe-7b": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
        norm_topk_prob=False, tie_word_embeddings=False, rope_theta=10000.0, pad_token_id=1, eos_token_id=50279,
        bos_token_id=None)),
}


def synthesize(config, directory: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               std: float = 0.02) -> Path:
    """Write ``config``'s model with seeded random weights to ``directory`` (one shard per layer group)."""
    from transformers.core_model_loading import revert_weight_conversion

    directory.mkdir(parents=True, exist_ok=True)
    skeleton = build_skeleton(config, dtype, "eager")
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, param in skeleton.named_parameters():
        groups.setdefault(group_of(name), []).append((name, param.shape))
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, params in enumerate(groups.values(), start=1):
        tensors = {}
        for name, shape in params:
            if len(shape) == 1 and "norm" in name:
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * std).to(dtype)
        tensors = {k: v.contiguous() for k, v in revert_weight_conversion(skeleton, tensors).items()}
        shard = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    config.dtype = dtype
    config.save_pretrained(directory)
    return directory


def build_config(shape: str):
    config_class, architecture, params = SHAPES[shape]
    config = getattr(transformers, config_class)(**params)
    config.architectures = [architecture]
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="olmoe-7b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = build_config(args.shape)
    synthesize(config, args.out, seed=args.seed)
    from moerun.bench import word_level_tokenizer

    word_level_tokenizer(config.vocab_size).save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
