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
