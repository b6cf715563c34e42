"""`moerun demo`: build a small seeded Mixtral-style checkpoint offline, convert it, verify, generate."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_CONFIG", "build_demo_checkpoint", "build_tokenizer"]

# A few paragraphs to train the demo's byte-level BPE tokenizer on: no download, same on every machine.
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
