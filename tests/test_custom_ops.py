"""The op contract: our NumPy reference and torch op agree with ONNX Runtime's com.microsoft.MoE kernel."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from moerun.custom_ops import DOMAIN, MoEAttributes, moe_reference, register_schemas
from moerun.custom_ops.torch_op import moe as torch_moe

CASES = {
    "swiglu_interleaved_k2_norm": (MoEAttributes(k=2, activation_type="swiglu", normalize_routing_weights=1,
                                                 swiglu_fusion=1), False),
    "swiglu_k1": (MoEAttributes(k=1, activation_type="swiglu", swiglu_fusion=1), False),
    "relu_bias_k2": (MoEAttributes(k=2, activation_type="relu"), True),
    "silu_bias_k1": (MoEAttributes(k=1, activation_type="silu"), True),
    "identity_k2_norm": (MoEAttributes(k=2, activation_type="identity", normalize_routing_weights=1), True),
}


def _weights(attrs: MoEAttributes, bias: bool, tokens=7, hidden=24, inter=20, experts=6, seed=0):
    rng = np.random.default_rng(seed)
    n1 = 2 * inter if attrs.activation_type == "swiglu" else inter
    w = {
        "x": rng.standard_normal((tokens, hidden), dtype=np.float32),
        "router": rng.standard_normal((tokens, experts), dtype=np.float32),
        "fc1": rng.standard_normal((experts, n1, hidden), dtype=np.float32) * 0.3,
        "fc2": rng.standard_normal((experts, hidden, inter), dtype=np.float32) * 0.3,
    }
    if bias:
        w["fc1_bias"] = rng.standard_normal((experts, n1), dtype=np.float32) * 0.1
        w["fc2_bias"] = rng.standard_normal((experts, hidden), dtype=np.float32) * 0.1
    return w


def _ort_moe(w: dict, attrs: MoEAttributes) -> np.ndarray:
    names = ["x", "router", "fc1", "fc1_bias", "fc2", "fc2_bias"]
    node = helper.make_node("MoE", [n if n in w else "" for n in names], ["moe"], domain=DOMAIN, **attrs.to_onnx())
    graph = helper.make_graph(
        [node, helper.make_node("Identity", ["moe"], ["y"])], "moe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, w[n].shape) for n in names if n in w],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", "hidden"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=10)
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    (moe_out,) = [v for v in inferred.graph.value_info if v.name == "moe"]
    assert [d.dim_value for d in moe_out.type.tensor_type.shape.dim] == list(w["x"].shape)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: w[n] for n in names if n in w})[0]


@pytest.mark.parametrize("case", CASES)
def test_numpy_reference_matches_onnxruntime(case):
    attrs, bias = CASES[case]
    w = _weights(attrs, bias)
    expected = _ort_moe(w, attrs)
    ours = moe_reference(w["x"], w["router"], w["fc1"], w["fc2"], attrs, w.get("fc1_bias"), w.get("fc2_bias"))
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_torch_op_matches_onnxruntime(case):
    attrs, bias = CASES[case]
    w = _weights(attrs, bias, seed=1)
    expected = _ort_moe(w, attrs)
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    ours = torch_moe(t["x"], t["router"], t["fc1"], t.get("fc1_bias"), t["fc2"], t.get("fc2_bias"), None, None,
                     attrs.k, attrs.activation_type, attrs.normalize_routing_weights, attrs.swiglu_fusion,
                     attrs.swiglu_limit, attrs.activation_alpha, attrs.activation_beta)
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-5, rtol=1e-4)


def test_interleaved_experts_equal_hugging_face_mixtral_experts():
    from conftest import tiny_mixtral
    from moerun.converter.architectures.base import interleave_gate_up

    model = tiny_mixtral(hidden_size=40, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                         num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = block(x[None])[0]
        logits = torch.nn.functional.linear(x, block.gate.weight)
        ours = torch_moe(x, logits, interleave_gate_up(block.experts.gate_up_proj), None, block.experts.down_proj,
                         None, None, None, 2, "swiglu", 1, 1, None, 1.0, 0.0)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
