"""Large tensors in the external data file start on a 4 KiB boundary (converter.output.save_model).

The oracle is the ONNX format itself (each initializer's external_data ``offset``, read by onnx) and ONNX Runtime
loading the file: its outputs are the arrays that were saved. The speed this buys is a benchmark
(docs/bench_gpt_oss_512.md), not a test.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from moerun.converter.output import DATA_ALIGNMENT, save_model

# an odd-sized small tensor first, so that an unaligned writer would put the large ones off a page boundary
SIZES = {"small": 1536 + 7, "large_a": 300_000, "tiny": 3, "large_b": 400_001}
THRESHOLD = 2**20  # onnx_ir's align_threshold: tensors over 1 MB are aligned


def _model(arrays: dict[str, np.ndarray]) -> ir.Model:
    """outputs[i] = Identity(initializer i): ONNX Runtime hands back exactly what it read from the file."""
    nodes, outputs, inits = [], [], []
    for name, array in arrays.items():
        init = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                        const_value=ir.tensor(array, name=name))
        inits.append(init)
        node = ir.Node("", "Identity", [init], num_outputs=1)
        node.outputs[0].name = f"out_{name}"
        node.outputs[0].shape, node.outputs[0].type = init.shape, init.type
        nodes.append(node)
        outputs.append(node.outputs[0])
    graph = ir.Graph([], outputs, nodes=nodes, initializers=inits, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_large_tensors_start_on_a_page_and_load_back(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal(n).astype(np.float32) for name, n in SIZES.items()}
    save_model(_model(arrays), tmp_path)

    proto = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    offsets = {t.name: int(next(e.value for e in t.external_data if e.key == "offset"))
               for t in proto.graph.initializer if t.external_data}
    large = [name for name, a in arrays.items() if a.nbytes > THRESHOLD]
    assert sorted(large) == ["large_a", "large_b"]
    for name in large:
        assert offsets[name] % DATA_ALIGNMENT == 0, (name, offsets[name])
    assert DATA_ALIGNMENT % 4096 == 0

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for name, value in zip(arrays, session.run([f"out_{n}" for n in arrays], {})):
        np.testing.assert_array_equal(value, arrays[name])
