"""Quantize the dense (non-expert) MatMul weights to MatMulNBits with ONNX Runtime's own quantizer kernel."""

from __future__ import annotations

import logging
import math

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

from .lazy import SharedResult, lazy_tensor

__all__ = ["QuantizeDense"]

log = logging.getLogger(__name__)


class QuantizeDense(ir.passes.InPlacePass):
    """MatMul with a constant 2-D weight -> com.microsoft.MatMulNBits (attention, shared experts, lm_head);
    routers (Gemm) stay float.

    The block quantization is ONNX Runtime's (``DefaultWeightOnlyQuantizer.qbits_block_quant``, the C++
    kernel ``MatMulNBitsQuantizer`` uses: round-to-nearest, block-wise) and the node is the one that
    quantizer writes; it runs lazily, per weight, when the model is written, instead of on a protobuf of
    the whole model in memory. ``self.quantized`` afterwards lists the MatMul nodes rewritten.
    """

    def __init__(self, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                 accuracy_level: int | None = None) -> None:
        super().__init__()
        self.bits, self.block_size, self.symmetric, self.accuracy_level = bits, block_size, symmetric, accuracy_level
        self.quantized: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = DefaultWeightOnlyQuantConfig(block_size=self.block_size, is_symmetric=self.symmetric,
                                              accuracy_level=self.accuracy_level, bits=self.bits)
        quantizer = DefaultWeightOnlyQuantizer(config)
        graph = model.graph
        for node in list(graph):
            weight = node.inputs[1] if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
            if weight is None or not weight.is_initializer() or weight.const_value is None \
                    or weight.shape is None or len(weight.shape) != 2:
                continue
            self._rewrite(graph, node, weight, quantizer)
        common_passes.RemoveUnusedNodesPass()(model)
        log.info("MatMulNBits int%d: %d MatMul nodes", self.bits, len(self.quantized))
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def _rewrite(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, quantizer) -> None:
        k, n = (int(d) for d in weight.shape)
        blocks = math.ceil(k / self.block_size)
        per_byte = 8 // self.bits
        source = weight.const_value
        # packed (N, blocks, block bytes), scales (N, blocks), zero points (N, ceil(blocks / per byte))
        result = SharedResult(lambda: quantizer.qbits_block_quant(source.numpy()), readers=2 if self.symmetric else 3)
        inputs = [
            node.inputs[0],
            lazy_tensor(graph, f"{weight.name}.q{self.bits}", ir.DataType.UINT8,
                        (n, blocks, math.ceil(self.block_size / per_byte)), lambda: result.part(0)),
            lazy_tensor(graph, f"{weight.name}.scales", weight.dtype, (n, blocks), lambda: result.part(1)),
        ]
        if not self.symmetric:
            inputs.append(lazy_tensor(graph, f"{weight.name}.zero_points", ir.DataType.UINT8,
                                      (n, math.ceil(blocks / per_byte)), lambda: result.part(2)))
        attributes = {"K": k, "N": n, "bits": self.bits, "block_size": self.block_size}
        if self.accuracy_level:
            attributes["accuracy_level"] = self.accuracy_level
        name = f"{node.name}_Q{self.bits}" if node.name else ""
        new = ir.node("MatMulNBits", inputs, attributes, domain="com.microsoft", name=name)
        new.outputs[0].shape, new.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
        self.quantized.append(node.name)
