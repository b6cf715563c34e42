"""A right-padded batch fed to an exported hybrid graph as onnxruntime-genai feeds it, against each prompt run alone.

onnxruntime-genai pads batched prompts on the right: at prefill the attention mask is 1s then 0s, padded positions get
position 0 and every state input is zeros; each decode step appends one column of 1s to the mask and gives each row
the position after its own last token (its DefaultPositionInputs / attention-mask update). The oracle is the same
graph on each prompt alone, unpadded, which the family tests tie to Hugging Face.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32}


def _session(model_dir: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray,
         past: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """One run; past None: the prefill's zero states and empty KV caches. Returns the outputs by name."""
    feed, batch = {}, ids.shape[0]
    for arg in session.get_inputs():
        dtype = _NUMPY[arg.type]
        if arg.name == "input_ids":
            feed[arg.name] = ids.astype(dtype)
        elif arg.name == "attention_mask":
            feed[arg.name] = mask.astype(dtype)
        elif arg.name == "position_ids":
            feed[arg.name] = pos.astype(dtype)
        elif past is None:  # batch first; every other symbolic dim is the KV cache's past length, 0 at prefill
            shape = [batch if j == 0 else (0 if not isinstance(d, int) else d) for j, d in enumerate(arg.shape)]
            feed[arg.name] = np.zeros(shape, dtype)
        else:
            feed[arg.name] = past[arg.name.replace("past_key_values.", "present.").replace("past.", "present.")]
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def right_padded_vs_alone(model_dir: Path, prompts: list[list[int]], steps: int = 2,
                          pad_id: int = 0, seed: int = 0) -> tuple[float, float]:
    """(max |Δlogits|, max |Δstate|) between a right-padded batch and each prompt alone: the logits at each row's last
    real prompt position and at ``steps`` decode steps (seeded tokens, the same in both), and every
    ``present.{i}.conv`` / ``present.{i}.recurrent`` after the prefill and after each step."""
    session = _session(model_dir)
    batch, width = len(prompts), max(map(len, prompts))
    lengths = np.array([len(p) for p in prompts])
    ids = np.full((batch, width), pad_id, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], mask[row, :len(prompt)] = prompt, 1
    pos = np.where(mask == 1, np.arange(width), 0)
    tokens = np.random.default_rng(seed).integers(3, 100, (batch, steps))

    runs = [_run(session, ids, mask, pos, None)]  # the batch: prefill, then each row continues at its own length
    for k in range(steps):
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        runs.append(_run(session, tokens[:, k:k + 1], mask, (lengths + k)[:, None], runs[-1]))
    states = [name for name in runs[0] if name.startswith("present.") and name.endswith((".conv", ".recurrent"))]
    assert states, "the graph has no state outputs"

    worst_logits = worst_state = 0.0
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        alone = [_run(session, np.array([prompt]), np.ones((1, n), np.int64), np.arange(n)[None], None)]
        for k in range(steps):
            alone.append(_run(session, tokens[row:row + 1, k:k + 1], np.ones((1, n + k + 1), np.int64),
                              np.array([[n + k]]), alone[-1]))
        for k, (ours, theirs) in enumerate(zip(runs, alone)):
            at = n - 1 if k == 0 else 0
            worst_logits = max(worst_logits, float(np.abs(ours["logits"][row, at] - theirs["logits"][0, -1]).max()))
            for name in states:
                worst_state = max(worst_state, float(np.abs(ours[name][row] - theirs[name][0]).max()))
    return worst_logits, worst_state
