"""moerun's error hierarchy: every error a user can cause is a MoerunError with a message that says what to do."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ExportError",
    "InferenceError",
    "MoerunError",
    "MoerunWarning",
    "ModelDirError",
    "OutputExistsError",
    "PlacementError",
    "RequestCancelledError",
    "RequestError",
    "UnsupportedModelError",
    "VerificationError",
]


class MoerunError(Exception):
    """Base of moerun's errors; the CLI prints the message on one line and exits non-zero."""


class CheckpointError(MoerunError):
    """The input checkpoint is missing, incomplete or unreadable."""


class UnsupportedModelError(MoerunError):
    """The checkpoint is readable but its architecture (or an option of it) is not supported."""


class OutputExistsError(MoerunError):
    """The output directory exists and --overwrite was not given."""


class ExportError(MoerunError):
    """Tracing or translating the model to ONNX failed."""


class VerificationError(MoerunError):
    """The exported model disagrees with the original beyond tolerance."""


class ModelDirError(MoerunError):
    """A directory given to the runtime is not a moerun model directory."""


class RequestError(MoerunError):
    """A generation request cannot be run as asked: empty or too long prompts, token ids outside the
    vocabulary, impossible options."""


class RequestCancelledError(MoerunError):
    """A generation was stopped before it finished (its caller's should_stop said so: a timeout, a disconnect)."""


class InferenceError(MoerunError):
    """ONNX Runtime failed while running a model that loaded."""


class PlacementError(MoerunError):
    """ONNX Runtime would run part of a model on another execution provider than the one asked for (an fp32
    graph's fp16-only CUDA kernels, for one): refused rather than run slowly without a word."""


class MoerunWarning(UserWarning):
    """Something works, but not as well as it should, and the user can fix it (e.g. an fp32 model on CUDA)."""
