"""Graph passes on the exported ONNX model; each takes a model and returns a PassResult."""

from .bind_weights import BindWeights
from .check_fused import CheckFusedMoE, count_ops
from .fold_transposes import FoldWeightTransposes
from .fp16 import ToFloat16
from .fusions import OrtFusions
from .ir_version import MAX_IR_VERSION, PinIrVersion
from .logits_positions import LOGITS_POSITION, LogitsPositions
from .quantize_dense import QuantizeDense
from .quantize_experts import QuantizeExperts

__all__ = [
    "LOGITS_POSITION",
    "MAX_IR_VERSION",
    "BindWeights",
    "CheckFusedMoE",
    "FoldWeightTransposes",
    "LogitsPositions",
    "OrtFusions",
    "PinIrVersion",
    "QuantizeDense",
    "QuantizeExperts",
    "ToFloat16",
    "count_ops",
]
