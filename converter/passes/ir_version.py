"""Pin the model's IR version to one that every supported ONNX Runtime host accepts."""

from __future__ import annotations

import logging

import onnx_ir as ir

__all__ = ["MAX_IR_VERSION", "PinIrVersion"]

log = logging.getLogger(__name__)

# onnxruntime-gpu 1.31 rejects IR > 13 and onnxruntime-node 1.30 is older still; torch writes 10.
MAX_IR_VERSION = 10


class PinIrVersion(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.ir_version <= MAX_IR_VERSION:
            return ir.passes.PassResult(model, modified=False)
        log.info("IR version %d -> %d", model.ir_version, MAX_IR_VERSION)
        model.ir_version = MAX_IR_VERSION
        return ir.passes.PassResult(model, modified=True)
