"""Run moerun's ONNX models with ONNX Runtime; needs onnxruntime, numpy and tokenizers, never torch."""

from .errors import MoerunError
from .manifest import Manifest
from .model import DecoderModel, MoEModel, Seq2SeqModel

__all__ = ["DecoderModel", "Manifest", "MoEModel", "MoerunError", "Seq2SeqModel"]
