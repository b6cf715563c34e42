"""Graph passes on the exported ONNX model; each takes a model and returns a PassResult."""

from .check_fused import CheckFusedMoE, count_ops
from .ir_version import MAX_IR_VERSION, PinIrVersion

__all__ = ["MAX_IR_VERSION", "CheckFusedMoE", "PinIrVersion", "count_ops"]
