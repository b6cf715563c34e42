"""llama.cpp as a benchmark baseline: the checkpoint converted to GGUF by the converter script that
llama-cpp-python's sdist ships (vendor/llama.cpp/convert_hf_to_gguf.py), quantized by llama.cpp's own
``llama_model_quantize`` to Q8_0 / Q4_0, and run through llama-cpp-python's low-level API (one
``llama_batch`` holding every sequence), measured exactly as moerun's own variants are.

llama-cpp-python has no CPU wheel on PyPI, only an sdist that builds llama.cpp with cmake; so it lives in
a venv of its own (built on first use, about 10 minutes on 2 cores, with -DGGML_NATIVE=ON: a CPU build for
this machine), beside the converter's Python dependencies (gguf, numpy, sentencepiece, and this
environment's torch and transformers). The unpacked sdist stays in the venv: its converter is not
installed with the wheel.

Run as a script inside that venv, this file is the worker: it imports only llama_cpp, gguf, numpy and
the standard library (and, for ``convert``, the sdist's converter).

    LLAMACPP_PYTHON llamacpp.py convert CHECKPOINT OUT.gguf                 # F32 GGUF
    LLAMACPP_PYTHON llamacpp.py quantize IN.gguf OUT.gguf q8_0|q4_0 THREADS
    LLAMACPP_PYTHON llamacpp.py weights MODEL.gguf EXPERTS_PER_TOKEN        # one JSON line: decode bytes/token
    LLAMACPP_PYTHON llamacpp.py measure MODEL.gguf BATCH PROMPT_LEN NEW_TOKENS THREADS   # one JSON line
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

LLAMACPP_VERSION = "0.3.36"
GGUF_VERSION = "0.19.0"  # reads GGUF files here; the converter runs with the sdist's newer copy of it
READY = "moerun-ready"  # written last: a venv without it is half-built and is rebuilt
# moerun's exports and the GGUF type each is measured against (llama.cpp's names: file types F32, Q8_0, Q4_0)
PAIRS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0", "int8-dense": "q8_0", "int4-dense": "q4_0"}


def _venv_dir() -> Path:
    default = Path.home() / ".cache" / "moerun" / "llamacpp-venv"
    return Path(os.environ.get("MOERUN_LLAMACPP_VENV", default))


def _sdist_dir(venv: Path) -> Path:
    return venv / "src" / f"llama_cpp_python-{LLAMACPP_VERSION}"


def _run(cmd: list, what: str, env: dict | None = None) -> str:
    from .converter.report import run_worker  # not at the top: the worker below runs where moerun is not installed

    if env is None:
        return run_worker(cmd, what)
    import subprocess

    from .runtime.errors import MoerunError

    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        raise MoerunError(f"{what} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc.stdout


def llamacpp_python(progress=lambda _: None) -> Path:
    """The python of the llama.cpp venv, created on first use (about 10 minutes: llama.cpp compiles)."""
    import shutil
    import tarfile
    from importlib.metadata import version

    venv = _venv_dir()
    python = venv / "bin" / "python"
    if (venv / READY).is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    progress(f"building the llama.cpp venv in {venv}")
    _run([sys.executable, "-m", "venv", venv], "creating the llama.cpp venv")
    # torch first, pinned to this environment's build: a bare requirement could pull a CUDA build
    _run([python, "-m", "pip", "install", "-q", f"torch=={version('torch')}"], "installing torch in the llama.cpp venv")
    deps = [f"gguf=={GGUF_VERSION}", f"numpy=={version('numpy')}", "sentencepiece>=0.1.98,<0.3",
            f"transformers=={version('transformers')}", "safetensors"]
    _run([python, "-m", "pip", "install", "-q", *deps], "installing the GGUF converter's dependencies")
    progress(f"downloading and compiling llama-cpp-python {LLAMACPP_VERSION} (about 10 minutes)")
    src = venv / "src"
    _run([python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", src,
          f"llama-cpp-python=={LLAMACPP_VERSION}"], "downloading the llama-cpp-python sdist")
    with tarfile.open(src / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz") as tar:
        tar.extractall(src, filter="data")
    # a CPU build for this machine's instruction set; without the multimodal library nobody here uses
    _run([python, "-m", "pip", "install", "-q", _sdist_dir(venv)], "building llama-cpp-python",
         env={"CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF"})
    (venv / READY).write_text(f"llama-cpp-python=={LLAMACPP_VERSION} {' '.join(deps)}\n")
    return python


def export_gguf(checkpoint: Path, output: Path, types: list[str], threads: int | None, python: Path) -> dict[str, Path]:
    """The checkpoint as F32 GGUF (llama.cpp's converter) and each of ``types`` ("q8_0", "q4_0") quantized
    from it by llama.cpp's quantizer; {type: file}."""
    output.mkdir(parents=True, exist_ok=True)
    worker = Path(__file__).resolve()
    files = {"f32": output / "model-f32.gguf"}
    # with the sdist's own gguf-py, as the script does by default: it needs gguf.LazyChunkedTensor, which
    # gguf 0.19.0 from PyPI (same version number) lacks
    _run([python, worker, "convert", checkpoint, files["f32"]], "llama.cpp's convert_hf_to_gguf.py")
    for kind in types:
        if kind != "f32":
            files[kind] = output / f"model-{kind}.gguf"
            _run([python, worker, "quantize", files["f32"], files[kind], kind, threads or os.cpu_count()],
                 f"llama.cpp's quantizer ({kind})")
    return files


def decode_bytes_per_token(model: Path, experts_per_token: int, python: Path) -> float:
    """Weight bytes one batch-1 decode step of a GGUF reads, counted as bench.decode_bytes_per_token does."""
    out = _run([python, Path(__file__).resolve(), "weights", model, experts_per_token], "reading the GGUF")
    return json.loads(out.strip().splitlines()[-1])["bytes_per_token"]


def measure_llamacpp(model: Path, batch: int, length: int, new_tokens: int, threads: int | None,
                     python: Path) -> dict:
    """One measurement in the llama.cpp venv: the same fields as moerun's workers.

    OMP_WAIT_POLICY=PASSIVE unless the caller set it: this build's threads are OpenMP's, whose default
    spin-wait at every barrier collapses when another process holds a core (measured on a shared 2-core
    machine: GPT-OSS shape, Q4_0, 2 threads, batch 1 decode 2.1 tok/s spinning, 153 tok/s passive)."""
    stdout = _run([python, Path(__file__).resolve(), "measure", model, batch, length, new_tokens, threads or 0],
                  "bench llama.cpp", env={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    return json.loads(stdout.strip().splitlines()[-1])


# --- the worker (runs in the llama.cpp venv) -------------------------------------------------------

def _peak_rss_mb() -> float:
    """VmHWM, as runtime.memory.peak_rss_mb (not importable here: moerun is not installed in this venv)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _convert(checkpoint: str, out: str) -> None:
    """convert_hf_to_gguf.py from the sdist, unchanged but for the vocabulary of a checkpoint whose tokenizer
    is word-level (the bench checkpoints: bench.word_level_tokenizer). The converter knows only the
    tokenizers of released models and refuses others; such a checkpoint gets the converter's own
    "no vocabulary" writer plus the vocabulary size, which llama.cpp loads as that many placeholder
    tokens. The benchmarks feed token ids, so nothing reads the token strings."""
    sys.path.insert(0, str(Path(sys.prefix) / "src" / f"llama_cpp_python-{LLAMACPP_VERSION}" / "vendor" / "llama.cpp"))
    import convert_hf_to_gguf as converter

    tokenizer = Path(checkpoint) / "tokenizer.json"
    word_level = tokenizer.is_file() and json.loads(tokenizer.read_text())["model"]["type"] == "WordLevel"
    if word_level:
        original = converter.get_model_class

        def get_model_class(name: str, mmproj: bool = False):
            model_class = original(name, mmproj)

            def set_vocab(self) -> None:
                self._set_vocab_none()
                self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

            model_class.set_vocab = set_vocab  # this process converts one checkpoint, then exits
            return model_class

        converter.get_model_class = get_model_class
    sys.argv = ["convert_hf_to_gguf.py", checkpoint, "--outfile", out, "--outtype", "f32"]
    converter.main()


def _quantize(source: str, out: str, kind: str, threads: int) -> None:
    """llama.cpp's quantizer (what its llama-quantize tool calls; the wheel ships the library, not the tool)
    with its default recipe for the file type."""
    import ctypes

    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype = {"q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = threads
    if lc.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {kind}")


def _weights(model: str, experts_per_token: int) -> dict:
    """Decode bytes per token: k/E of the expert tensors (``*_exps``), one row of the token embedding,
    everything else whole (a GGUF's tensor sizes are what llama.cpp holds in memory)."""
    from gguf import GGUFReader

    reader = GGUFReader(model)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    experts = int(reader.fields[f"{arch}.expert_count"].parts[-1][0])
    total, types = 0.0, {}
    for t in reader.tensors:
        size = float(t.n_bytes)
        if "_exps" in t.name:
            size *= experts_per_token / experts
        elif t.name == "token_embd.weight":
            size /= int(t.shape[-1])
        total += size
        types.setdefault(t.tensor_type.name, 0)
        types[t.tensor_type.name] += 1
    return {"bytes_per_token": total, "tensor_types": types}


def _measure(model_path: str, batch: int, length: int, new_tokens: int, threads: int) -> dict:

    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(model_path.encode(), lc.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    threads = threads or os.cpu_count()
    params = lc.llama_context_default_params()
    per_seq = -(-(length + new_tokens) // 256) * 256
    params.n_ctx = batch * per_seq  # each sequence gets n_ctx / n_seq_max
    params.n_batch = params.n_ubatch = batch * length  # the whole prefill in one llama_decode
    params.n_seq_max = batch
    params.n_threads = params.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    # the prompts moerun's bench workers use (bench._prompts)
    prompts = np.random.default_rng(0).integers(3, vocab, (batch, length))
    lb = lc.llama_batch_init(batch * length, 0, batch)

    def fill(tokens: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            lb.token[i], lb.pos[i], lb.n_seq_id[i], lb.logits[i] = token, pos, 1, logits
            lb.seq_id[i][0] = seq
        lb.n_tokens = len(tokens)

    def pick(rows: range) -> list[int]:  # greedy: the argmax of the logits of these llama_batch rows
        return [int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax()) for i in rows]

    def decode() -> None:
        if lc.llama_decode(ctx, lb) != 0:
            raise RuntimeError("llama_decode failed")

    def run(steps: int) -> tuple[float, float, list]:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        fill([(int(prompts[b, p]), p, b, p == length - 1) for b in range(batch) for p in range(length)])
        start = time.perf_counter()
        decode()  # the prefill forward: logits of each sequence's last position only
        tokens = [pick(range(length - 1, batch * length, length))]  # the first token, from the prefill's logits
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(steps - 1):  # each: one decode forward of every sequence + picking a token
            fill([(tokens[-1][b], length + step, b, True) for b in range(batch)])
            decode()
            tokens.append(pick(range(batch)))
        return prefill, time.perf_counter() - start, [list(row) for row in zip(*tokens)]

    run(2)  # warm-up
    prefill, decode_s, tokens = run(new_tokens)
    lc.llama_batch_free(lb)
    return {"prefill_tok_s": batch * length / prefill, "decode_tok_s": batch * (new_tokens - 1) / decode_s,
            "ttft_ms": prefill * 1000, "peak_rss_mb": _peak_rss_mb(), "tokens": tokens}


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "convert":
        _convert(*args)
    elif mode == "quantize":
        _quantize(args[0], args[1], args[2], int(args[3]))
    elif mode == "weights":
        print(json.dumps(_weights(args[0], int(args[1]))))
    else:
        print(json.dumps(_measure(args[0], *(int(n) for n in args[1:]))))
