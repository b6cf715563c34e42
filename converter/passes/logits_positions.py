"""Let the caller ask for one position's logits per row: an optional `logits_position` input before the LM head."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ...runtime.manifest import LOGITS_POSITION

__all__ = ["LOGITS_POSITION", "LogitsPositions"]

log = logging.getLogger(__name__)

# ops between the LM head's MatMul and the logits output that act on each position alone (scaling, soft-capping)
_POSITIONWISE = {"Mul", "Div", "Add", "Sub", "Tanh", "Cast", "Identity"}
_HEADS = {("", "MatMul"), ("com.microsoft", "MatMulNBits"), ("com.microsoft", "FusedMatMul")}


class LogitsPositions(ir.passes.InPlacePass):
    """Gather the LM head's input at ``logits_position`` (batch,), one position per row, when it is fed.

    A prefill needs only each row's last logits, but a decoder graph computes the LM head at every prompt
    position: a 2k-token prompt on a 150k-token vocabulary is 2k x 150k x 4 bytes = 1.2 GB of logits and most of
    the prompt's FLOPs outside the experts. The new input is an overridable initializer whose default (-1) keeps
    every position, so hosts that do not know it (onnxruntime-genai, Triton, onnxruntime-node) see the graph's
    contract unchanged. Fed with each row's index (for right-padded rows, its last real token), the logits are
    (batch, 1, vocab). Any negative index keeps every position. Written by hand: no exporter option does this
    per row (transformers' ``logits_to_keep`` keeps the same columns for every row).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        logits = next((v for v in graph.outputs if v.name == "logits"), None)
        head = _head(logits)
        if head is None:
            log.info("no LM head found before 'logits': logits_position not added")
            return ir.passes.PassResult(model, modified=False)
        hidden = head.inputs[0]
        position = ir.Value(name=LOGITS_POSITION, type=ir.TensorType(ir.DataType.INT64),
                            shape=ir.Shape(["logits_rows"]),
                            const_value=ir.tensor(np.array([-1], dtype=np.int64), name=LOGITS_POSITION))
        graph.inputs.append(position)
        graph.register_initializer(position)
        nodes, gathered = _gather(hidden, position)
        for node in nodes:
            graph.insert_before(head, node)
        head.replace_input_with(0, gathered)
        if logits.shape is not None and len(logits.shape) == 3:
            logits.shape = ir.Shape([logits.shape[0], "logits_length", logits.shape[2]])
        return ir.passes.PassResult(model, modified=True)


def _head(logits: ir.Value | None) -> ir.Node | None:
    """The MatMul that computes ``logits``, through position-wise ops; None if the graph is not of that shape."""
    node = logits.producer() if logits is not None else None
    while node is not None and (node.domain, node.op_type) not in _HEADS:
        if node.op_type not in _POSITIONWISE:
            return None
        varying = [v for v in node.inputs if v is not None and not _constant(v)]
        if len(varying) != 1:
            return None
        node = varying[0].producer()
    return node


def _constant(value: ir.Value) -> bool:
    producer = value.producer()
    return value.is_initializer() or (producer is not None and producer.op_type == "Constant")


def _gather(hidden: ir.Value, position: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing hidden[b, position[b]] (batch, 1, H), or all of hidden (batch, seq, H) when a position is
    negative. Without an If: the index matrix is (batch, seq) either way, then cut to 1 or seq columns."""
    nodes: list[ir.Node] = []

    def op(op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes)
        nodes.append(node)
        return node.outputs[0]

    def const(values) -> ir.Value:
        return op("Constant", value=ir.tensor(np.array(values, dtype=np.int64)))

    batch = op("Shape", hidden, start=0, end=1)
    seq = op("Shape", hidden, start=1, end=2)
    every = op("Less", op("ReduceMin", position, keepdims=0), const(0))
    columns = op("Unsqueeze", op("Range", const(0), op("Squeeze", seq), const(1)), const([0]))  # (1, seq)
    rows = op("Unsqueeze", position, const([1]))  # (batch, 1)
    index = op("Expand", op("Where", every, columns, rows), op("Concat", batch, seq, axis=0))  # (batch, seq)
    keep = op("Where", every, seq, const([1]))
    index = op("Unsqueeze", op("Slice", index, const([0]), keep, const([1])), const([2]))  # (batch, keep, 1)
    gathered = op("GatherND", hidden, index, batch_dims=1)
    gathered.dtype = hidden.dtype
    return nodes, gathered
