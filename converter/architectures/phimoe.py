"""Phi-3.5-MoE: sparse-mixer routing (top-2 with jitter-threshold masked softmaxes), SwiGLU experts.

The op's ``use_sparse_mixer`` is silently ignored by ONNX Runtime's CPU kernel (docs/design.md), so the
routing is computed by Phi-MoE's own router traced into ordinary ops and fed to the op as explicit
weights: exact on every execution provider. Its experts are the standard interface (``standard.py``).
"""

from __future__ import annotations

from .standard import standard_family

standard_family("PhimoeForCausalLM", "Phi-3.5-MoE")
