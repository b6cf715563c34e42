"""Run moerun's ONNX models with ONNX Runtime; needs onnxruntime, numpy and tokenizers, never torch."""

from .errors import MoerunError
from .manifest import Manifest
from .model import MoEModel

__all__ = ["Manifest", "MoEModel", "MoerunError"]
