"""Where ONNX Runtime runs a model's nodes: decided from the manifest before loading, read back after.

onnxruntime-gpu runs every node its CUDA execution provider has no kernel for on the CPU EP, without a word. In
ONNX Runtime 1.31 the CUDA kernels of GroupQueryAttention and QMoE are registered for fp16/bf16 only, so an fp32
graph's attention and quantized experts run on the CPU in a "CUDA" session. moerun decides before it loads (the
manifest says the dtype and whether the graph holds those ops) and checks after: asked with the session config
entry ``session.record_ep_graph_assignment_info`` = "1", ONNX Runtime records the EP of every node, which
``InferenceSession.get_provider_graph_assignment_info()`` returns.

Untested on CUDA by moerun's test suite (it runs on CPU): scripts/check_cuda.py checks this on a machine with a GPU.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from .manifest import Manifest

__all__ = ["COMPUTE_OPS", "RECORD_PLACEMENT", "compute_fallbacks", "describe_fallbacks", "node_placement",
           "ops_without_cuda_kernel"]

log = logging.getLogger(__name__)

RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"

# Op types that do a model's arithmetic on activations. ONNX Runtime deliberately keeps small shape and mask
# subgraphs (Shape, Gather, Concat, ReduceSum on the int64 mask, ...) on the CPU in a CUDA session; those are not
# fallbacks. One of these on the CPU EP is.
COMPUTE_OPS = frozenset({
    "MoE", "QMoE", "GroupQueryAttention", "MultiHeadAttention", "Attention", "PackedAttention", "SparseAttention",
    "MatMul", "Gemm", "MatMulNBits", "FusedMatMul", "MatMulInteger", "Einsum",
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
    "SkipLayerNormalization", "RMSNormalization", "RotaryEmbedding", "Softmax",
    "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Conv",
})

# ONNX Runtime 1.31: CUDA kernels registered for fp16/bf16 only (docs/design.md).
_FP16_ONLY_ON_CUDA = ("GroupQueryAttention", "QMoE")


def ops_without_cuda_kernel(manifest: Manifest) -> list[str]:
    """Op types the model's graphs hold that have no CUDA kernel for its dtype (they would run on the CPU EP)."""
    if manifest.dtype != "fp32":
        return []
    held = {"GroupQueryAttention": manifest.fused_attention, "QMoE": manifest.quantization is not None}
    return [op for op in _FP16_ONLY_ON_CUDA if held[op]]


def node_placement(session) -> list[tuple[str, str, str]] | None:
    """(execution provider, op type, node name) of every node ONNX Runtime placed, or None when it cannot say (an
    ONNX Runtime without the API, or a session created without RECORD_PLACEMENT)."""
    read = getattr(session, "get_provider_graph_assignment_info", None)
    if read is None:
        return None
    try:
        subgraphs = read()
    except Exception:  # onnxruntime raises its own Fail when the recording was not asked for
        return None
    return [(subgraph.ep_name, node.op_type, node.name) for subgraph in subgraphs for node in subgraph.get_nodes()]


def compute_fallbacks(placement: Iterable[tuple[str, str, str]], provider: str) -> list[tuple[str, str]]:
    """(op type, node name) of the compute nodes (COMPUTE_OPS) that ``placement`` puts on another EP than
    ``provider`` (e.g. "CUDAExecutionProvider")."""
    return [(op, name) for ep, op, name in placement if ep != provider and op in COMPUTE_OPS]


def describe_fallbacks(fallbacks: list[tuple[str, str]]) -> str:
    """'GroupQueryAttention x2, QMoE x2': the op types of ``fallbacks``, most frequent first."""
    return ", ".join(f"{op} x{n}" for op, n in Counter(op for op, _ in fallbacks).most_common())
