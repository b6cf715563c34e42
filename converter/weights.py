"""Weights without memory: a model skeleton with no parameters, filled one layer at a time.

The exporter traces a skeleton whose parameters live on the meta device (no memory, whatever the
model's size), so the graph it writes has every weight as an initializer without a value. The
values are bound as ``onnx_ir.LazyTensor``s that ``WeightStream`` computes when the file is written:
it loads one layer group of the checkpoint (``group_of``) into a fresh skeleton with transformers'
own loader (renames, per-expert stacking), runs the same module swaps the traced graph went through
(fused MoE blocks, packed QKV, ...), hands out that group's tensors and drops them before the next
group. Peak memory is one layer, not the model: the same path for a 7M and a 70B checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from ..runtime.errors import CheckpointError, ExportError

__all__ = ["REST", "WeightStream", "build_skeleton", "group_of", "load_groups", "order_by_group",
           "parameters_on_meta"]

log = logging.getLogger(__name__)

REST = "rest"  # embeddings, final norm, LM head: everything outside the numbered layers
# Tensors this small stay cached after their group is dropped: a save writes them inline in the graph
# (onnx_ir keeps tensors under 256 bytes in the protobuf), after the external data, out of group order.
SMALL_BYTES = 4096
# A numbered layer of a stack ("model.layers.3.", "encoder.block.0.", "model.decoder.layers.11.")
_FLOATS = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.DOUBLE: torch.float64}
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|block)\.(\d+)\.")


def group_of(name: str) -> str:
    """The layer group a checkpoint key or graph initializer belongs to: "layers.3", "encoder.layers.0",
    "decoder.layers.2", or REST. Checkpoint keys and the exported graph's names agree on it."""
    m = _LAYER.search(name)
    if m is None:
        return REST
    prefix = name[: m.start()].split(".")
    stack = "encoder." if "encoder" in prefix else "decoder." if "decoder" in prefix else ""
    return f"{stack}layers.{m.group(1)}"


def _group_rank(group: str) -> tuple:
    """Write order: encoder layers, then (decoder) layers, then the rest."""
    if group == REST:
        return (2, 0)
    stack, _, index = group.rpartition(".")
    return (0 if stack.startswith("encoder") else 1, int(index))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device while buffers stay real (rotary
    tables, sinusoidal positions are computed from the config). What accelerate's
    ``init_empty_weights(include_buffers=False)`` does; moerun does not depend on accelerate for it."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(config, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The Hugging Face model for ``config`` with every parameter on the meta device, eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with parameters_on_meta():
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def load_groups(model: nn.Module, tensors: Mapping, keys: list[str]) -> None:
    """Load the checkpoint tensors ``keys`` into the skeleton with transformers' own loader (its key
    renames and conversions, e.g. per-expert w1/w3 stacked into gate_up_proj); other parameters stay
    on the meta device."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    dtype = next(model.parameters()).dtype
    load_config = LoadStateDictConfig(dtype=dtype, weight_mapping=get_model_conversion_mapping(model))
    try:
        info, _ = convert_and_load_state_dict_in_model(model, {k: tensors[k] for k in keys}, load_config)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"cannot load the checkpoint's weights: {str(e).splitlines()[0]}") from e
    problems = [*info.mismatched_keys, *info.conversion_errors, *info.error_msgs]
    if problems:
        raise CheckpointError(f"the checkpoint's weights do not fit the model: {str(problems[0])[:200]}")
    model.tie_weights()


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


@dataclass
class WeightStream:
    """The exported graphs' weights, computed from the checkpoint one layer group at a time.

    ``build(skeleton)`` must apply the module swaps the traced graph went through and return the
    exported modules by graph file name; ``tensors`` maps checkpoint keys to (lazily read) tensors.
    ``loads`` counts group loads: a streaming save loads each group once per graph it feeds.
    """

    skeleton: nn.Module
    tensors: Mapping
    build: Callable[[nn.Module], dict[str, nn.Module]]
    loads: int = 0
    _keys: dict[str, list[str]] = field(default_factory=dict)
    _group: str | None = None
    _values: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    _small: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in self.tensors:
            self._keys.setdefault(group_of(key), []).append(key)

    @property
    def groups(self) -> list[str]:
        return sorted(self._keys, key=_group_rank)

    def _load(self, group: str) -> None:
        self._values.clear()  # drop the previous group before loading the next
        self._group = None
        skeleton = copy.deepcopy(self.skeleton)
        load_groups(skeleton, self.tensors, self._keys.get(group, []))
        for graph, module in self.build(skeleton).items():
            for name, tensor in _named_tensors(module):
                if not tensor.is_meta and group_of(name) == group:
                    self._values[(graph, name)] = tensor.detach()
                    if tensor.nbytes <= SMALL_BYTES:
                        self._small[(graph, name)] = tensor.detach()
        self._group = group
        self.loads += 1
        log.debug("loaded %s: %d tensors", group, len(self._values))

    def array(self, graph: str, name: str, dtype: ir.DataType | None = None) -> np.ndarray:
        """The value of initializer ``name`` of ``graph`` as the traced module computes it; floating-point
        values in ``dtype`` (the graph's: weights are loaded in the checkpoint's own dtype)."""
        group = group_of(name)
        tensor = self._small.get((graph, name))
        if tensor is None and self._group != group:
            self._load(group)
        tensor = tensor if tensor is not None else self._values.get((graph, name))
        if tensor is None:
            raise ExportError(f"{graph}: no checkpoint weights produce {name} (layer group {group})")
        if dtype in _FLOATS and tensor.is_floating_point():
            tensor = tensor.to(_FLOATS[dtype])
        return tensor.contiguous().numpy()

    def lazy(self, graph: str, name: str, dtype: ir.DataType, shape: ir.Shape) -> ir.LazyTensor:
        """A LazyTensor for weight ``name`` of ``graph``, checked against the type and shape the graph declares."""

        def compute() -> ir.Tensor:
            array = self.array(graph, name, dtype)
            if ir.DataType.from_numpy(array.dtype) != dtype or tuple(array.shape) != tuple(shape):
                raise ExportError(f"{graph}: {name} is {array.dtype}{list(array.shape)} in the checkpoint, "
                                  f"the graph expects {dtype}{shape}")
            return ir.tensor(array, name=name)

        return ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)


def order_by_group(graph: ir.Graph) -> None:
    """Reorder the initializers so each layer group's tensors are adjacent (in write order): a save then
    loads each group once."""
    items = sorted(graph.initializers.items(), key=lambda kv: _group_rank(group_of(kv[0])))
    graph.initializers.clear()
    for name, value in items:
        graph.initializers[name] = value
