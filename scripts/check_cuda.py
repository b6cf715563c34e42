"""Check moerun's CUDA path on a machine with a GPU, in one run (a few minutes): the test suite runs on CPU only.

    python scripts/check_cuda.py                   # exit 0: every check passed, or no usable GPU ("skipped")
    python scripts/check_cuda.py --workdir /tmp/cc --keep

It converts small models with the converter (the trained fixture tests/fixtures/tiny-moe as fp16, int4 experts +
fp16, fp16 with traced attention, and fp32 variants; a random tiny NLLB-MoE in fp16), loads them with provider
"cuda" and checks:

- the CUDA execution provider runs the session, and no compute node (MoE, QMoE, attention, MatMul, norms; see
  moerun.runtime.placement.COMPUTE_OPS) was placed on the CPU EP. Placement is ONNX Runtime's own record:
  session config "session.record_ep_graph_assignment_info" = "1", read back with
  InferenceSession.get_provider_graph_assignment_info() (every node with its EP). Shape and mask nodes that
  ONNX Runtime keeps on the CPU on purpose are listed, not failed;
- the KV caches live on the device (OrtValue.device_name() is cuda): the fused decoder's shared buffers, the
  traced decoder's presents, the encoder-decoder's self-attention and cross caches;
- logits match a CPU run of the same file (relative to the largest CPU logit), and every greedy token CUDA picks
  is, on the CPU's logits for the same history, within that tolerance of the best;
- the fused decoder's KV buffers, allocated uninitialised on the device, are never read before written (the same
  tokens with the buffers filled with NaN);
- the premise of the refusal holds: an fp32 graph's GroupQueryAttention / QMoE nodes really land on the CPU EP in a
  CUDA session (if not, moerun.runtime.placement.ops_without_cuda_kernel is out of date), provider "cuda" refuses
  such a model, "auto" runs it on the CPU, and an fp32 graph without them runs whole on CUDA with a warning.

Prints PASS/FAIL per check and a summary; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

CUDA_EP = "CUDAExecutionProvider"


class Report:
    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[str] = []

    def check(self, name: str, fn: Callable[[], str | None]) -> bool:
        try:
            detail = fn()
        except Exception as e:  # a check that raises has failed; say why, in one line, and go on
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"FAIL {name}: {type(e).__name__}: {reason}", flush=True)
            if not isinstance(e, AssertionError):
                traceback.print_exc(limit=3, file=sys.stdout)
            self.failed.append(name)
            return False
        print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)
        self.passed.append(name)
        return True


def build(workdir: Path) -> dict[str, Path]:
    """Every model the checks load, converted from the trained fixture (decoders) and a tiny random NLLB-MoE."""
    import torch
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions
    from moerun.demo import TRAINED_MODEL

    int4 = QuantizeOptions(bits=4, block_size=32)
    variants = {
        "fp16": dict(dtype="fp16"),
        "int4-fp16": dict(dtype="fp16", quantize=int4),
        "fp16-traced": dict(dtype="fp16", fusions=False),
        "fp32": dict(),
        "int4-fp32": dict(quantize=int4),
        "fp32-traced": dict(fusions=False),
    }
    out = {}
    for name, options in variants.items():
        start = time.perf_counter()
        out[name] = convert(TRAINED_MODEL, workdir / name, overwrite=True, **options).output
        print(f"  converted {name} in {time.perf_counter() - start:.0f} s", flush=True)
    config = NllbMoeConfig(vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48,
                           decoder_ffn_dim=48, encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4,
                           encoder_sparse_step=2, decoder_sparse_step=2, max_position_embeddings=128,
                           decoder_start_token_id=2, init_std=0.1, scale_embedding=False)
    config.architectures = ["NllbMoeForConditionalGeneration"]
    torch.manual_seed(3)
    NllbMoeForConditionalGeneration(config).eval().save_pretrained(workdir / "nllb-ckpt")
    out["nllb-fp16"] = convert(workdir / "nllb-ckpt", workdir / "nllb-fp16", overwrite=True, dtype="fp16").output
    return out


def _on_cuda(value) -> bool:
    """An OrtValue in GPU memory (ONNX Runtime names the device "Cuda", or "Gpu" in some builds)."""
    return value.device_name().lower() in ("cuda", "gpu")


def _placement_detail(session) -> str:
    from moerun.runtime.placement import compute_fallbacks, node_placement

    placement = node_placement(session)
    assert placement is not None, "ONNX Runtime did not report node placement"
    fallbacks = compute_fallbacks(placement, CUDA_EP)
    assert not fallbacks, f"compute nodes outside {CUDA_EP}: {fallbacks[:8]}"
    elsewhere = sorted({op for ep, op, _ in placement if ep != CUDA_EP})
    on_cuda = sum(ep == CUDA_EP for ep, _, _ in placement)
    return f"{on_cuda}/{len(placement)} nodes on CUDA; kept on the CPU: {', '.join(elsewhere) or 'none'}"


def _relative(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float32) - reference.astype(np.float32)).max()
                 / max(np.abs(reference.astype(np.float32)).max(), 1e-6))


def check_decoder(report: Report, name: str, path: Path, tolerance: float) -> None:
    from moerun import MoEModel
    from moerun.converter.verify import padded, sample_prompts
    from moerun.runtime.errors import MoerunWarning

    print(f"-- {name} ({path})", flush=True)
    holder = {}

    def load() -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = MoEModel.load(path, provider="cuda")
        moerun_warnings = [str(w.message) for w in caught if issubclass(w.category, MoerunWarning)]
        assert not moerun_warnings, f"unexpected warnings: {moerun_warnings}"
        assert m.execution_provider == CUDA_EP, m.execution_provider
        holder["cuda"], holder["cpu"] = m, MoEModel.load(path, provider="cpu")
        return f"{m.manifest.attention} attention, {m.manifest.dtype}, quantization {bool(m.manifest.quantization)}"

    if not report.check(f"{name}: loads on {CUDA_EP}", load):
        return
    cuda, cpu = holder["cuda"], holder["cpu"]
    for m in (cuda, cpu):
        m.manifest.eos_token_id = []  # every row runs to max_new_tokens
    report.check(f"{name}: no compute node on the CPU EP", lambda: _placement_detail(cuda.runner.session))

    def kv_on_device() -> str:
        if cuda.manifest.fused_attention:
            made = []
            allocate = cuda.runner.kv_buffer

            def recording(shape):
                made.append(allocate(shape))
                return made[-1]

            cuda.runner.kv_buffer = recording
            try:
                cuda.generate_ids([[1, 5, 9, 11], [1, 7]], max_new_tokens=4)
            finally:
                del cuda.runner.kv_buffer
            assert made and all(_on_cuda(v) for v in made), [v.device_name() for v in made]
            return f"{len(made)} shared KV buffers on cuda, bound as past and present"
        ids, mask, pos = padded([[1, 5, 9, 11], [1, 7]], cuda.pad_token_id)
        logits, presents = cuda.runner.step(ids, mask, pos, cuda.runner.empty_past(2))
        assert all(_on_cuda(v) for v in presents), [v.device_name() for v in presents]
        step, presents = cuda.runner.step(ids[:, -1:], np.concatenate([mask, mask[:, -1:]], 1),
                                          pos[:, -1:] + 1, presents)
        assert all(_on_cuda(v) for v in presents) and step.shape == (2, 1, cuda.manifest.vocab_size)
        return f"{len(presents)} presents on cuda, fed back as pasts"

    report.check(f"{name}: KV cache stays on the device", kv_on_device)

    def logits_match() -> str:
        prompts = sample_prompts(cuda.manifest.vocab_size, seed=1, lengths=(11, 4, 8))
        ids, mask, pos = padded(prompts, cuda.pad_token_id, right=cuda.manifest.fused_attention)
        valid = mask.astype(bool)
        ours, _ = cuda.forward(ids, mask, pos)
        theirs, _ = cpu.forward(ids, mask, pos)
        prefill = _relative(ours[valid], theirs[valid])
        split = 6
        _, past_gpu = cuda.forward(ids[:, :split], mask[:, :split], pos[:, :split])
        _, past_cpu = cpu.forward(ids[:, :split], mask[:, :split], pos[:, :split])
        step_gpu, _ = cuda.forward(ids[:, split:split + 1], mask[:, :split + 1], pos[:, split:split + 1], past_gpu)
        step_cpu, _ = cpu.forward(ids[:, split:split + 1], mask[:, :split + 1], pos[:, split:split + 1], past_cpu)
        keep = valid[:, split:split + 1]
        decode = _relative(step_gpu[keep], step_cpu[keep])
        assert max(prefill, decode) < tolerance, f"prefill {prefill:.2e}, decode {decode:.2e} over {tolerance}"
        return f"max |Δ| / max |logit|: prefill {prefill:.2e}, decode with past {decode:.2e} (< {tolerance})"

    report.check(f"{name}: logits match the CPU", logits_match)

    prompts = [[1, 5, 9, 11, 12, 40, 41], [1, 7, 3], [1, 30, 31, 32, 33]]
    generated = {}

    def greedy_agrees() -> str:
        new = 16
        generated["tokens"] = gpu = cuda.generate_ids(prompts, max_new_tokens=new)
        gpu_speed = cuda.last_stats.decode_tokens_per_s
        exact = np.mean([a == b for ra, rb in zip(gpu, cpu.generate_ids(prompts, max_new_tokens=new))
                         for a, b in zip(ra, rb)])
        worst = 0.0
        for prompt, row in zip(prompts, gpu):
            history = np.array([prompt + row[:-1]])
            logits, _ = cpu.forward(history, None, np.arange(history.shape[1])[None])
            logits = logits[0, len(prompt) - 1:].astype(np.float32)
            picked = logits[np.arange(len(row)), row]
            worst = max(worst, float(((logits.max(-1) - picked) / np.abs(logits).max()).max()))
        assert worst < tolerance, f"a CUDA greedy token is {worst:.2e} below the CPU's best (relative)"
        return (f"{exact:.0%} of tokens equal to the CPU's; every CUDA pick within {worst:.1e} of the CPU's best; "
                f"{gpu_speed:.0f} decode tok/s on CUDA")

    report.check(f"{name}: greedy tokens agree with the CPU", greedy_agrees)

    if cuda.manifest.fused_attention and "tokens" in generated:
        def never_read_before_written() -> str:
            import onnxruntime as ort

            dtype = cuda.runner.kv_dtype
            cuda.runner.kv_buffer = lambda shape: ort.OrtValue.ortvalue_from_numpy(
                np.full(shape, np.nan, dtype=dtype), "cuda", 0)
            try:
                poisoned = cuda.generate_ids(prompts, max_new_tokens=16)
            finally:
                del cuda.runner.kv_buffer
            assert poisoned == generated["tokens"], "NaN-filled KV buffers changed the output"
            return "NaN-filled buffers give the same tokens"

        report.check(f"{name}: uninitialised KV buffers are never read before written", never_read_before_written)


def check_seq2seq(report: Report, path: Path, tolerance: float) -> None:
    from moerun import MoEModel

    print(f"-- nllb-fp16 ({path})", flush=True)
    holder = {}

    def load() -> str:
        holder["cuda"] = m = MoEModel.load(path, provider="cuda")
        holder["cpu"] = MoEModel.load(path, provider="cpu")
        assert m.execution_provider == CUDA_EP and m.runner.encoder.get_providers()[0] == CUDA_EP
        return "encoder and decoder sessions on CUDA"

    if not report.check(f"nllb-fp16: loads on {CUDA_EP}", load):
        return
    cuda, cpu = holder["cuda"], holder["cpu"]
    report.check("nllb-fp16: no compute node on the CPU EP (decoder)", lambda: _placement_detail(cuda.runner.decoder))
    report.check("nllb-fp16: no compute node on the CPU EP (encoder)", lambda: _placement_detail(cuda.runner.encoder))
    eos = cuda.manifest.eos_token_id[0]
    rng = np.random.default_rng(0)
    sources = [rng.integers(3, cuda.manifest.vocab_size, n).tolist() + [eos] for n in (7, 3, 11, 5)]

    def caches_on_device() -> str:
        state = cuda.runner.start(cuda.encode(sources))
        start = np.full((len(sources), 1), cuda.manifest.decoder_start_token_id, dtype=np.int64)
        state(np.arange(len(sources)), start)
        first = list(state.past)
        state(np.arange(len(sources)), start)
        assert all(_on_cuda(v) for v in state.past + state.cross), "a cache tensor is not on cuda"
        state(np.array([2, 0]), start[:2])  # rows reordered and dropped: gathered, still on the device
        assert all(_on_cuda(v) for v in state.past + state.cross) and len(first) == len(state.past)
        return f"{len(state.past)} self-attention and {len(state.cross)} cross tensors on cuda across steps"

    report.check("nllb-fp16: decoder caches stay on the device", caches_on_device)

    def logits_match() -> str:
        targets = rng.integers(3, cuda.manifest.vocab_size, (len(sources), 6))
        targets[:, 0] = cuda.manifest.decoder_start_token_id
        worst = 0.0
        outs = []
        for m in (cuda, cpu):
            encoded = m.encode(sources)
            past = m.runner.empty_past(len(sources))
            got, past = m.runner.decode(targets[:, :3], encoded.attention_mask, past, encoded.cross)
            steps = [got]
            for t in range(3, 6):
                got, past = m.runner.decode(targets[:, t:t + 1], encoded.attention_mask, past, encoded.cross)
                steps.append(got)
            outs.append((encoded.hidden_states, np.concatenate(steps, axis=1)))
        real = cpu.encode(sources).attention_mask.astype(bool)
        encoder = _relative(outs[0][0][real], outs[1][0][real])
        worst = _relative(outs[0][1], outs[1][1])
        assert max(encoder, worst) < tolerance, f"encoder {encoder:.2e}, decoder {worst:.2e} over {tolerance}"
        return f"max |Δ| / max: encoder {encoder:.2e}, decoder prefill + 3 cached steps {worst:.2e}"

    report.check("nllb-fp16: encoder and decoder outputs match the CPU", logits_match)

    def search_agrees() -> str:
        lines = []
        for beams in (1, 3):
            gpu = cuda.translate_ids(sources, num_beams=beams, max_new_tokens=12)
            ref = cpu.translate_ids(sources, num_beams=beams, max_new_tokens=12)
            same = sum(a == b for a, b in zip(gpu, ref))
            assert all(row[0] == cuda.manifest.decoder_start_token_id and len(row) >= 2 for row in gpu), gpu
            lines.append(f"beams {beams}: {same}/{len(ref)} sentences equal to the CPU's")
        encoded = cpu.encode(sources)
        gpu = cuda.translate_ids(sources, num_beams=1, max_new_tokens=12)
        worst = 0.0
        for i, row in enumerate(gpu):
            one = cpu.runner.decode(np.array([row[:-1]]), encoded.attention_mask[i:i + 1],
                                    cpu.runner.empty_past(1), [c[i:i + 1] for c in encoded.cross])[0][0]
            one = one.astype(np.float32)
            picked = one[np.arange(len(row) - 1), row[1:]]
            worst = max(worst, float(((one.max(-1) - picked) / np.abs(one).max()).max()))
        assert worst < tolerance, f"a CUDA greedy token is {worst:.2e} below the CPU's best (relative)"
        return "; ".join(lines) + f"; every greedy CUDA pick within {worst:.1e} of the CPU's best"

    report.check("nllb-fp16: greedy and beam search agree with the CPU", search_agrees)


def check_fp32(report: Report, models: dict[str, Path]) -> None:
    from moerun import MoEModel
    from moerun.runtime.errors import MoerunWarning, PlacementError
    from moerun.runtime.session import create_session

    print("-- fp32 on CUDA", flush=True)
    for name, op in (("fp32", "GroupQueryAttention"), ("int4-fp32", "QMoE")):
        def really_falls_back(name=name, op=op) -> str:
            try:
                create_session(str(models[name] / "model.onnx"), "cuda")
            except PlacementError as e:
                assert op in str(e), str(e)
                return f"ONNX Runtime placed {op} on the CPU EP, as ops_without_cuda_kernel says"
            raise AssertionError(f"{name}: no compute node fell back: {op} has an fp32 CUDA kernel in this ONNX "
                                 "Runtime; update moerun.runtime.placement.ops_without_cuda_kernel")

        report.check(f"{name}: {op} really falls back to the CPU EP (the refusal's premise)", really_falls_back)

        def refused(name=name) -> str:
            try:
                MoEModel.load(models[name], provider="cuda")
            except PlacementError as e:
                return f"refused: {e}"
            raise AssertionError("provider 'cuda' loaded a model whose nodes fall back to the CPU")

        report.check(f"{name}: provider 'cuda' refuses it", refused)

        def auto_cpu(name=name) -> str:
            provider = MoEModel.load(models[name], provider="auto").execution_provider
            assert provider == "CPUExecutionProvider", provider
            return "provider 'auto' runs it on the CPU"

        report.check(f"{name}: provider 'auto' runs it on the CPU", auto_cpu)

    def traced_fp32() -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = MoEModel.load(models["fp32-traced"], provider="cuda")
        assert any(issubclass(w.category, MoerunWarning) and "fp16" in str(w.message) for w in caught), \
            "no warning for an fp32 model on CUDA"
        assert m.execution_provider == CUDA_EP
        return _placement_detail(m.runner.session) + "; warned"

    report.check("fp32-traced: runs whole on CUDA, with a warning", traced_fp32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the models are converted (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the converted models")
    parser.add_argument("--tolerance", type=float, default=0.03,
                        help="fp16 logits: max |CUDA - CPU| over max |CPU logit| (default 0.03)")
    parser.add_argument("--tolerance-int4", type=float, default=0.1,
                        help="the same for int4 experts (the CPU kernel quantizes activations to int8, CUDA does not)")
    args = parser.parse_args()

    import onnxruntime as ort

    from moerun.runtime.session import cuda_usable

    if not cuda_usable():
        print(f"check_cuda: skipped: no usable CUDA device here (onnxruntime {ort.__version__}, providers "
              f"{ort.get_available_providers()}); nothing was checked")
        return 0
    start = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="moerun-check-cuda-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"check_cuda: onnxruntime {ort.__version__}, converting into {workdir}", flush=True)
    report = Report()
    try:
        models = {}

        def convert_all() -> str:
            models.update(build(workdir))
            return f"{len(models)} models"

        if report.check("convert the models", convert_all):
            check_decoder(report, "fp16", models["fp16"], args.tolerance)
            check_decoder(report, "int4-fp16", models["int4-fp16"], args.tolerance_int4)
            check_decoder(report, "fp16-traced", models["fp16-traced"], args.tolerance)
            check_seq2seq(report, models["nllb-fp16"], args.tolerance)
            check_fp32(report, models)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    verdict = "PASS" if not report.failed else "FAIL"
    print(f"check_cuda: {verdict}: {len(report.passed)} passed, {len(report.failed)} failed "
          f"in {time.perf_counter() - start:.0f} s" + (f" ({'; '.join(report.failed)})" if report.failed else ""))
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
