"""The runtime's core: one model class per kind behind MoEModel.load, hot paths that keep only what generation needs,
honest decode-token counts, and the CUDA decisions (provider choice, node placement, KV buffers on the device)
checked on CPU. Nothing here runs CUDA: scripts/check_cuda.py does, on a machine with a GPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import SEQ2SEQ, random_sources, save_checkpoint
from moerun import MoEModel, MoerunError
from moerun.runtime import DecoderModel, Manifest, Seq2SeqModel
from moerun.runtime import generation as generation_module
from moerun.runtime import model as model_module
from moerun.runtime.errors import MoerunWarning, PlacementError
from moerun.runtime.placement import RECORD_PLACEMENT, compute_fallbacks, describe_fallbacks, node_placement
from moerun.runtime.session import check_placement, choose_provider

SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """The same small checkpoint with fused attention (GroupQueryAttention) and with traced attention."""
    from moerun.converter.convert import convert
    from moerun.demo import build_demo_checkpoint

    root = tmp_path_factory.mktemp("core")
    checkpoint = build_demo_checkpoint(root / "ckpt", seed=7, **SMALL)
    return {"fused": convert(checkpoint, root / "gqa").output,
            "traced": convert(checkpoint, root / "traced", fusions=False).output}


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    from moerun.converter.convert import convert

    root = tmp_path_factory.mktemp("core-switch")
    return convert(save_checkpoint(SEQ2SEQ["switch"](seed=3), root / "ckpt"), root / "onnx").output


def _one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# --- one class per kind ------------------------------------------------------------------------

def test_load_returns_the_class_of_the_models_kind(decoders, switch):
    decoder = MoEModel.load(decoders["fused"], provider="cpu")
    seq2seq = MoEModel.load(switch, provider="cpu")
    assert type(decoder) is DecoderModel and isinstance(decoder, MoEModel)
    assert type(seq2seq) is Seq2SeqModel and isinstance(seq2seq, MoEModel)
    assert type(DecoderModel.load(decoders["traced"], provider="cpu")) is DecoderModel
    assert decoder.execution_provider == seq2seq.execution_provider == "CPUExecutionProvider"
    with pytest.raises(MoerunError) as error:
        DecoderModel.load(switch, provider="cpu")
    _one_line(error, "encoder-decoder", "MoEModel.load")
    with pytest.raises(MoerunError) as error:
        Seq2SeqModel.load(decoders["fused"], provider="cpu")
    _one_line(error, "decoder-only", "MoEModel.load")


def test_each_kind_refuses_the_other_kinds_methods_in_one_line(decoders, switch):
    decoder = MoEModel.load(decoders["fused"], provider="cpu")
    for call in (lambda: decoder.translate("hi"), lambda: decoder.translate_ids([[5, 6]]),
                 lambda: decoder.encode([[5, 6]])):
        with pytest.raises(MoerunError) as error:
            call()
        _one_line(error, "holds a decoder-only model (MixtralForCausalLM): use generate()/generate_ids()")
    seq2seq = MoEModel.load(switch, provider="cpu")
    for call in (lambda: seq2seq.generate("hi"), lambda: seq2seq.generate_ids([[5, 6]]),
                 lambda: seq2seq.forward(np.array([[5, 6]]))):
        with pytest.raises(MoerunError) as error:
            call()
        _one_line(error, "holds an encoder-decoder model", "use translate()/translate_ids()")


# --- hot paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["fused", "traced"])
def test_prefill_computes_only_each_rows_last_logits(decoders, attention, monkeypatch):
    """Generation needs the prefill's last position per row: the graph is asked for it (``logits_position``) and
    the (batch, seq, vocab) array is never allocated; the (batch, vocab) kept equals the full run's logits at each
    row's last real token (right padding: its own length; left padding: the last column)."""
    m = MoEModel.load(decoders[attention], provider="cpu")
    assert m.runner.picks_position
    bound = []
    original = generation_module.bind_host_output

    def recording(binding, name, shape, dtype):
        bound.append(shape)
        return original(binding, name, shape, dtype)

    monkeypatch.setattr(generation_module, "bind_host_output", recording)
    prompts = [[1, 5, 9, 11, 12], [1, 7, 3]]
    steps = (m.runner._fused_steps if attention == "fused" else m.runner._traced_steps)(
        prompts, m.pad_token_id, 4, generation_module.GenerationStats())
    last = next(steps)
    assert bound[0] == (2, 1, 384) and (2, 5, 384) not in bound
    assert last.shape == (2, 384) and last.base is None
    pad = generation_module.right_pad if attention == "fused" else generation_module.left_pad
    ids, mask = pad(prompts, m.pad_token_id)
    positions = None if attention == "fused" else np.where(mask == 1, mask.cumsum(-1) - 1, 0)
    full, _ = m.forward(ids, mask, positions)  # the graph's default: every position
    at = mask.sum(-1) - 1 if attention == "fused" else np.full(2, ids.shape[1] - 1)
    np.testing.assert_allclose(last, full[np.arange(2), at], rtol=0, atol=1e-5)
    steps.send(np.array([[3], [4]]))


def test_generation_output_is_unchanged_by_the_hot_path_work(decoders):
    """Fused and traced attention (right and left padding) generate the same tokens from the same weights."""
    prompts = [[1, 5, 9, 11, 12, 40, 41], [1, 7, 3], [1, 30, 31, 32]]
    fused = MoEModel.load(decoders["fused"], provider="cpu")
    traced = MoEModel.load(decoders["traced"], provider="cpu")
    for m in (fused, traced):
        m.manifest.eos_token_id = []
    assert fused.generate_ids(prompts, max_new_tokens=8) == traced.generate_ids(prompts, max_new_tokens=8)


def test_seq2seq_self_attention_cache_is_bound_from_step_to_step(switch, monkeypatch):
    """The decoder's presents are the next step's pasts, as OrtValues where ONNX Runtime wrote them: no NumPy
    round trip while rows stay in place."""
    m = MoEModel.load(switch, provider="cpu")
    state = m.runner.start(m.encode([[5, 6, 7, 1], [8, 9, 1]]))
    seen = []
    original = m.runner.decode

    def spy(input_ids, mask, past, cross):
        seen.append((past, cross))
        return original(input_ids, mask, past, cross)

    monkeypatch.setattr(m.runner, "decode", spy)
    rows = np.arange(2)
    state(rows, np.zeros((2, 1), dtype=np.int64))
    presents = state.past
    assert all(isinstance(p, ort.OrtValue) and p.device_name().lower() == "cpu" for p in presents)
    state(rows, np.full((2, 1), 5, dtype=np.int64))
    past, cross = seen[1]
    assert all(a is b for a, b in zip(past, presents)), "the presents must be bound as the next pasts"
    assert all(isinstance(c, ort.OrtValue) for c in cross) and cross is seen[0][1]


def test_decode_tokens_count_only_rows_still_generating(decoders):
    m = MoEModel.load(decoders["fused"], provider="cpu")
    prompts = [[1, 5, 9], [1, 7, 3, 8, 20], [1, 30]]
    m.manifest.eos_token_id = []
    free = m.generate_ids(prompts, max_new_tokens=10)
    m.manifest.eos_token_id = [free[0][2]]  # row 0 ends at its third token
    out = m.generate_ids(prompts, max_new_tokens=10)
    assert len(out[0]) == 3 and max(len(r) for r in out) == 10
    assert m.last_stats.decode_tokens == sum(len(r) - 1 for r in out)


def test_translate_decode_tokens_are_the_tokens_generated(switch):
    m = MoEModel.load(switch, provider="cpu")
    eos = m.manifest.eos_token_id[0]
    sources = random_sources(m.manifest.vocab_size, eos, lengths=(7, 3, 11, 5))
    for beams in (1, 3):
        out = m.translate_ids(sources, num_beams=beams, max_new_tokens=12)
        generated = 0
        for row in out:
            tokens = row[1:]
            generated += tokens.index(eos) + 1 if eos in tokens else len(tokens)
        assert m.last_stats.decode_tokens == generated
        if beams > 1:
            assert m.last_stats.extra["decoder_rows"] > generated


def test_fused_kv_buffers_are_never_read_before_written(decoders, monkeypatch):
    """GroupQueryAttention reads only the KV positions it wrote: buffers full of NaN change nothing. This is what
    lets the CUDA path allocate them uninitialised on the device (checked there by scripts/check_cuda.py)."""
    m = MoEModel.load(decoders["fused"], provider="cpu")
    m.manifest.eos_token_id = []
    prompts = [[1, 5, 9, 11, 12, 40, 41], [1, 7, 3]]
    expected = m.generate_ids(prompts, max_new_tokens=6)

    def poisoned(shape):
        return ort.OrtValue.ortvalue_from_numpy(np.full(shape, np.nan, dtype=m.runner.kv_dtype))

    monkeypatch.setattr(m.runner, "kv_buffer", poisoned)
    assert m.generate_ids(prompts, max_new_tokens=6) == expected


def test_cuda_kv_buffers_are_allocated_on_the_device(decoders, monkeypatch):
    """On CUDA the runner asks ONNX Runtime for device memory of the cache's shape and dtype, and builds no host
    array to copy over. (Recorded, not run: no GPU here.)"""
    m = MoEModel.load(decoders["fused"], provider="cpu")
    calls = []
    from_numpy = ort.OrtValue.ortvalue_from_numpy

    def on_device(shape, dtype, device, device_id=0):
        calls.append((tuple(shape), dtype, device))
        return from_numpy(np.zeros(shape, dtype=dtype))

    def no_host_copy(*args, **kwargs):
        raise AssertionError("a host array was copied to the device")

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", staticmethod(on_device))
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(no_host_copy))
    runner = generation_module.DecoderRunner(m.runner.session, m.manifest, "cuda")
    runner.empty_past(3, 20)
    assert calls == [((3, 2, 20, 16), np.float32, "cuda")] * 4


# --- CUDA decisions, on CPU --------------------------------------------------------------------

def _manifest(**fields) -> Manifest:
    base = dict(architecture="MixtralForCausalLM", model_type="mixtral", num_layers=2, num_kv_heads=2, head_dim=16,
                vocab_size=384, hidden_size=64, num_experts=4, experts_per_token=2, moe_layers=2)
    return Manifest(**{**base, **fields})


INT4 = {"bits": 4, "block_size": 64}


@pytest.mark.parametrize("fields,auto,cuda,warns", [
    (dict(dtype="fp16", attention="gqa", quantization=INT4), "cuda", "cuda", False),
    (dict(dtype="fp16"), "cuda", "cuda", False),
    (dict(dtype="fp32", attention="traced"), "cuda", "cuda", True),
    (dict(dtype="fp32", attention="gqa"), "cpu", PlacementError, None),
    (dict(dtype="fp32", attention="traced", quantization=INT4), "cpu", PlacementError, None),
])
def test_provider_choice_on_a_machine_with_cuda(fields, auto, cuda, warns):
    """fp16 is the CUDA export. An fp32 graph with fp16-only CUDA kernels (GroupQueryAttention, QMoE) is refused
    by 'cuda' and sent to the CPU by 'auto'; other fp32 graphs run on CUDA with a warning when 'cuda' was asked."""
    manifest = _manifest(**fields)
    assert choose_provider("auto", manifest, cuda_available=True) == (auto, None)
    assert choose_provider("cpu", manifest, cuda_available=True) == ("cpu", None)
    if cuda is PlacementError:
        with pytest.raises(PlacementError) as error:
            choose_provider("cuda", manifest, cuda_available=True)
        _one_line(error, "fp16/bf16 only", "--dtype fp16", "provider 'cpu'")
        return
    provider, warning = choose_provider("cuda", manifest, cuda_available=True)
    assert provider == cuda and (warning is not None) == warns
    if warns:
        assert "fp16" in warning and "untested" in warning


def test_provider_choice_on_a_machine_without_cuda():
    manifest = _manifest(dtype="fp16")
    assert choose_provider("auto", manifest, cuda_available=False) == ("cpu", None)
    with pytest.raises(MoerunError, match="no usable CUDA device"):
        choose_provider("cuda", manifest, cuda_available=False)
    with pytest.raises(MoerunError, match="unknown provider"):
        choose_provider("tpu", manifest, cuda_available=False)


def test_load_turns_the_provider_warning_into_a_moerun_warning(decoders, monkeypatch):
    monkeypatch.setattr(model_module, "choose_provider", lambda provider, manifest: ("cpu", "fp32 on CUDA"))
    with pytest.warns(MoerunWarning, match="fp32 on CUDA"):
        MoEModel.load(decoders["fused"], provider="cuda")


def test_auto_runs_on_the_cpu_when_cuda_placement_falls_back(decoders, monkeypatch):
    """A placement fallback the manifest did not predict: 'auto' reloads on the CPU, 'cuda' refuses."""
    original = DecoderModel._open.__func__
    opened = []

    def open_(cls, directory, manifest, tokenizer, provider, threads):
        opened.append(provider)
        if provider == "cuda":
            raise PlacementError("model.onnx: ONNX Runtime placed 2 compute nodes outside CUDAExecutionProvider")
        return original(cls, directory, manifest, tokenizer, provider, threads)

    monkeypatch.setattr(DecoderModel, "_open", classmethod(open_))
    monkeypatch.setattr(model_module, "choose_provider", lambda provider, manifest: ("cuda", None))
    assert MoEModel.load(decoders["fused"], provider="auto").execution_provider == "CPUExecutionProvider"
    assert opened == ["cuda", "cpu"]
    with pytest.raises(PlacementError):
        MoEModel.load(decoders["fused"], provider="cuda")


def test_compute_fallbacks_ignore_shape_nodes_and_name_compute_nodes():
    placement = [("CUDAExecutionProvider", "MatMul", "lm_head"), ("CPUExecutionProvider", "Shape", "s0"),
                 ("CPUExecutionProvider", "ReduceSum", "mask_sum"), ("CPUExecutionProvider", "Gather", "g0"),
                 ("CUDAExecutionProvider", "MoE", "moe_0"), ("CPUExecutionProvider", "GroupQueryAttention", "gqa_0"),
                 ("CPUExecutionProvider", "GroupQueryAttention", "gqa_1"), ("CPUExecutionProvider", "QMoE", "moe_1")]
    fallbacks = compute_fallbacks(placement, "CUDAExecutionProvider")
    assert fallbacks == [("GroupQueryAttention", "gqa_0"), ("GroupQueryAttention", "gqa_1"), ("QMoE", "moe_1")]
    assert describe_fallbacks(fallbacks) == "GroupQueryAttention x2, QMoE x1"
    assert compute_fallbacks(placement[:5], "CUDAExecutionProvider") == []


def test_placement_is_read_from_onnx_runtime(decoders):
    """ONNX Runtime's own record of where it put each node (here a CPU session, checked as if CUDA had been asked
    for: every compute node is then a fallback); a session that did not record it cannot be checked."""
    path = str(decoders["fused"] / "model.onnx")
    options = ort.SessionOptions()
    options.add_session_config_entry(RECORD_PLACEMENT, "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    placement = node_placement(session)
    ops = {op for _, op, _ in placement}
    assert {"GroupQueryAttention", "MoE"} <= ops and {ep for ep, _, _ in placement} == {"CPUExecutionProvider"}
    check_placement(session, path, "cpu")
    with pytest.raises(PlacementError) as error:
        check_placement(session, path, "cuda")
    _one_line(error, "CUDAExecutionProvider", "GroupQueryAttention x2", "MoE x2", "--dtype fp16")
    plain = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert node_placement(plain) is None
    check_placement(plain, path, "cuda")  # cannot tell: a warning in the log, no error
