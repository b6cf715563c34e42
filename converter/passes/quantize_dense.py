"""Quantize the dense (non-expert) MatMul weights to MatMulNBits with ONNX Runtime's own quantizer."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

__all__ = ["QuantizeDense"]

log = logging.getLogger(__name__)


class QuantizeDense(ir.passes.FunctionalPass):
    """MatMul with a constant weight -> com.microsoft.MatMulNBits (attention, lm_head); routers stay float.

    Delegates to onnxruntime.quantization's MatMulNBitsQuantizer (round-to-nearest, block-wise);
    ``self.quantized`` afterwards lists the MatMul nodes it rewrote.
    """

    def __init__(self, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                 accuracy_level: int | None = None) -> None:
        super().__init__()
        self.bits, self.block_size, self.symmetric, self.accuracy_level = bits, block_size, symmetric, accuracy_level
        self.quantized: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = {n.name for n in model.graph if n.op_type == "MatMul"}
        config = DefaultWeightOnlyQuantConfig(block_size=self.block_size, is_symmetric=self.symmetric,
                                              accuracy_level=self.accuracy_level, bits=self.bits)
        ir.external_data.load_to_model(model)  # the quantizer reads protos: tensors must be in memory
        quantizer = MatMulNBitsQuantizer(ir.serde.serialize_model(model), algo_config=config)
        quantizer.process()
        result = ir.serde.deserialize_model(quantizer.model.model)
        after = {n.name for n in result.graph if n.op_type == "MatMul"}
        self.quantized = sorted(before - after)
        log.info("MatMulNBits int%d: %d MatMul nodes", self.bits, len(self.quantized))
        return ir.passes.PassResult(result, modified=bool(self.quantized))
