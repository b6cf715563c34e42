"""onnxruntime-genai as a benchmark baseline: its model builder's export of a checkpoint, run through
its C++ generator, measured exactly as moerun's own variants are.

onnxruntime-genai depends on the CPU ``onnxruntime`` package, which cannot share an environment with
``onnxruntime-gpu``; so it lives in a venv of its own (built on first use, with the same onnxruntime,
torch and transformers versions as this one: the comparison is of graphs and loops, not kernels).

Run as a script inside that venv, this file is the worker: it imports only onnxruntime_genai, numpy
and the standard library.

    GENAI_PYTHON genai.py MODEL_DIR BATCH PROMPT_LEN NEW_TOKENS THREADS   # one JSON line on stdout
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

GENAI_VERSION = "0.18.*"
READY = "moerun-ready"  # written last: a venv without it is half-built and is rebuilt


def _venv_dir() -> Path:
    default = Path.home() / ".cache" / "moerun" / "genai-venv"
    return Path(os.environ.get("MOERUN_GENAI_VENV", default))


def _pins() -> list[str]:
    """Same onnxruntime, torch and transformers as moerun's environment."""
    from importlib.metadata import version

    ort = next(version(name) for name in ("onnxruntime-gpu", "onnxruntime") if _installed(name))
    return [f"torch=={version('torch')}", f"onnxruntime=={ort}", f"onnxruntime-genai=={GENAI_VERSION}",
            f"transformers=={version('transformers')}", "onnx", "onnx-ir", "safetensors", "numpy"]


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def _run(cmd: list, what: str) -> str:
    from .converter.report import run_worker  # not at the top: the worker below runs where moerun is not installed

    return run_worker(cmd, what)


def genai_python(progress=lambda _: None) -> Path:
    """The python of the onnxruntime-genai venv, created on first use (a few minutes)."""
    import shutil

    venv = _venv_dir()
    python = venv / "bin" / "python"
    if (venv / READY).is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    progress(f"building the onnxruntime-genai venv in {venv}")
    _run([sys.executable, "-m", "venv", venv], "creating the onnxruntime-genai venv")
    pins = _pins()
    # torch first, pinned to this environment's build: a bare requirement could pull a CUDA build
    _run([python, "-m", "pip", "install", "-q", pins[0]], "installing torch in the onnxruntime-genai venv")
    _run([python, "-m", "pip", "install", "-q", *pins[1:]], "installing onnxruntime-genai")
    (venv / READY).write_text(" ".join(pins) + "\n")
    return python


def export_genai(checkpoint: Path, output: Path, python: Path) -> Path:
    """onnxruntime-genai's model builder on a Hugging Face checkpoint: fp32, CPU."""
    import shutil
    import tempfile

    if not (checkpoint / "tokenizer.json").is_file():
        from .runtime.errors import MoerunError

        raise MoerunError(f"{checkpoint}: onnxruntime-genai's builder needs the checkpoint's tokenizer.json")
    shutil.rmtree(output, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="moerun-genai-cache-") as cache:
        _run([python, "-m", "onnxruntime_genai.models.builder", "-i", checkpoint, "-o", output, "-p", "fp32",
              "-e", "cpu", "-c", cache], "onnxruntime-genai's model builder")
    return output


def measure_genai(model_dir: Path, batch: int, length: int, new_tokens: int, threads: int | None,
                  python: Path) -> dict:
    """One measurement in the genai venv: the same fields as moerun's workers."""
    stdout = _run([python, Path(__file__).resolve(), model_dir, batch, length, new_tokens, threads or 0], "bench genai")
    return json.loads(stdout.strip().splitlines()[-1])


# --- the worker (runs in the genai venv) -----------------------------------------------------------

def _peak_rss_mb() -> float:
    """VmHWM, as runtime.memory.peak_rss_mb (not importable here: moerun is not installed in this venv).
    ru_maxrss would report the parent's peak: it survives fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker(model_dir: str, batch: int, length: int, new_tokens: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    # no EOS: every row runs to the end without forbidding any token (min_length would forbid EOS)
    overlay = {"model": {"eos_token_id": []}}
    if threads:
        overlay["model"]["decoder"] = {"session_options": {"intra_op_num_threads": threads}}
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    genai_config = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]
    vocab = genai_config["vocab_size"]
    # its sliding-window KV cache must hold a whole window; the loop below stops after `steps` anyway
    window = genai_config["decoder"].get("sliding_window", {}).get("window_size", 0)
    # the prompts moerun's bench workers use (bench._prompts)
    prompts = np.random.default_rng(0).integers(3, vocab, (batch, length)).astype(np.int32)

    def run(steps: int) -> tuple[float, float, list]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max(length + steps, window), batch_size=batch)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompts)  # the prefill forward
        generator.generate_next_token()  # picks the first token from the prefill's logits
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps - 1):  # each: one decode forward + picking a token
            generator.generate_next_token()
        decode = time.perf_counter() - start
        return prefill, decode, [generator.get_sequence(b)[length:].tolist() for b in range(batch)]

    run(2)  # warm-up
    prefill, decode, tokens = run(new_tokens)
    return {"prefill_tok_s": batch * length / prefill, "decode_tok_s": batch * (new_tokens - 1) / decode,
            "ttft_ms": prefill * 1000, "peak_rss_mb": _peak_rss_mb(), "tokens": tokens}


if __name__ == "__main__":
    directory, *numbers = sys.argv[1:]
    print(json.dumps(_worker(directory, *(int(n) for n in numbers))))
