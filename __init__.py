"""moerun: Mixture-of-Experts models on ONNX Runtime (fused MoE export, int4/int8 experts, generation)."""

from importlib.metadata import PackageNotFoundError, version

from .runtime import DecoderModel, Manifest, MoEModel, MoerunError, Seq2SeqModel

try:
    __version__ = version("moerun")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["DecoderModel", "Manifest", "MoEModel", "MoerunError", "Seq2SeqModel", "__version__"]
