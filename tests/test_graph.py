"""What the exported graph must look like: fused MoE nodes, KV-cache I/O, loadable by stock tools."""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from conftest import SHAPES
from moerun.converter.passes import MAX_IR_VERSION, PinIrVersion
from moerun.custom_ops import register_schemas
from moerun.runtime.manifest import LOGITS_POSITION, decoder_io_names


def _load(path):
    return onnx.load(path / "model.onnx")


@pytest.mark.parametrize("shape", SHAPES)
def test_one_fused_moe_node_per_layer_and_no_control_flow(shape, converted):
    model = _load(converted[shape])
    ops = [n.op_type for n in model.graph.node]
    moe = [n for n in model.graph.node if n.op_type == "MoE"]
    assert len(moe) == SHAPES[shape]["num_hidden_layers"]
    assert all(n.domain == "com.microsoft" for n in moe)
    params = SHAPES[shape]
    if params["hidden_size"] // params["num_attention_heads"] % 8 == 0:
        # attention too is one fused node per layer: no rotary, repeat_kv, mask or cache-concat subgraph left
        assert ops.count("GroupQueryAttention") == params["num_hidden_layers"]
        body = [n.op_type for n in model.graph.node if id(n) not in _logits_position_nodes(model.graph)]
        assert not {"Expand", "Softmax", "Trilu", "Where", "Range"} & set(body)
    else:  # ONNX Runtime's GroupQueryAttention needs head sizes that are multiples of 8: traced attention
        assert "GroupQueryAttention" not in ops
    assert not {"Loop", "If", "NonZero", "Scan", "TopK"} & set(ops)
    k = SHAPES[shape]["num_experts_per_tok"]
    for node in moe:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k"] == k and attrs["normalize_routing_weights"] == 1
        assert attrs["activation_type"] == b"swiglu" and attrs["swiglu_fusion"] == 1


def _logits_position_nodes(graph) -> set[int]:
    """ids of the nodes that pick the LM head's positions: between its input (hidden) and the GatherND."""
    gather = next(n for n in graph.node if n.op_type == "GatherND")
    producers = {o: n for n in graph.node for o in n.output}
    picked, todo = set(), [gather]
    while todo:
        node = todo.pop()
        picked.add(id(node))
        todo += [producers[i] for i in node.input if i != gather.input[0] and i in producers
                 and id(producers[i]) not in picked]
    return picked


def test_logits_position_is_an_optional_input_before_the_lm_head(converted):
    """An overridable initializer (-1: every position) that GatherND applies to the LM head's input, so foreign
    hosts see the old contract; the MatMul computing the logits takes the gathered rows."""
    model = _load(converted["k2_e8_h96"])
    default = next(t for t in model.graph.initializer if t.name == LOGITS_POSITION)
    assert onnx.numpy_helper.to_array(default).tolist() == [-1]
    assert LOGITS_POSITION in [i.name for i in model.graph.input]
    gather = next(n for n in model.graph.node if n.op_type == "GatherND")
    head = next(n for n in model.graph.node if gather.output[0] in n.input)
    assert head.op_type == "MatMul" and head.output[0] == "logits"
    session = ort.InferenceSession(str(converted["k2_e8_h96"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert LOGITS_POSITION not in [i.name for i in session.get_inputs()]  # hosts need not feed it


def test_kv_cache_inputs_and_outputs_with_dynamic_dims(converted):
    model = _load(converted["k2_e8_h96"])
    layers = SHAPES["k2_e8_h96"]["num_hidden_layers"]
    inputs, outputs = decoder_io_names(layers, positions=False)  # fused attention: positions from the mask
    assert [i.name for i in model.graph.input] == [*inputs, LOGITS_POSITION]
    assert [o.name for o in model.graph.output] == outputs
    assert "past_key_values.2.value" in inputs and "present.2.key" in outputs

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    by_name = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    assert dims(by_name["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(by_name["attention_mask"]) == ["batch_size", "total_sequence_length"]
    assert dims(by_name["past_key_values.0.key"]) == ["batch_size", 3, "past_sequence_length", 16]
    # past and present may be one buffer (updated in place): the present is as long as the longer of the two
    assert dims(by_name["present.0.value"]) == ["batch_size", 3, "present_sequence_length", 16]
    assert dims(by_name["logits"]) == ["batch_size", "logits_length", 160]  # 1 when logits_position is fed


def test_checker_and_shape_inference_accept_the_unfused_model(checkpoints, tmp_path):
    # The ORT fusions emit ONNX Runtime's SimplifiedLayerNormalization in the default domain, which
    # onnx itself does not define; the graph before them is plain ONNX plus our registered MoE schema.
    from moerun.converter.convert import convert

    register_schemas()
    path = convert(checkpoints["k1_e4_h72"], tmp_path / "plain", fusions=False).output / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert onnx.load(path).ir_version == MAX_IR_VERSION
    assert "OrtFusions" not in json.loads((path.parent / "moerun.json").read_text())["passes"]


@pytest.mark.parametrize("shape", ["k1_e4_h72", "k2_e8_h96"])  # traced attention, fused attention
def test_fused_model_is_saved_at_the_pinned_ir_version_and_loads_in_onnxruntime(shape, converted):
    path = converted[shape] / "model.onnx"
    assert onnx.load(path, load_external_data=False).ir_version == MAX_IR_VERSION
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    manifest = json.loads((converted[shape] / "moerun.json").read_text())
    assert [i.name for i in session.get_inputs()] == manifest["inputs"]


def test_pin_ir_version_lowers_a_newer_ir_version_to_the_pinned_one():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)],
                                   ir_version=MAX_IR_VERSION + 1)
    result = PinIrVersion()(ir.serde.deserialize_model(proto))
    assert result.modified and result.model.ir_version == MAX_IR_VERSION
    saved = ir.serde.serialize_model(result.model)
    assert saved.ir_version == MAX_IR_VERSION
    ort.InferenceSession(saved.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not PinIrVersion()(result.model).modified  # already at the pinned version: left alone


def test_output_directory_holds_manifest_and_side_files(converted, checkpoints):
    out = converted["k2_e4_h60"]
    manifest = json.loads((out / "moerun.json").read_text())
    assert manifest["architecture"] == "MixtralForCausalLM"
    assert manifest["moe_layers"] == 2 and manifest["num_experts"] == 4 and manifest["experts_per_token"] == 2
    assert manifest["num_kv_heads"] == 1 and manifest["head_dim"] == 20
    assert manifest["passes"] == ["FoldWeightTransposes", "OrtFusions", "LogitsPositions", "PinIrVersion",
                                  "CheckFusedMoE"]
    # head size 20 is not a multiple of 8: attention stays traced (left padding, position_ids); every
    # norm fused by the ORT fusions (2 layers: 2x2 + 1)
    assert manifest["attention"] == "traced" and "position_ids" in manifest["inputs"]
    assert manifest["fusions"].get("rms_normalization") == 5 and manifest["fusions"].get("skip_rms_normalization")
    assert manifest["eos_token_id"] == [2] and manifest["moerun_version"]
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no staging directory left behind"
