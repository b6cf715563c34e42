"""Convert the graph's float tensors and activations to float16 with ONNX Runtime's own converter."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

__all__ = ["ToFloat16"]

log = logging.getLogger(__name__)


class ToFloat16(ir.passes.FunctionalPass):
    """fp32 -> fp16 everywhere ONNX Runtime's CPU and CUDA kernels take fp16; I/O (logits, KV cache) too.

    Ops in onnxruntime's DEFAULT_OP_BLOCK_LIST keep fp32 behind Cast nodes; ``self.kept_fp32`` lists
    the op types that did, so the manifest can say where fp16 does not apply.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kept_fp32: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ir.external_data.load_to_model(model)  # the converter reads protos: tensors must be in memory
        proto = ir.serde.serialize_model(model)
        self.kept_fp32 = sorted({n.op_type for n in proto.graph.node} & set(DEFAULT_OP_BLOCK_LIST))
        converted = convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=True)
        log.info("fp16; kept in fp32: %s", ", ".join(self.kept_fp32) or "none")
        return ir.passes.PassResult(ir.serde.deserialize_model(converted), modified=True)
