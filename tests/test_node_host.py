"""A second ONNX Runtime host, onnxruntime-node, loads our files and computes the same logits as Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moerun import MoEModel
from moerun.converter.verify import padded, sample_prompts

NODE_DIR = Path(__file__).parent / "node"


def _node_host_ready() -> bool:
    return shutil.which("node") is not None and (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir()


@pytest.fixture(scope="module")
def node_host():
    if not _node_host_ready():
        if os.environ.get("CI"):
            pytest.fail("onnxruntime-node is not installed: .ci/run must run npm install in tests/node")
        pytest.skip("run 'npm install --ignore-scripts' in tests/node to test the Node.js host")
    return NODE_DIR / "run_model.mjs"


def _tensor(array: np.ndarray) -> dict:
    kind = "int64" if array.dtype == np.int64 else "float32"
    return {"type": kind, "dims": list(array.shape), "data": array.ravel().tolist()}


def test_onnxruntime_node_gives_the_same_logits_as_python(node_host, converted, tmp_path):
    model_dir = converted["k2_e8_h96"]
    model = MoEModel.load(model_dir, provider="cpu")
    fused = model.manifest.fused_attention  # GroupQueryAttention: right padding, no position_ids input
    ids, mask, pos = padded(sample_prompts(model.manifest.vocab_size, seed=4, lengths=(6, 3)), pad_id=0, right=fused)
    _, presents = model.forward(ids, mask, pos)
    # A decode step with past, fed from the prefill's presents, exercises the KV-cache inputs too.
    step_ids = np.array([[5], [7]], dtype=np.int64)
    step_mask = np.concatenate([mask, np.zeros((2, 1), np.int64)], axis=1)
    lengths = mask.sum(-1)
    step_mask[np.arange(2), lengths if fused else -1] = 1  # each row's new token right after its last one
    step_pos = (lengths if fused else pos[:, -1] + 1)[:, None]
    step_logits, _ = model.forward(step_ids, step_mask, step_pos, past=presents)

    feeds = {"input_ids": step_ids, "attention_mask": step_mask}
    if not fused:
        feeds["position_ids"] = step_pos
    for name, value in zip([n for n in model.manifest.inputs if n.startswith("past_")], presents):
        feeds[name] = value
    (tmp_path / "in.json").write_text(json.dumps({k: _tensor(v) for k, v in feeds.items()}))
    result = subprocess.run(["node", str(node_host), str(model_dir / "model.onnx"), str(tmp_path / "in.json"),
                             str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    node_logits = np.array(out["logits"]["data"], dtype=np.float32).reshape(out["logits"]["dims"])
    assert node_logits.shape == step_logits.shape
    assert np.abs(node_logits - step_logits).max() < 1e-4
    assert out["present.0.key"]["dims"][2] == step_mask.shape[1]


def _run_node(node_host, model: Path, feeds: dict, tmp_path: Path) -> dict[str, np.ndarray]:
    (tmp_path / "in.json").write_text(json.dumps({k: _tensor(v) for k, v in feeds.items()}))
    result = subprocess.run(["node", str(node_host), str(model), str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    return {name: np.array(t["data"], dtype=np.float32).reshape(t["dims"]) for name, t in out.items()}


def _python_ort(model: Path, feeds: dict) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_onnxruntime_node_runs_the_int4_model_as_python_does(node_host, converted, tmp_path):
    """QMoE with one scale per row and accuracy_level 0: what onnxruntime-node 1.30 (npm) runs (moerun inspect
    says why the block-wise default needs 1.31)."""
    from moerun.converter.quantize import QuantizeOptions, quantize_model
    from moerun.deploy.inspect import inspect_model

    int4 = quantize_model(converted["k2_e8_h96"], tmp_path / "int4",
                          QuantizeOptions(bits=4, block_size=0, accuracy_level=0)).output
    assert inspect_model(int4).deploy_targets["node"].startswith("ready")
    model = MoEModel.load(int4, provider="cpu")
    ids, mask, _ = padded(sample_prompts(model.manifest.vocab_size, seed=5, lengths=(7, 4)), pad_id=0, right=True)
    feeds = {"input_ids": ids, "attention_mask": mask}
    feeds |= {name: np.zeros(shape, np.float32) for name, shape in
              zip([n for n in model.manifest.inputs if n.startswith("past_")], model.manifest.past_shapes(2))}
    node = _run_node(node_host, int4 / "model.onnx", feeds, tmp_path)
    python = _python_ort(int4 / "model.onnx", feeds)
    valid = mask.astype(bool)
    assert np.abs(node["logits"] - python["logits"])[valid].max() < 1e-4
    assert np.abs(node["present.1.value"] - python["present.1.value"]).max() < 1e-4


def test_onnxruntime_node_runs_the_encoder_decoder_pair(node_host, seq2seq_converted, tmp_path):
    model_dir = seq2seq_converted["nllb_moe"]
    model = MoEModel.load(model_dir, provider="cpu")
    ids, mask, _ = padded(sample_prompts(model.manifest.vocab_size, seed=6, lengths=(6, 3)), pad_id=1, right=True)
    encoder = model_dir / model.manifest.encoder_file
    encoded = _python_ort(encoder, {"input_ids": ids, "attention_mask": mask})
    node_encoded = _run_node(node_host, encoder, {"input_ids": ids, "attention_mask": mask}, tmp_path)
    for name, value in encoded.items():
        assert np.abs(node_encoded[name] - value).max() < 1e-4, name
    decoder = model_dir / model.manifest.model_file
    import onnx

    graph_inputs = onnx.load(str(decoder), load_external_data=False).graph.input
    feeds = {"input_ids": np.full((2, 1), model.manifest.decoder_start_token_id, np.int64),
             "encoder_attention_mask": mask}
    for value in graph_inputs:
        if value.name.startswith("past_key_self") or value.name.startswith("past_value_self"):
            heads, dim = (d.dim_value for d in value.type.tensor_type.shape.dim[1::2])
            feeds[value.name] = np.zeros((2, heads, 0, dim), np.float32)
        elif value.name.startswith("past_"):  # the cross-attention keys/values the encoder wrote
            feeds[value.name] = encoded[value.name.replace("past_", "present_", 1)]
    node = _run_node(node_host, decoder, feeds, tmp_path)
    python = _python_ort(decoder, feeds)
    assert np.abs(node["logits"] - python["logits"]).max() < 1e-4
