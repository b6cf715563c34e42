"""The model's tokenizer and detokenizer as ONNX graphs (onnxruntime-extensions' ``gen_processing_models``), so that
a host with ONNX Runtime and the extensions library goes from strings to strings with no Python tokenizer.

What extensions 0.15 can express, and what moerun writes:
- byte-level BPE (GPT-2, Mixtral-style tokenizer.json with ByteLevel pre-tokenizer and decoder): its
  ``GPT2Tokenizer`` op; the graph's ids are the model's ids without the template's special tokens (the host
  prepends BOS, as onnxruntime-genai's ``Tokenizer.encode`` leaves it to the caller);
- a SentencePiece model file with T5's template (``T5Tokenizer``: pieces, then ``</s>``): its
  ``SentencepieceTokenizer`` op runs the SentencePiece model itself, and appends ``</s>`` as T5 does.
Everything else is refused with the reason (``tokenizer_problem``).

transformers is needed here (deploy time) to read the tokenizer the way extensions' converter expects; the
graphs it writes need none of it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from ..runtime.errors import ModelDirError, MoerunError, UnsupportedModelError

__all__ = ["SPM_FILES", "TOKENIZER_FILES", "export_tokenizer", "extensions_class", "tokenizer_problem"]

log = logging.getLogger(__name__)

SPM_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
TOKENIZER_FILES = ("tokenizer.onnx", "detokenizer.onnx")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path}: not readable JSON ({e}); save the model's tokenizer again") from None
    return data if isinstance(data, dict) else {}


def _types(component) -> set[str]:
    """The component's type, and those of a Sequence's members."""
    if not isinstance(component, dict):
        return set()
    nested = component.get("pretokenizers") or component.get("decoders") or []
    return {component.get("type")} | {t for c in nested for t in _types(c)}


def extensions_class(directory: Path) -> tuple[str | None, str | None]:
    """(the transformers class name extensions' converter takes for this tokenizer, None) or (None, why not)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        return None, "no tokenizer.json in the model directory"
    spec = _read_json(directory / "tokenizer.json")
    config = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    declared = str(config.get("tokenizer_class", ""))
    model = (spec.get("model") or {}).get("type")
    if declared.startswith("Nllb"):
        return None, ("NLLB's tokenizer puts a language code before each sentence and shifts SentencePiece ids by "
                      "fairseq's offset; onnxruntime-extensions' ops express neither")
    byte_level = "ByteLevel" in _types(spec.get("pre_tokenizer")) and "ByteLevel" in _types(spec.get("decoder"))
    if model == "BPE" and byte_level:
        return "GPT2Tokenizer", None
    spm = [name for name in SPM_FILES if (directory / name).is_file()]
    if spm and declared.startswith("T5"):
        return "T5Tokenizer", None
    if "Metaspace" in _types(spec.get("pre_tokenizer")):
        return None, ("SentencePiece-style tokenizer without its SentencePiece model file and T5's template: "
                      "extensions' tokenizer.json reader differs from Hugging Face on leading whitespace and digits "
                      "(measured: 12 of 50 sentences)")
    return None, f"a {model} tokenizer ({declared or 'no tokenizer_class'}): onnxruntime-extensions has no op for it"


def tokenizer_problem(directory: Path) -> str | None:
    return extensions_class(directory)[1]


def _legacy_copy(directory: Path, staging: Path) -> Path:
    """The tokenizer files with BPE merges as "a b" strings: extensions 0.15 reads only that form of tokenizer.json
    (tokenizers >= 0.20 saves merges as pairs). Byte-level BPE tokens hold no spaces, so the two forms are one."""
    legacy = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=staging))
    spec = _read_json(directory / "tokenizer.json")
    merges = spec.get("model", {}).get("merges", [])
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (legacy / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (directory / name).is_file():
            shutil.copy2(directory / name, legacy / name)
    return legacy


def _hf_tokenizer(directory: Path, class_name: str, staging: Path):
    import transformers

    if class_name == "GPT2Tokenizer":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        tok = transformers.GPT2Tokenizer.from_pretrained(_legacy_copy(directory, staging))
        # What extensions' converter reads from transformers 4's classes, which transformers 5's lack: the name of
        # the tokenizer.json file and the byte-level alphabet's inverse (GPT-2's bytes_to_unicode table).
        tok.vocab_files_names = {**tok.vocab_files_names, "tokenizer_file": "tokenizer.json"}
        tok.byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}
        return tok
    spm = next(directory / name for name in SPM_FILES if (directory / name).is_file())
    tok = transformers.T5Tokenizer.from_pretrained(directory)
    tok.vocab_file = str(spm)  # the SentencePiece model the op embeds
    return tok


def build_tokenizer_graphs(model_dir: Path, scratch: Path):
    """(tokenizer, detokenizer) ONNX ModelProtos for the tokenizer in ``model_dir``; ``scratch``: a temp dir."""
    from onnxruntime_extensions import gen_processing_models

    class_name, problem = extensions_class(model_dir)
    if problem:
        raise UnsupportedModelError(f"{model_dir}: cannot express the tokenizer with onnxruntime-extensions: {problem}")
    tok = _hf_tokenizer(Path(model_dir), class_name, scratch)
    try:
        return gen_processing_models(tok, pre_kwargs={}, post_kwargs={})
    except Exception as e:  # the converter's own errors are ValueError/KeyError/AttributeError on odd inputs
        raise MoerunError(f"{model_dir}: onnxruntime-extensions could not convert the tokenizer ({e})") from None


def export_tokenizer(model_dir: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write OUTPUT/tokenizer.onnx (strings -> input_ids, attention_mask) and OUTPUT/detokenizer.onnx (ids -> str)."""
    import onnx

    from ..converter.output import check_output, staged_directory

    model_dir, output = Path(model_dir), Path(output)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: no such model directory")
    check_output(output, overwrite, source=model_dir)
    with staged_directory(output, overwrite) as staging:
        pre, post = build_tokenizer_graphs(model_dir, staging)
        for name, graph in zip(TOKENIZER_FILES, (pre, post)):
            onnx.save(graph, str(staging / name))
        for leftover in staging.glob("tokenizer-*"):
            shutil.rmtree(leftover)
    return output
