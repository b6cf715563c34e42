"""moerun.json: what a model directory holds and how to feed it. The runtime owns this format."""

from __future__ import annotations

import json
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelDirError

__all__ = ["FORMAT_VERSION", "LOGITS_POSITION", "MANIFEST_FILE", "Manifest", "decoder_io_names", "seq2seq_io_names",
           "state_layers"]

MANIFEST_FILE = "moerun.json"
FORMAT_VERSION = 1
# optional decoder input (an overridable initializer): one position per row whose logits the graph returns
LOGITS_POSITION = "logits_position"


def decoder_io_names(num_layers: int, positions: bool = True,
                     state_layers: dict[int, dict] | None = None) -> tuple[list[str], list[str]]:
    """Input and output names of a decoder with KV cache (the onnxruntime-genai naming); fused-attention
    graphs take no position_ids. Layers in ``state_layers`` (hybrid models: short convolutions, Mamba) carry
    their fixed-size states instead of keys and values: ``past.{i}.{state}`` / ``present.{i}.{state}``, as
    onnxruntime-genai names them; names follow layer order."""
    state_layers = state_layers or {}
    past, present = [], []
    for i in range(num_layers):
        if i in state_layers:
            past += [f"past.{i}.{state}" for state in state_layers[i]]
            present += [f"present.{i}.{state}" for state in state_layers[i]]
        else:
            past += [f"past_key_values.{i}.{kv}" for kv in ("key", "value")]
            present += [f"present.{i}.{kv}" for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *(["position_ids"] if positions else []), *past], ["logits", *present]


def state_layers(layer_types: list[str], states: dict[str, dict]) -> dict[int, dict[str, list[int]]]:
    """Layer index -> {state name: shape without the batch dimension}, for the layers whose kind carries state."""
    return {i: states[kind] for i, kind in enumerate(layer_types) if kind in states}


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
    max_positions: int | None = None  # the model's max position embeddings; None: not limited (or unknown)
    # Hybrid models: each layer's kind (the config's layer_types, e.g. "conv", "full_attention"), and for the kinds
    # that carry fixed-size state instead of a KV cache, each state's shape without the batch dimension, e.g.
    # {"conv": {"conv": [hidden, kernel - 1]}}. Empty: every layer has a KV cache.
    layer_types: list[str] = field(default_factory=list)
    states: dict = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    fusions: dict = field(default_factory=dict)  # fusion name -> how many applied
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    verify: dict | None = None  # what was verified against PyTorch ("scope") and the measured differences
    quantization: dict | None = None
    source_format: str = "hf"  # what was converted: "hf" or "fairseq"
    source_quantization: list[str] = field(default_factory=list)  # quantized inputs dequantized: mxfp4, fp8
    weights: dict | None = None  # per graph file: tensors written, their bytes, and each tensor's sha256
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

    def state_layers(self) -> dict[int, dict[str, list[int]]]:
        """Layer index -> {state name: shape without batch} for the layers that carry state (none: {})."""
        return state_layers(self.layer_types, self.states)

    def past_shapes(self, batch: int, length: int = 0) -> list[tuple[int, ...]]:
        """Shapes of the past inputs, in input order: key and value per layer, or a stateful layer's states
        (fixed size: ``length`` does not apply to them)."""
        value_dim = self.value_head_dim or self.head_dim
        stateful = self.state_layers()
        shapes: list[tuple[int, ...]] = []
        for i in range(self.num_layers):
            if i in stateful:
                shapes += [(batch, *shape) for shape in stateful[i].values()]
            else:
                shapes += [(batch, self.num_kv_heads, length, dim) for dim in (self.head_dim, value_dim)]
        return shapes

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
            raise ModelDirError(f"{path}: not valid JSON ({e}); re-convert the checkpoint") from e
        if not isinstance(data, dict):
            raise ModelDirError(f"{path}: not a moerun manifest (a JSON object); re-convert the checkpoint")
        if data.get("format_version") != FORMAT_VERSION:
            raise ModelDirError(
                f"{path}: manifest format {data.get('format_version')!r}, this moerun reads {FORMAT_VERSION}; "
                "convert the checkpoint again with this moerun"
            )
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            manifest = cls(**known)
        except TypeError as e:
            raise ModelDirError(f"{path}: incomplete manifest ({e}); re-convert the checkpoint") from e
        if problem := manifest.problem():
            raise ModelDirError(f"{path}: {problem}; re-convert the checkpoint or fix the file")
        return manifest

    def problem(self) -> str | None:
        """What is wrong with the fields' types and values, or None: the runtime trusts them afterwards."""
        hints = typing.get_type_hints(type(self))
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not _is_a(value, hints[name]):
                return f"{name} is {reprlib.repr(value)}, not {_type_name(hints[name])}"
            if name in _CHOICES and value not in _CHOICES[name]:
                return f"{name} is {value!r}, not one of {', '.join(_CHOICES[name])}"
            if name in _POSITIVE and value is not None and value < 1:
                return f"{name} is {value!r}, not >= 1"
        if self.is_seq2seq and self.encoder_file is None:
            return "kind is 'seq2seq' but there is no encoder_file"
        if self.states and not self.layer_types:
            return "states are declared but no layer_types say which layers carry them"
        if self.layer_types and len(self.layer_types) != self.num_layers:
            return f"layer_types has {len(self.layer_types)} entries for num_layers {self.num_layers}"
        for kind, shapes in self.states.items():
            if not isinstance(shapes, dict) or not all(
                    isinstance(n, str) and _is_a(d, list[int]) and all(x >= 1 for x in d) for n, d in shapes.items()):
                return f"states[{kind!r}] is {reprlib.repr(shapes)}, not {{state name: [positive dims]}}"
        return None


_CHOICES = {"kind": ("decoder", "seq2seq"), "attention": ("gqa", "traced"), "dtype": ("fp32", "fp16")}
_POSITIVE = ("num_layers", "num_kv_heads", "head_dim", "value_head_dim", "vocab_size", "hidden_size", "num_experts",
             "experts_per_token", "max_positions")


def _is_a(value, hint) -> bool:
    """isinstance for the manifest's type hints: unions, list[...], and int that is not bool."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_is_a(v, typing.get_args(hint)[0]) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)
