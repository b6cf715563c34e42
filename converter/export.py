"""Trace a Hugging Face MoE decoder with torch.onnx.export(dynamo=True) into an ONNX model.

Each MoE block has been swapped for ``FusedMoE`` (one ``moerun::moe`` call) before tracing; the
translation table turns that call into one com.microsoft.MoE node. The model is wrapped so its
forward takes the KV cache as flat tensors and returns logits plus the flat presents.

``trace`` takes a skeleton (parameters on the meta device, ``converter.weights``): tracing then
costs the same for any model size and the graph's weights are initializers without values, bound
later to the checkpoint by ``WeightStream``. A module with real weights exports them as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir
import onnxscript
import torch
from torch import nn
from transformers import DynamicCache

from ..custom_ops.gqa_op import ONNX_TRANSLATION as GQA_TRANSLATION
from ..custom_ops.torch_op import ONNX_TRANSLATION
from ..runtime.errors import ExportError
from ..runtime.manifest import decoder_io_names
from .attention import DecoderWithFusedAttention

__all__ = ["DecoderWithCache", "KVShape", "export_decoder", "kv_shape", "trace"]

log = logging.getLogger(__name__)
# onnx_ir's initializer deduplication warns about every initializer without a value, which is what a
# skeleton's weights are until they are bound (the optimizer and the ORT fusions both run it)
logging.getLogger("onnx_ir.passes.common.initializer_deduplication").setLevel(logging.ERROR)

# Sample sizes for tracing: distinct and > 1 so that no dimension is specialised to a constant.
_BATCH, _SEQ, _PAST = 2, 3, 5


@dataclass(frozen=True)
class KVShape:
    """Per-layer KV-cache geometry: (batch, heads, length, key_dim) keys and (..., value_dim) values."""

    heads: int
    key_dim: int
    value_dim: int


def kv_shape(config) -> KVShape:
    """The KV cache of a standard decoder config (families with other caches override the adapter's)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVShape(kv_heads, head_dim, head_dim)


class DecoderWithCache(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents), flat KV tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        presents = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _sample_inputs(config, kv: KVShape, dtype: torch.dtype, positions: bool,
                   states: dict[int, dict] | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (_BATCH, _SEQ), generator=g)
    attention_mask = torch.ones(_BATCH, _PAST + _SEQ, dtype=torch.int64)
    position_ids = torch.arange(_PAST, _PAST + _SEQ).expand(_BATCH, _SEQ).contiguous()
    states = states or {}
    past = tuple(
        torch.randn(shape, generator=g).to(dtype)
        for i in range(config.num_hidden_layers)
        for shape in ([(_BATCH, *d) for d in states[i].values()] if i in states else
                      [(_BATCH, kv.heads, _PAST, dim) for dim in (kv.key_dim, kv.value_dim)])
    )
    return (input_ids, attention_mask, *([position_ids] if positions else []), *past)


def _name_dynamic_dims(model: ir.Model, num_layers: int, present_length: str,
                       states: dict[int, dict] | None = None) -> None:
    """Give the symbolic dims readable names: batch_size, sequence_length, past_sequence_length, ..."""
    names = {"input_ids": ("batch_size", "sequence_length"),
             "attention_mask": ("batch_size", "total_sequence_length"),
             "position_ids": ("batch_size", "sequence_length"),
             "logits": ("batch_size", "sequence_length", None)}
    for i in range(num_layers):
        for kv in ("key", "value"):
            names[f"past_key_values.{i}.{kv}"] = ("batch_size", None, "past_sequence_length", None)
            names[f"present.{i}.{kv}"] = ("batch_size", None, present_length, None)
        for state, shape in (states or {}).get(i, {}).items():
            names[f"past.{i}.{state}"] = names[f"present.{i}.{state}"] = ("batch_size", *[None] * len(shape))
    for value in [*model.graph.inputs, *model.graph.outputs]:
        dims = names.get(value.name)
        if dims is None or value.shape is None:
            continue
        value.shape = ir.Shape([
            ir.SymbolicDim(name) if name is not None else dim for dim, name in zip(value.shape, dims)
        ])


def export_decoder(wrapper: nn.Module, kv: KVShape) -> ir.Model:
    """Export a decoder wrapped for KV-cache I/O (``DecoderWithCache``, or ``DecoderWithFusedAttention``:
    one GroupQueryAttention node per layer, no position_ids, right-padded attention_mask) whose MoE
    blocks are already fused; returns the ONNX model in memory."""
    fused_attention = isinstance(wrapper, DecoderWithFusedAttention)
    states = getattr(wrapper, "state_layers", {})  # hybrid models (DecoderWithState): layer -> its states
    model = wrapper.model
    config = model.config
    layers = config.num_hidden_layers
    input_names, output_names = decoder_io_names(layers, positions=not fused_attention, state_layers=states)
    dtype = next(model.parameters()).dtype
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    kv_dims = {0: batch, 2: past_len}
    past_dims = [d for i in range(layers) for d in ([{0: batch}] * len(states[i]) if i in states else [kv_dims] * 2)]
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: torch.export.Dim.AUTO},
        *([] if fused_attention else [{0: batch, 1: seq}]),
        tuple(past_dims),
    )
    sample = _sample_inputs(config, kv, dtype, positions=not fused_attention, states=states)
    ir_model = trace(wrapper.eval(), sample, input_names, output_names, dynamic_shapes, type(model).__name__)
    _name_dynamic_dims(ir_model, layers, "present_sequence_length" if fused_attention else "total_sequence_length",
                       states)
    return ir_model


def trace(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str], dynamic_shapes,
          what: str) -> ir.Model:
    """torch.onnx.export(dynamo=True) of ``module`` on ``args``.

    A skeleton (meta parameters) is traced on the meta device: its real buffers (rotary tables,
    sinusoidal positions) keep their values, every other initializer is left without a value.
    onnxscript's optimizer then runs as ``optimize=True`` would, skipping the valueless weights.
    """
    meta = any(p.is_meta for p in module.parameters())
    buffers: dict[str, torch.Tensor] = {}
    if meta:
        # Persistent buffers are checkpoint tensors (DeepSeek-V3's and GLM-4-MoE's router correction
        # biases): left without a value here, bound to the checkpoint like the weights. Baking the
        # skeleton's initial value would silently drop the trained one.
        persistent = set(module.state_dict(keep_vars=True))
        buffers = {name: b.detach().contiguous().clone()
                   for name, b in module.named_buffers(remove_duplicate=False)
                   if not b.is_meta and name not in persistent}
        module = module.to("meta")
        args = tuple(a.to("meta") for a in args)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, custom_translation_table={**ONNX_TRANSLATION, **GQA_TRANSLATION},
                optimize=not meta, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean the same thing to the user
        raise ExportError(f"torch.onnx.export failed for {what}: {str(e).splitlines()[0]}") from e
    model = program.model
    if meta:
        for name, value in model.graph.initializers.items():
            raw = getattr(value.const_value, "raw", None)
            if isinstance(raw, torch.Tensor) and raw.is_meta:
                value.const_value = ir.tensor(buffers[name].numpy(), name=name) if name in buffers else None
        onnxscript.optimizer.optimize_ir(model)
    return model
