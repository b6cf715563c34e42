"""moerun.json: what a model directory holds and how to feed it. The runtime owns this format."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelDirError

__all__ = ["MANIFEST_FILE", "FORMAT_VERSION", "Manifest", "decoder_io_names", "seq2seq_io_names"]

MANIFEST_FILE = "moerun.json"
FORMAT_VERSION = 1


def decoder_io_names(num_layers: int, positions: bool = True) -> tuple[list[str], list[str]]:
    """Input and output names of a decoder with KV cache (the onnxruntime-genai naming); fused-attention
    graphs take no position_ids."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *(["position_ids"] if positions else []), *past], ["logits", *present]


def seq2seq_io_names(num_layers: int) -> dict[str, tuple[list[str], list[str]]]:
    """Input and output names of the encoder and decoder graphs of an encoder-decoder model."""
    layers = range(num_layers)
    cross = [f"{kv}_cross.{i}" for i in layers for kv in ("key", "value")]
    self_ = [f"{kv}_self.{i}" for i in layers for kv in ("key", "value")]
    return {
        "encoder": (["input_ids", "attention_mask"], ["encoder_hidden_states", *(f"present_{n}" for n in cross)]),
        "decoder": (["input_ids", "encoder_attention_mask", *(f"past_{n}" for n in self_ + cross)],
                    ["logits", *(f"present_{n}" for n in self_)]),
    }


@dataclass
class Manifest:
    architecture: str
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    hidden_size: int
    num_experts: int
    experts_per_token: int
    moe_layers: int
    dtype: str = "fp32"
    # "traced": the family's attention as exported ops, left-padded batches, position_ids input;
    # "gqa": one GroupQueryAttention per layer, right-padded batches, KV buffers updated in place.
    attention: str = "traced"
    value_head_dim: int | None = None  # when values differ from keys (MLA); None: head_dim
    kind: str = "decoder"  # "decoder" (one graph) or "seq2seq" (encoder_file + model_file, the decoder)
    model_file: str = "model.onnx"
    encoder_file: str | None = None
    encoder_moe_layers: int = 0  # seq2seq: how many of moe_layers are in the encoder graph
    decoder_start_token_id: int | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    fusions: dict = field(default_factory=dict)  # fusion name -> how many applied
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    verify: dict | None = None
    quantization: dict | None = None
    source: str = ""
    moerun_version: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def is_seq2seq(self) -> bool:
        return self.kind == "seq2seq"

    @property
    def fused_attention(self) -> bool:
        return self.attention == "gqa"

    def graphs(self) -> dict[str, int]:
        """Each ONNX file of the model and the number of fused MoE nodes it holds."""
        if self.encoder_file is None:
            return {self.model_file: self.moe_layers}
        return {self.encoder_file: self.encoder_moe_layers, self.model_file: self.moe_layers - self.encoder_moe_layers}

    def past_shapes(self, batch: int, length: int = 0) -> list[tuple[int, int, int, int]]:
        """Shapes of the past_key_values inputs, in input order (key, value per layer)."""
        value_dim = self.value_head_dim or self.head_dim
        return [(batch, self.num_kv_heads, length, dim) for _ in range(self.num_layers)
                for dim in (self.head_dim, value_dim)]

    def save(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ModelDirError(f"{directory}: no {MANIFEST_FILE}; convert a checkpoint first with 'moerun convert'")
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ModelDirError(f"{path}: not valid JSON ({e})") from e
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelDirError(
                f"{path}: manifest format {data.get('format_version')}, this moerun reads {FORMAT_VERSION}"
            )
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as e:
            raise ModelDirError(f"{path}: incomplete manifest ({e})") from e
