"""Run inside onnxruntime-genai's venv (moerun.genai.genai_python): greedy tokens of a `moerun deploy genai`
directory, loaded by og.Model unchanged. Imports only onnxruntime_genai, numpy and the standard library.

    GENAI_PYTHON genai_greedy.py MODEL_DIR PROMPTS_JSON NEW_TOKENS right|left [OUTPUTS]

prints one JSON line: the new tokens per row; with OUTPUTS (comma-separated graph output names, e.g.
``logits,present.0.conv``), {"tokens": ..., "runs": {name: [value after each model run]}} instead, logits at the last
position only: what genai itself fed back between steps (the prefill, then one run per generated token but the last).
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime_genai as og


def main(model_dir: str, prompts_json: str, new_tokens: str, side: str, outputs: str = "") -> None:
    prompts = json.loads(prompts_json)
    pad = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["pad_token_id"]
    model = og.Model(model_dir)
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad, dtype=np.int32)  # genai tells padding by pad_token_id
    for row, prompt in enumerate(prompts):
        if side == "right":
            ids[row, :len(prompt)] = prompt
        else:
            ids[row, width - len(prompt):] = prompt
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=width + int(new_tokens), batch_size=len(prompts))
    generator = og.Generator(model, params)
    names = [name for name in outputs.split(",") if name]
    runs: dict[str, list] = {name: [] for name in names}

    def record() -> None:
        for name in names:
            value = generator.get_output(name)
            runs[name].append((value[:, -1] if name == "logits" else value).tolist())

    generator.append_tokens(ids)  # runs the prefill
    record()
    first = True
    while not generator.is_done():
        generator.generate_next_token()  # the first call samples from the prefill's logits; later ones run first
        if not first:
            record()
        first = False
    tokens = [generator.get_sequence(row)[width:].tolist() for row in range(len(prompts))]
    print(json.dumps({"tokens": tokens, "runs": runs} if names else tokens))


if __name__ == "__main__":
    main(*sys.argv[1:])
