"""One MoE layer, side by side: Hugging Face eager vs com.microsoft.MoE vs QMoE variants (CPU EP).

Prints milliseconds per call (median of interleaved repeats, min..max) and the speed-up over
Hugging Face eager, plus each variant's output error relative to the fp32 layer, so the cost of
accuracy_level=4 (int8 activations) can be read against its speed.

    python scripts/bench_moe_layer.py [--tokens 1,64,512] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moerun.converter.architectures.base import interleave_gate_up
from moerun.converter.passes import QuantizeExperts
from moerun.custom_ops import DOMAIN, MoEAttributes
from moerun.custom_ops.quantize import QuantSpec

VARIANTS = {
    "MoE fp32": None,
    "QMoE int8 per-row": (QuantSpec(8, 0, True, "rtn"), None),
    "QMoE int8 block 64": (QuantSpec(8, 64, True, "rtn"), None),
    "QMoE int4 per-row": (QuantSpec(4, 0, True, "rtn"), None),
    "QMoE int4 block 64": (QuantSpec(4, 64, True, "rtn"), None),
    "QMoE int4 block 128": (QuantSpec(4, 128, True, "rtn"), None),
    "QMoE int4 block 128, accuracy_level=4": (QuantSpec(4, 128, True, "rtn"), 4),
}


def layer_model(block: MixtralSparseMoeBlock, k: int) -> ir.Model:
    fc1 = interleave_gate_up(block.experts.gate_up_proj).detach().numpy()
    fc2 = block.experts.down_proj.detach().numpy()
    router = block.gate.weight.detach().numpy().T.copy()
    hidden, experts = fc1.shape[2], fc1.shape[0]
    attrs = MoEAttributes(k=k, activation_type="swiglu", normalize_routing_weights=1, swiglu_fusion=1)
    nodes = [helper.make_node("MatMul", ["x", "router_w"], ["logits"]),
             helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain=DOMAIN, **attrs.to_onnx())]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.tobytes(), raw=True)
             for n, a in (("router_w", router), ("fc1", fc1), ("fc2", fc2))]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", hidden])],
                              initializer=inits)
    del experts
    return ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(DOMAIN, 1)], ir_version=10))


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--tokens", default="1,64,512")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_local_experts=args.experts, num_experts_per_tok=args.k)
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {}
    for name, quant in VARIANTS.items():
        model = layer_model(block, args.k)
        if quant:
            QuantizeExperts(*quant)(model)
        data = ir.serde.serialize_model(model).SerializeToString()
        sessions[name] = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    results = []
    for t in [int(x) for x in args.tokens.split(",")]:
        x = torch.randn(1, t, args.hidden, generator=torch.Generator().manual_seed(t))
        xn = x[0].numpy()
        reference = sessions["MoE fp32"].run(None, {"x": xn})[0]
        times: dict[str, list[float]] = {"Hugging Face eager": [], **{n: [] for n in sessions}}
        calls = {"Hugging Face eager": lambda x=x: block(x)} | {n: (lambda s=s, xn=xn: s.run(None, {"x": xn}))
                                                             for n, s in sessions.items()}
        with torch.no_grad():
            for _ in range(args.repeats):  # interleaved: every variant once per round
                for name, fn in calls.items():
                    times[name] += timed(fn, 1)
        hf = statistics.median(times["Hugging Face eager"])
        for name, ts in times.items():
            err = None
            if name in sessions:
                y = sessions[name].run(None, {"x": xn})[0]
                err = float(np.abs(y - reference).max() / np.abs(reference).max())
            results.append({"tokens": t, "variant": name, "median_ms": statistics.median(ts), "min_ms": min(ts),
                            "max_ms": max(ts), "speedup_vs_hf": hf / statistics.median(ts), "rel_error": err})

    print(f"one MoE layer: H={args.hidden} I={args.intermediate} E={args.experts} top-{args.k}, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs\n")
    print("| variant | tokens | ms (min..max) | speed-up vs HF eager | max rel. error vs fp32 layer |")
    print("|---|---|---|---|---|")
    for r in results:
        err = "" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        print(f"| {r['variant']} | {r['tokens']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}..{r['max_ms']:.2f}) | "
              f"{r['speedup_vs_hf']:.1f}x | {err} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
