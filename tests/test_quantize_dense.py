"""--dense: moerun's streamed MatMulNBits rewrite against ONNX Runtime's own MatMulNBitsQuantizer on the same graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

from conftest import save_checkpoint, tiny_mixtral


def _run(model: onnx.ModelProto | str, feeds: dict) -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False)])
def test_dense_quantization_equals_onnxruntime_quantizer(tmp_path, bits, symmetric):
    from moerun.converter.convert import convert
    from moerun.converter.passes import QuantizeDense
    from moerun.converter.quantize import QuantizeOptions

    save_checkpoint(tiny_mixtral(seed=12, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                                 num_key_value_heads=2, num_local_experts=4, num_hidden_layers=2), tmp_path / "ckpt")
    fp32 = convert(tmp_path / "ckpt", tmp_path / "fp32", quantize=QuantizeOptions(block_size=16)).output

    import onnx_ir as ir

    ours = ir.load(fp32 / "model.onnx")
    dense = QuantizeDense(bits=bits, block_size=32, symmetric=symmetric, accuracy_level=None)
    ours = dense(ours).model
    ir.save(ours, tmp_path / "ours.onnx", external_data="ours.onnx.data")

    reference = onnx.load(str(fp32 / "model.onnx"))
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(reference, algo_config=config)
    quantizer.process()
    theirs = quantizer.model.model

    count = sum(n.op_type == "MatMulNBits" for n in theirs.graph.node)
    assert len(dense.quantized) == count == 2 * 2 + 1  # qkv and o per layer, lm_head
    mask = np.ones((2, 7), dtype=np.int64)
    feeds = {"input_ids": np.array([[3, 5, 7, 9, 11, 13, 15], [2, 4, 6, 8, 10, 12, 14]]), "attention_mask": mask}
    session = ort.InferenceSession(str(fp32 / "model.onnx"), providers=["CPUExecutionProvider"])
    for i in session.get_inputs()[2:]:
        feeds[i.name] = np.zeros([2, i.shape[1], 0, i.shape[3]], dtype=np.float32)
    np.testing.assert_array_equal(_run(str(tmp_path / "ours.onnx"), feeds), _run(theirs, feeds))
