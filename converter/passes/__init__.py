"""Graph passes on the exported ONNX model; each takes a model and returns a PassResult."""

from .check_fused import CheckFusedMoE, count_ops
from .fp16 import ToFloat16
from .fusions import OrtFusions
from .ir_version import MAX_IR_VERSION, PinIrVersion
from .quantize_dense import QuantizeDense
from .quantize_experts import QuantizeExperts

__all__ = [
    "MAX_IR_VERSION",
    "CheckFusedMoE",
    "OrtFusions",
    "PinIrVersion",
    "QuantizeDense",
    "QuantizeExperts",
    "ToFloat16",
    "count_ops",
]
