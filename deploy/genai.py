"""A directory onnxruntime-genai loads unchanged: the model's graph and weights, ``genai_config.json`` and the
tokenizer files genai reads.

The config follows genai's own contract (its src/config.h: ``model.decoder.inputs/outputs`` name templates,
``search.past_present_share_buffer``), written from the manifest and the graph:
- moerun's decoder graphs already use genai's default names (``input_ids``, ``attention_mask``,
  ``past_key_values.%d.key``, ``present.%d.key``, ``logits``); the config still names them, so a reader sees the
  mapping;
- fused attention (GroupQueryAttention) appends to one preallocated KV buffer bound as past and present:
  ``past_present_share_buffer`` true, as genai's own builder sets for GroupQueryAttention graphs;
- traced attention takes ``position_ids`` and returns present = past + new: the config maps the input and sets
  buffer sharing off;
- hybrid models (layers with fixed-size state beside attention layers' KV cache): genai's hybrid contract is
  ``decoder.layer_types`` plus one name template per state (``past_conv_names``, ``past_recurrent_names`` and their
  ``present_`` outputs) and, for LFM2's convolution layers, ``conv_cache_size`` (the state's width), as genai's own
  LFM2 and Qwen3.5 builders write them; moerun's state names (``past.{i}.conv``, ``past.{i}.recurrent``) are the
  names its builders give them. genai then carries the states across steps itself (measured: its logits equal
  moerun's runtime's at every step). Mamba layers are declared as genai's ``linear_attention`` (also a conv and a
  recurrent state; genai leaves the computation to the graph). genai masks trailing pad tokens only (right
  padding): the graphs take each row's state at its last real token and hold it over padded steps, so batched
  prompts are exact (tests/test_*families.py: right-padded batch vs each prompt alone);
- encoder-decoder models are refused: genai's encoder-decoder contract is Whisper's (audio encoder, its own
  cross-attention names), not moerun's.
Measured (DESIGN.md): genai 0.18 refuses ``model.type`` "mixtral"; "decoder" is its generic decoder-only type.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..runtime import Manifest
from ..runtime.errors import ModelDirError, UnsupportedModelError

__all__ = ["GENAI_CONFIG", "export_genai_dir", "genai_config", "genai_problem"]

GENAI_CONFIG = "genai_config.json"
# What genai reads beside the graph: its tokenizer (onnxruntime-extensions) reads tokenizer.json and
# tokenizer_config.json; the rest are copied so that the directory is still a moerun model directory too.
_TOKENIZER_FILES = ("moerun.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "config.json", "chat_template.jinja", "tokenizer.model")


def genai_problem(manifest: Manifest) -> str | None:
    """Why onnxruntime-genai cannot run this model as it is, or None."""
    if manifest.is_seq2seq:
        return ("onnxruntime-genai's encoder-decoder models follow Whisper's contract (audio encoder and its "
                "cross-attention names); moerun's encoder-decoder graphs do not")
    if manifest.value_head_dim not in (None, manifest.head_dim):
        return "keys and values of different sizes (MLA): genai allocates one head size for both"
    if manifest.states:
        return _state_problem(manifest)
    return None


# moerun's stateful layer kinds -> genai's layer kind, and the states genai carries for it. genai's hybrid runtime
# allocates each state from the graph's input shape, binds it as past and present, and leaves the computation to the
# graph: its "linear_attention" (conv + recurrent state; its own builder writes it for Qwen3.5's Gated DeltaNet) thus
# carries Mamba's conv and SSM states as well. Measured with genai 0.18: LFM2-MoE, Qwen3-Next, Granite-MoE-hybrid
# (Mamba-2) and Jamba (Mamba-1, a 3-D SSM state), fp32 and int4: genai's logits equal moerun's runtime's at every step.
_GENAI_LAYER_KINDS = {"conv": ("conv", {"conv"}), "linear_attention": ("linear_attention", {"conv", "recurrent"}),
                      "mamba": ("linear_attention", {"conv", "recurrent"})}
# genai's name templates for each state, as its builder writes them (inputs, outputs)
_STATE_TEMPLATES = {"conv": ("past_conv_names", "present_conv_names"),
                    "recurrent": ("past_recurrent_names", "present_recurrent_names")}


def _state_problem(manifest: Manifest) -> str | None:
    """Why genai cannot carry this hybrid model's states, or None."""
    for kind, states in manifest.states.items():
        if kind not in _GENAI_LAYER_KINDS:
            return (f"{kind} layers: moerun maps {', '.join(sorted(_GENAI_LAYER_KINDS))} layers onto genai's hybrid "
                    "layer kinds, not these")
        genai_kind, genai_states = _GENAI_LAYER_KINDS[kind]
        if set(states) != genai_states:
            return (f"{kind} layers with states {sorted(states)}: genai's {genai_kind} layers carry "
                    f"{sorted(genai_states)}")
    others = set(manifest.layer_types) - set(manifest.states) - {"full_attention"}
    if others:
        return f"layer kinds {sorted(others)} beside the stateful ones: genai's hybrid models know full_attention only"
    return None


def _hybrid_settings(manifest: Manifest, inputs: dict, outputs: dict) -> dict:
    """genai's hybrid-model decoder settings (each layer's genai kind; LFM2's convolution width) and the state name
    templates added to ``inputs`` / ``outputs``; {} for a model without states."""
    if not manifest.states:
        return {}
    settings: dict = {"layer_types": [_GENAI_LAYER_KINDS[kind][0] if kind in manifest.states else kind
                                      for kind in manifest.layer_types]}
    for states in manifest.states.values():
        for state in states:
            past, present = _STATE_TEMPLATES[state]
            inputs[past], outputs[present] = f"past.%d.{state}", f"present.%d.{state}"
    if "conv" in manifest.states:  # LFM2's convolution width - 1, as genai's LFM2 builder writes it (its Qwen3.5 not)
        settings["conv_cache_size"] = manifest.states["conv"]["conv"][-1]
    return settings


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ModelDirError(f"{path}: not valid JSON; re-convert the checkpoint") from None
    return data if isinstance(data, dict) else {}


def _num_heads(model_dir: Path, manifest: Manifest, config: dict) -> int:
    """Query heads: the GroupQueryAttention nodes' num_heads, else the checkpoint's config.json."""
    import onnx

    if manifest.fused_attention:
        graph = onnx.load(str(model_dir / manifest.model_file), load_external_data=False).graph
        for node in graph.node:
            if node.op_type == "GroupQueryAttention":
                return next(a.i for a in node.attribute if a.name == "num_heads")
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int):
        raise ModelDirError(f"{model_dir}: config.json has no num_attention_heads; re-convert the checkpoint")
    return heads


def _search_defaults(generation: dict, context_length: int, share_buffer: bool) -> dict:
    """genai's search section from the checkpoint's generation_config.json (greedy when it says nothing)."""
    def pick(name, default, kind):
        value = generation.get(name, default)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    return {
        "do_sample": bool(generation.get("do_sample", False)),
        "max_length": context_length,
        "min_length": 0,
        "num_beams": pick("num_beams", 1, int),
        "num_return_sequences": 1,
        "temperature": pick("temperature", 1.0, float),
        "top_k": pick("top_k", 0, int) if generation.get("do_sample") else 0,
        "top_p": pick("top_p", 1.0, float),
        "repetition_penalty": pick("repetition_penalty", 1.0, float),
        "length_penalty": 1.0,
        "early_stopping": True,
        "no_repeat_ngram_size": 0,
        "diversity_penalty": 0.0,
        "past_present_share_buffer": share_buffer,
    }


def genai_config(model_dir: str | Path) -> dict:
    """genai_config.json for the model in ``model_dir`` (refused in one line when genai cannot run it)."""
    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    if problem := genai_problem(manifest):
        raise UnsupportedModelError(f"{model_dir}: onnxruntime-genai cannot run this model: {problem}")
    config = _read(model_dir / "config.json")
    context = manifest.max_positions or config.get("max_position_embeddings")
    if not isinstance(context, int):
        raise ModelDirError(f"{model_dir}: the model's maximum positions are unknown (no max_positions in moerun.json, "
                            "no max_position_embeddings in config.json); genai needs a context_length")
    eos = manifest.eos_token_id
    # genai tells padding from tokens by this id: it must be the id the prompts are really padded with
    pad = manifest.pad_token_id if manifest.pad_token_id is not None else (eos[0] if eos else 0)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if "position_ids" in manifest.inputs:
        inputs["position_ids"] = "position_ids"
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    hybrid = _hybrid_settings(manifest, inputs, outputs)
    decoder = {
        "filename": manifest.model_file,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "hidden_size": manifest.hidden_size,
        "num_attention_heads": _num_heads(model_dir, manifest, config),
        "num_key_value_heads": manifest.num_kv_heads,
        "num_hidden_layers": manifest.num_layers,
        "head_size": manifest.head_dim,
        "inputs": inputs,
        "outputs": outputs,
        **hybrid,
    }
    model = {"type": "decoder", "vocab_size": manifest.vocab_size, "context_length": context,
             "bos_token_id": manifest.bos_token_id if manifest.bos_token_id is not None else pad,
             "eos_token_id": eos if len(eos) != 1 else eos[0], "pad_token_id": pad, "decoder": decoder}
    generation = _read(model_dir / "generation_config.json")
    return {"model": model, "search": _search_defaults(generation, context, manifest.fused_attention)}


def _copy(source: Path, target: Path) -> None:
    # A copy, not a hard link: onnx refuses external data whose file has more than one link (its hard-link-attack
    # check, measured with onnx 1.2x), so a link would break onnx.load of both the source and the deployed model.
    shutil.copy2(source, target)


def _genai_tokenizer_config(model_dir: Path, staging: Path) -> None:
    """tokenizer_config.json with a tokenizer_class genai's tokenizer (onnxruntime-extensions) knows: it refuses
    transformers 5's ``TokenizersBackend`` (measured), and reads byte-level BPE as GPT2Tokenizer."""
    from .tokenizer_onnx import extensions_class

    path = staging / "tokenizer_config.json"
    if not path.is_file():
        return
    class_name, _ = extensions_class(model_dir)
    data = _read(path)
    if class_name and data.get("tokenizer_class") != class_name:
        data["tokenizer_class"] = class_name
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_genai_dir(model_dir: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """OUTPUT: the graph (+ its external data, copied), genai_config.json and the tokenizer files."""
    from ..converter.output import check_output, staged_directory

    model_dir, output = Path(model_dir), Path(output)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: no such model directory")
    check_output(output, overwrite, source=model_dir)
    config = genai_config(model_dir)  # refuses before anything is written
    manifest = Manifest.load(model_dir)
    with staged_directory(output, overwrite) as staging:
        for path in sorted(model_dir.glob(f"{manifest.model_file}*")):  # model.onnx, model.onnx.data
            _copy(path, staging / path.name)
        for name in _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        _genai_tokenizer_config(model_dir, staging)
        (staging / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return output
