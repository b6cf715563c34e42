"""A Triton Inference Server model repository for a moerun model: ``NAME/config.pbtxt`` and ``NAME/1/model.onnx`` (+
its external data), served by Triton's ONNX Runtime backend (platform ``onnxruntime_onnx``).

The config is built with Triton's own model-config protobuf (``tritonclient.grpc.model_config_pb2``) and written in
protobuf text format, so every field is one Triton's schema has. Dims come from the graph (-1 where dynamic).

- A decoder with a KV cache is stateful, which Triton serves with the sequence batcher and implicit state (Triton's
  "Implicit State Management"): each ``past_*`` input is the state whose next value is the matching ``present_*``
  output, kept by Triton between the requests of one sequence (correlation id); clients send only the tokens and
  the attention mask. Triton starts a sequence's state from ``initial_state`` (zeros):
  - fused attention (GroupQueryAttention): one preallocated buffer of ``max_length`` positions, as moerun's own
    generation binds it; the kernel reads the valid length from the attention mask (ones over the prompt and the
    tokens so far) and writes the new keys/values in place, so present has the buffer's shape again;
  - traced attention: a past of length 1 (Triton fixes a state's variable dims to 1 at the start), which the
    client's attention_mask hides with a leading 0; present = past + new.
  One sequence per execution (``max_batch_size`` 1): KV caches of different lengths cannot share a batch tensor;
  instances give concurrency.
- Graphs without a KV cache (the encoder of an encoder-decoder model) get dynamic batching.
- An encoder-decoder's decoder has no self-attention mask to hide Triton's initial slot, so it is written stateless
  (the client sends its caches, ``max_batch_size`` 0).

Untested against a running Triton server (none here): tests/test_deploy.py parses the config with Triton's protobuf,
checks it against the ONNX file's real inputs and outputs, and runs the implicit-state protocol (the initial zero
state, present fed back as past) with ONNX Runtime against moerun's own generation.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx

from ..runtime import Manifest
from ..runtime.errors import ModelDirError, MoerunError

__all__ = ["DEFAULT_MAX_LENGTH", "INSTANCE_COUNT", "MAX_BATCH", "build_configs", "export_triton", "state_pairs"]

MAX_BATCH = 8  # dynamic batching's largest batch for stateless graphs
INSTANCE_COUNT = 1
SEQUENCE_IDLE_US = 60_000_000  # a sequence unused for a minute is released with its KV state
MAX_CANDIDATE_SEQUENCES = 64  # sequences one instance interleaves (one per execution)
DEFAULT_MAX_LENGTH = 4096  # fused attention's KV buffer per sequence: prompt + new tokens

_TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                 onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.INT64: "TYPE_INT64",
                 onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.BOOL: "TYPE_BOOL",
                 onnx.TensorProto.UINT8: "TYPE_UINT8"}


def _pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MoerunError("moerun deploy triton needs Triton's model-config protobuf: pip install 'moerun[deploy]' "
                          "(tritonclient)") from None
    return model_config_pb2


def state_pairs(inputs: list[str], outputs: list[str]) -> list[tuple[str, str]]:
    """(past input, present output) pairs: moerun's ``past_key_values.{i}.key`` -> ``present.{i}.key`` and
    ``past_{x}`` -> ``present_{x}`` (encoder-decoder self-attention); a past without a present is an ordinary input."""
    present = set(outputs)
    pairs = []
    for name in inputs:
        match = re.fullmatch(r"past_key_values\.(\d+)\.(key|value)", name)
        candidate = f"present.{match[1]}.{match[2]}" if match else (f"present_{name[5:]}" if name.startswith("past_")
                                                                     else None)
        if candidate in present:
            pairs.append((name, candidate))
    return pairs


def _dims(value: onnx.ValueInfoProto, drop_batch: bool) -> list[int]:
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
    return dims[1:] if drop_batch else dims


def _type(value: onnx.ValueInfoProto, path: Path) -> str:
    elem = value.type.tensor_type.elem_type
    if elem not in _TRITON_TYPES:
        raise MoerunError(f"{path}: {value.name} has ONNX type {onnx.TensorProto.DataType.Name(elem)}, which the "
                          "Triton config writer does not map")
    return _TRITON_TYPES[elem]


def _graph_config(pb2, name: str, path: Path, graph: onnx.GraphProto, stateful: bool, threads: int | None,
                  static_length: int | None = None):
    """One Triton model; ``static_length``: the fused-attention KV buffer's positions (None: a growing past)."""
    inputs, outputs = list(graph.input), list(graph.output)
    pairs = state_pairs([v.name for v in inputs], [v.name for v in outputs]) if stateful else []
    state_in, state_out = {p for p, _ in pairs}, {p for _, p in pairs}
    has_cache = any(v.name.startswith("past_") for v in inputs)
    batching = stateful or not has_cache  # stateless decoders with explicit caches: no batch dim handling
    config = pb2.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=(1 if stateful else MAX_BATCH)
                             if batching else 0)
    initializers = {t.name for t in graph.initializer}  # inputs with a default (logits_position): optional
    for value in inputs:
        if value.name not in state_in:
            config.input.add(name=value.name, data_type=_type(value, path), dims=_dims(value, batching),
                             optional=value.name in initializers)
    for value in outputs:
        if value.name not in state_out:
            config.output.add(name=value.name, data_type=_type(value, path), dims=_dims(value, batching))
    by_name = {v.name: v for v in inputs}
    if stateful:
        seq = config.sequence_batching
        seq.max_sequence_idle_microseconds = SEQUENCE_IDLE_US
        seq.oldest.max_candidate_sequences = MAX_CANDIDATE_SEQUENCES
        seq.oldest.preferred_batch_size.append(1)
        for past, present in pairs:
            value = by_name[past]
            dims = _dims(value, drop_batch=True)
            if static_length:
                dims = [static_length if d == -1 else d for d in dims]  # [kv_heads, positions, head_size]
            state = seq.state.add(input_name=past, output_name=present, data_type=_type(value, path), dims=dims)
            state.initial_state.add(data_type=state.data_type, dims=[1 if d == -1 else d for d in dims],
                                    zero_data=True, name="empty KV cache")
    elif batching:
        config.dynamic_batching.SetInParent()
    config.instance_group.add(count=INSTANCE_COUNT, kind=pb2.ModelInstanceGroup.KIND_GPU)
    # the CUDA EP's settings as the onnxruntime backend takes them (its README: "CUDA Execution Provider
    # optimization"): one CUDA stream per session for compute and copies
    cuda = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="cuda")
    cuda.parameters["use_ep_level_unified_stream"] = "1"
    if threads:
        config.parameters["intra_op_thread_count"].string_value = str(threads)
    return config


def _name(model_dir: Path, name: str | None) -> str:
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", model_dir.resolve().name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise MoerunError(f"--name {name!r}: a Triton model name is letters, digits, '_', '-' and '.'")
    return name


def build_configs(model_dir: str | Path, name: str | None = None, threads: int | None = None,
                  max_length: int | None = None) -> dict:
    """{Triton model name: (ModelConfig, ONNX file in model_dir)} for each graph of the model. ``max_length``: the
    positions of a fused-attention model's KV buffer (default: the model's maximum, at most DEFAULT_MAX_LENGTH)."""
    pb2 = _pb2()
    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    if manifest.states:  # their past.{i}.conv / present.{i}.conv would need implicit state too: not built, not tested
        raise MoerunError(f"{model_dir}: layers with recurrent state ({', '.join(manifest.states)}) are not served by "
                          "moerun's Triton configs yet")
    static_length = None
    if manifest.fused_attention:
        static_length = max_length or min(manifest.max_positions or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        if manifest.max_positions and static_length > manifest.max_positions:
            raise MoerunError(f"--max-length {static_length} is over the model's {manifest.max_positions} positions")
    base = _name(model_dir, name)
    configs = {}
    for graph_file in manifest.graphs():
        path = model_dir / graph_file
        if not path.is_file():
            raise ModelDirError(f"{model_dir}: {graph_file} is missing; re-convert the checkpoint")
        graph = onnx.load(str(path), load_external_data=False).graph
        triton_name = base if not manifest.is_seq2seq else f"{base}_{Path(graph_file).stem}"
        stateful = not manifest.is_seq2seq  # see the module docstring: the seq2seq decoder has no self mask
        configs[triton_name] = (_graph_config(pb2, triton_name, path, graph, stateful, threads, static_length),
                                graph_file)
    return configs


def _copy(source: Path, target: Path) -> None:
    # A copy, not a hard link: onnx refuses external data whose file has more than one link (its hard-link-attack
    # check, measured with onnx 1.2x), so a link would break onnx.load of both the source and the deployed model.
    shutil.copy2(source, target)


def export_triton(model_dir: str | Path, output: str | Path, name: str | None = None, overwrite: bool = False,
                  threads: int | None = None, max_length: int | None = None) -> Path:
    """Write the repository OUTPUT: NAME/config.pbtxt, NAME/1/model.onnx and its external data, per graph."""
    from google.protobuf import text_format

    from ..converter.output import check_output, staged_directory

    model_dir, output = Path(model_dir), Path(output)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: no such model directory")
    check_output(output, overwrite, source=model_dir)
    configs = build_configs(model_dir, name, threads, max_length)  # refuses before anything is written
    with staged_directory(output, overwrite) as staging:
        for triton_name, (config, graph_file) in configs.items():
            version = staging / triton_name / "1"
            version.mkdir(parents=True)
            (staging / triton_name / "config.pbtxt").write_text(text_format.MessageToString(config))
            # model.onnx is the backend's default file name; its external data keeps the name the graph records
            _copy(model_dir / graph_file, version / "model.onnx")
            for data in _external_files(model_dir / graph_file):
                _copy(model_dir / data, version / data)
    return output


def _external_files(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
