"""ONNX schemas of ONNX Runtime's com.microsoft MoE, QMoE and GroupQueryAttention ops, registered with onnx.

onnx ships no schemas for ONNX Runtime's contrib ops, so the checker, shape inference and torch's
exporter would reject or mistype our graphs. The definitions mirror onnxruntime's
``contrib_defs`` (inputs, attributes, type constraints); output shape and type follow input 0.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

__all__ = ["DOMAIN", "OPSET_VERSION", "register_schemas"]

DOMAIN = "com.microsoft"
OPSET_VERSION = 1

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_Opt = OpSchema.FormalParameterOption.Optional
_A = OpSchema.AttrType

_COMMON_ATTRS = [
    ("activation_type", _A.STRING, "relu | gelu | silu | swiglu | identity", "relu"),
    ("k", _A.INT, "number of experts selected per token", 1),
    ("normalize_routing_weights", _A.INT, "renormalize the top-k softmax weights to sum to 1", 0),
    ("use_sparse_mixer", _A.INT, "Phi-3.5-MoE sparse mixer routing (ignored by the CPU kernel)", 0),
    ("swiglu_fusion", _A.INT, "0: fc1/fc3 separate, 1: gate/up interleaved in fc1, 2: concatenated", 0),
    ("swiglu_limit", _A.FLOAT, "clamp limit of SwiGLU; no clamp when absent", None),
    ("activation_alpha", _A.FLOAT, "alpha of the activation (SwiGLU: sigmoid(alpha * g))", 1.0),
    ("activation_beta", _A.FLOAT, "beta of the activation (SwiGLU: (l + beta))", 0.0),
]
_QMOE_ATTRS = [
    ("expert_weight_bits", _A.INT, "bits per quantized expert weight: 4 or 8", 4),
    ("block_size", _A.INT, "quantization block along K; one scale per row when absent", None),
    ("swiglu_interleaved", _A.INT, "legacy flag for interleaved SwiGLU", 0),
]


def _attr(name: str, kind: OpSchema.AttrType, doc: str, default) -> OpSchema.Attribute:
    if default is None:
        return OpSchema.Attribute(name, kind, doc, required=False)
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), doc)


def _param(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    if optional:
        return OpSchema.FormalParameter(name, type_str, param_option=_Opt)
    return OpSchema.FormalParameter(name, type_str)


def _same_as_input0(ctx) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))


def _schema(name: str, inputs, attrs, type_constraints, outputs=(("output", "T"),), infer=_same_as_input0) -> OpSchema:
    schema = OpSchema(
        name,
        DOMAIN,
        OPSET_VERSION,
        inputs=[_param(*i) for i in inputs],
        outputs=[_param(*o) for o in outputs],
        type_constraints=type_constraints,
        attributes=[_attr(*a) for a in attrs],
    )
    schema.set_type_and_shape_inference_function(infer)
    return schema


def _moe_schema() -> OpSchema:
    inputs = [
        ("input", "T"),
        ("router_probs", "T"),
        ("fc1_experts_weights", "T"),
        ("fc1_experts_bias", "T", True),
        ("fc2_experts_weights", "T"),
        ("fc2_experts_bias", "T", True),
        ("fc3_experts_weights", "T", True),
        ("fc3_experts_bias", "T", True),
    ]
    return _schema("MoE", inputs, _COMMON_ATTRS, [("T", _FLOATS, "activations and weights")])


def _qmoe_schema() -> OpSchema:
    inputs = [
        ("input", "T"),
        ("router_probs", "T"),
        ("fc1_experts_weights", "T1"),
        ("fc1_scales", "T2"),
        ("fc1_experts_bias", "T", True),
        ("fc2_experts_weights", "T1"),
        ("fc2_scales", "T2"),
        ("fc2_experts_bias", "T", True),
        ("fc3_experts_weights", "T1", True),
        ("fc3_scales", "T2", True),
        ("fc3_experts_bias", "T", True),
        ("fc1_zero_points", "T1", True),
        ("fc2_zero_points", "T1", True),
        ("fc3_zero_points", "T1", True),
    ]
    constraints = [
        ("T", _FLOATS, "activations"),
        ("T1", ["tensor(uint8)"], "packed quantized weights"),
        ("T2", _FLOATS, "scales"),
    ]
    return _schema("QMoE", inputs, _COMMON_ATTRS + _QMOE_ATTRS, constraints)


def _gqa_types(ctx) -> None:
    for i in range(3):  # output like the query, presents like the query (the KV cache's type)
        ctx.set_output_type(i, ctx.get_input_type(0))


def _gqa_schema() -> OpSchema:
    """The subset of GroupQueryAttention's contract moerun emits (no quantized KV cache, no QK output)."""
    inputs = [
        ("query", "T"),
        ("key", "T", True),
        ("value", "T", True),
        ("past_key", "T", True),
        ("past_value", "T", True),
        ("seqlens_k", "M"),
        ("total_sequence_length", "M"),
        ("cos_cache", "T", True),
        ("sin_cache", "T", True),
        ("position_ids", "tensor(int64)", True),
        ("attention_bias", "T", True),
        ("head_sink", "T", True),
    ]
    attrs = [
        ("num_heads", _A.INT, "query heads", None),
        ("kv_num_heads", _A.INT, "key/value heads", None),
        ("scale", _A.FLOAT, "QK scale; 1/sqrt(head_size) when absent", None),
        ("local_window_size", _A.INT, "sliding window: the last local_window_size keys, the query's own included", -1),
        ("do_rotary", _A.INT, "apply rotary embeddings from cos_cache/sin_cache to query and key", 0),
        ("rotary_interleaved", _A.INT, "interleaved rotary pattern", 0),
        ("softcap", _A.FLOAT, "softcap of the attention logits", 0.0),
        ("smooth_softmax", _A.INT, "smooth softmax", 0),
    ]
    constraints = [("T", _FLOATS, "activations and KV cache"), ("M", ["tensor(int32)"], "lengths")]
    outputs = (("output", "T"), ("present_key", "T"), ("present_value", "T"))
    return _schema("GroupQueryAttention", inputs, attrs, constraints, outputs, _gqa_types)


def register_schemas() -> None:
    """Register MoE, QMoE and GroupQueryAttention with onnx once per process (idempotent)."""
    for schema in (_moe_schema(), _qmoe_schema(), _gqa_schema()):
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)
