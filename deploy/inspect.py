"""What a moerun model directory holds and which ONNX Runtime hosts can run it: a pure function of the directory.

Reads the graphs without their weights (``onnx.load(..., load_external_data=False)``): inspecting a 100 GB model
reads a few MB. The EP and version verdicts come from what is measured and recorded in docs/design.md and
/work/shared/DESIGN.md; what is not measured is labelled "unverified", never guessed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from ..runtime import Manifest
from ..runtime.errors import ModelDirError
from ..runtime.placement import ops_without_cuda_kernel

__all__ = ["STANDARD_DOMAINS", "GraphReport", "Inspection", "MoENodeReport", "TensorReport", "inspect_model"]

# ONNX Runtime runs these domains; any other needs a custom-op library the host must load (--strict refuses it).
STANDARD_DOMAINS = ("ai.onnx", "com.microsoft")

# First ONNX Runtime release implementing an ai.onnx opset / reading an IR version (ONNX Runtime's published
# compatibility table, onnxruntime.ai/docs/reference/compatibility.html). Versions above the table: unknown.
_OPSET_ORT = {17: "1.13", 18: "1.14", 19: "1.15", 20: "1.17", 21: "1.18"}
_IR_ORT = {8: "1.13", 9: "1.15", 10: "1.18"}

# Contrib-op attributes and the first ONNX Runtime that accepts them, measured on moerun's exports (DESIGN.md,
# "Foreign hosts, measured": older releases refuse the graph at load).
_ATTRIBUTE_ORT = (
    ("MoE", "activation_beta", "1.23"),
    ("QMoE", "activation_beta", "1.23"),
    ("QMoE", "weights_prepacked", "1.28"),
    ("QMoE", "block_size", "1.31"),
    ("QMoE", "accuracy_level", "1.31"),
)

_MOE_OPS = ("MoE", "QMoE")
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16:
           "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.UINT8:
           "uint8", onnx.TensorProto.BOOL: "bool"}
# onnxruntime-node on npm (the newest release there when measured; DESIGN.md)
NODE_NPM_ORT = "1.30"


@dataclass
class TensorReport:
    name: str
    dtype: str
    dims: list  # ints, and names of dynamic dims (str)


@dataclass
class MoENodeReport:
    graph: str
    name: str
    op_type: str
    experts: int | None
    k: int
    activation: str
    bits: int | None  # QMoE only
    block_size: int | None  # QMoE only; 0: one scale per row
    attributes: dict


@dataclass
class GraphReport:
    file: str
    bytes: int  # the graph file and its external data
    ir_version: int
    opsets: dict[str, int]
    inputs: list[TensorReport]
    outputs: list[TensorReport]
    ops: dict[str, dict[str, int]]  # domain -> op type -> count
    moe_nodes: list[MoENodeReport]


@dataclass
class Inspection:
    model_dir: str
    architecture: str
    kind: str
    dtype: str
    attention: str  # "gqa: GroupQueryAttention xN" or "traced (position_ids input)"
    quantization: str
    graphs: list[GraphReport]
    total_bytes: int
    foreign_ops: list[str]  # "domain.Op": outside STANDARD_DOMAINS
    onnx_runtime_only_ops: list[str]  # ops in the ai.onnx domain that are not ONNX standard ops (ORT's own)
    min_onnxruntime: str
    min_onnxruntime_basis: list[str]  # why: each requirement and where its version comes from
    execution_providers: dict[str, str]
    deploy_targets: dict[str, str]  # genai, triton, tokenizer, node -> "ready: ..." or "no: why"
    notes: list[str] = field(default_factory=list)

    @property
    def strict_ok(self) -> bool:
        return not self.foreign_ops

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _tensor(value: onnx.ValueInfoProto) -> TensorReport:
    t = value.type.tensor_type
    dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
    return TensorReport(value.name, _DTYPES.get(t.elem_type, onnx.TensorProto.DataType.Name(t.elem_type).lower()),
                        dims)


def _attributes(node: onnx.NodeProto) -> dict:
    values = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        values[a.name] = v.decode() if isinstance(v, bytes) else v
    return values


def _moe_node(graph_file: str, node: onnx.NodeProto, shapes: dict[str, list[int]]) -> MoENodeReport:
    attrs = _attributes(node)
    fc1 = node.input[2] if len(node.input) > 2 else ""  # input, router_probs, fc1_experts_weights, ...
    experts = shapes[fc1][0] if fc1 in shapes and shapes[fc1] else None
    quantized = node.op_type == "QMoE"
    return MoENodeReport(graph_file, node.name, node.op_type, experts, int(attrs.get("k", 1)),
                         str(attrs.get("activation_type", "relu")),
                         int(attrs.get("expert_weight_bits", 4)) if quantized else None,
                         int(attrs.get("block_size", 0)) if quantized else None, attrs)


def _graph(directory: Path, name: str) -> tuple[GraphReport, onnx.ModelProto]:
    path = directory / name
    if not path.is_file():
        raise ModelDirError(f"{directory}: moerun.json names {name}, which is missing; re-convert the checkpoint")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise ModelDirError(f"{path}: not a readable ONNX file ({type(e).__name__}); re-convert the checkpoint") \
            from None
    data_files = {t.external_data[i].value for t in model.graph.initializer for i in range(len(t.external_data))
                  if t.external_data[i].key == "location"}
    size = path.stat().st_size + sum((directory / f).stat().st_size for f in data_files if (directory / f).is_file())
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    ops: dict[str, Counter] = {}
    moe = []
    for node in model.graph.node:
        ops.setdefault(node.domain or "ai.onnx", Counter())[node.op_type] += 1
        if node.op_type in _MOE_OPS and node.domain == "com.microsoft":
            moe.append(_moe_node(name, node, shapes))
    return GraphReport(
        file=name, bytes=size, ir_version=model.ir_version,
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        inputs=[_tensor(v) for v in model.graph.input], outputs=[_tensor(v) for v in model.graph.output],
        ops={d: dict(c.most_common()) for d, c in sorted(ops.items())}, moe_nodes=moe,
    ), model


def _min_onnxruntime(graphs: list[GraphReport]) -> tuple[str, list[str]]:
    """The newest of the versions each requirement needs: IR version, ai.onnx opset, measured contrib attributes."""
    needs: list[tuple[str, str]] = []
    ir = max(g.ir_version for g in graphs)
    opset = max(g.opsets.get("ai.onnx", 0) for g in graphs)
    for what, table, value in (("IR", _IR_ORT, ir), ("opset", _OPSET_ORT, opset)):
        known = [v for k, v in table.items() if k >= value]
        needs.append((min(known, key=_version_key) if known else "unknown",
                      f"{what} {value} (ONNX Runtime's compatibility table)"))
    seen = set()
    for g in graphs:
        for node in g.moe_nodes:
            for op, attribute, version in _ATTRIBUTE_ORT:
                if node.op_type == op and attribute in node.attributes and (op, attribute) not in seen:
                    if attribute == "block_size" and not node.attributes[attribute]:
                        continue  # block_size 0: per-row scales, as weights_prepacked's release reads them
                    seen.add((op, attribute))
                    needs.append((version, f"{op}.{attribute} (measured)"))
    if any(v == "unknown" for v, _ in needs):
        return "unknown", [why for _, why in needs]
    version = max((v for v, _ in needs), key=_version_key)
    return version, [f"{why.replace(' (', f' -> {v} (', 1)}" for v, why in needs]


def _execution_providers(manifest: Manifest, foreign: list[str]) -> dict[str, str]:
    if foreign:
        return {"CPU": f"no: ops outside ONNX Runtime's domains ({', '.join(foreign)})"}
    half_only = ops_without_cuda_kernel(manifest)  # the runtime's own placement rule (ONNX Runtime 1.31)
    eps = {}
    if manifest.dtype == "fp32":
        eps["CPU"] = "yes: every op has a CPU kernel at fp32 (tested: moerun's test suite runs on the CPU EP)"
    else:
        eps["CPU"] = "unverified: fp16 activations on the CPU EP are not tested (the fp16 export is for CUDA)"
    if half_only:
        eps["CUDA"] = (f"needs fp16: the CUDA kernels of {', '.join(half_only)} are fp16/bf16 only (ONNX Runtime "
                       "1.31), so an fp32 graph runs them on the CPU; convert with --dtype fp16")
    else:
        eps["CUDA"] = ("unverified: kernels are registered at this dtype, but no GPU run is recorded "
                       "(scripts/check_cuda.py)")
    eps["others"] = "unverified (TensorRT, DirectML, WebGPU, CoreML: not measured)"
    return eps


def _tokenizer_target(directory: Path) -> str:
    from .tokenizer_onnx import tokenizer_problem

    problem = tokenizer_problem(directory)
    return f"no: {problem}" if problem else "ready: moerun deploy tokenizer (onnxruntime-extensions)"


def _deploy_targets(directory: Path, manifest: Manifest, min_ort: str, foreign: list[str]) -> dict[str, str]:
    from .genai import genai_problem

    targets = {}
    problem = genai_problem(manifest)
    targets["genai"] = f"no: {problem}" if problem else "ready: moerun deploy genai (onnxruntime-genai)"
    triton = "foreign ops" if foreign else "layers with recurrent state (not written yet)" if manifest.states else None
    targets["triton"] = f"no: {triton}" if triton else "ready: moerun deploy triton (onnxruntime backend)"
    targets["tokenizer"] = _tokenizer_target(directory)
    if min_ort != "unknown" and _version_key(min_ort) > _version_key(NODE_NPM_ORT):
        targets["node"] = (f"no: needs ONNX Runtime {min_ort}, onnxruntime-node on npm is {NODE_NPM_ORT}; "
                                       "quantize with --block-size 0 --accuracy-level 0 for it")
    else:
        targets["node"] = f"ready: onnxruntime-node {min_ort} or newer"
    return targets


def inspect_model(model_dir: str | Path) -> Inspection:
    """Everything ``moerun inspect`` reports about MODEL_DIR, as data (the CLI renders it or prints its JSON)."""
    directory = Path(model_dir)
    manifest = Manifest.load(directory)
    graphs = [_graph(directory, name)[0] for name in manifest.graphs()]
    foreign = sorted({f"{d}.{op}" for g in graphs for d, counts in g.ops.items() if d not in STANDARD_DOMAINS
                      for op in counts})
    ort_only = sorted({op for g in graphs for op in g.ops.get("ai.onnx", {}) if not onnx.defs.has(op)})
    gqa = sum(g.ops.get("com.microsoft", {}).get("GroupQueryAttention", 0) for g in graphs)
    attention = (f"gqa: GroupQueryAttention x{gqa}, right-padded batches, no position_ids" if manifest.fused_attention
                 else "traced: the family's attention as exported ops, left-padded batches, position_ids input")
    if manifest.is_seq2seq:
        attention = "encoder-decoder: self- and cross-attention as exported ops"
    q = manifest.quantization or {}
    quantization = (f"experts int{q.get('bits')} (QMoE), block {q.get('block_size')}" if q else "none (MoE)")
    min_ort, basis = _min_onnxruntime(graphs)
    notes = []
    if ort_only:
        notes.append(f"{', '.join(ort_only)}: ONNX Runtime ops registered in the ai.onnx domain, not ONNX standard "
                     "ops; other ONNX runtimes will not run them")
    return Inspection(
        model_dir=str(directory), architecture=manifest.architecture, kind=manifest.kind, dtype=manifest.dtype,
        attention=attention, quantization=quantization, graphs=graphs, total_bytes=sum(g.bytes for g in graphs),
        foreign_ops=foreign, onnx_runtime_only_ops=ort_only, min_onnxruntime=min_ort, min_onnxruntime_basis=basis,
        execution_providers=_execution_providers(manifest, foreign),
        deploy_targets=_deploy_targets(directory, manifest, min_ort, foreign), notes=notes,
    )
