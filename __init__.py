"""moerun: Mixture-of-Experts models on ONNX Runtime (fused MoE export, int4/int8 experts, generation)."""

from importlib.metadata import PackageNotFoundError, version

from .runtime import Manifest, MoEModel, MoerunError

try:
    __version__ = version("moerun")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["Manifest", "MoEModel", "MoerunError", "__version__"]
