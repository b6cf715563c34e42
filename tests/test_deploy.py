"""Deploying to other ONNX Runtime hosts: `moerun inspect`, Triton's model config checked with Triton's own protobuf
against the ONNX graph, the implicit-state protocol Triton documents run with ONNX Runtime, onnxruntime-extensions
tokenizer graphs against Hugging Face's tokenizers, and onnxruntime-genai loading `deploy genai` directories."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import FIXTURE, run_cli, train_sentencepiece
from moerun import MoEModel
from moerun.deploy.inspect import inspect_model

GENAI_WORKER = Path(__file__).parent / "genai_greedy.py"
PROMPTS = [[1, 45, 67, 89, 100, 200], [1, 300, 5], [1, 7, 8, 9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def exports(converted, checkpoints, tmp_path_factory) -> dict[str, Path]:
    """fp32 with fused attention (the session's conversion), its int4 quantization with one scale per row (what
    onnxruntime-node 1.30 runs), and a traced-attention export."""
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    root = tmp_path_factory.mktemp("deploy")
    fp32 = converted["k2_e8_h96"]
    return {"fp32": fp32, "traced": convert(checkpoints["k1_e4_h72"], root / "traced", fusions=False).output,
            "int4": quantize_model(fp32, root / "int4", QuantizeOptions(bits=4, block_size=0, accuracy_level=0)).output}


@pytest.fixture(scope="module")
def tiny_exports(tiny_moe_converted, tmp_path_factory) -> dict[str, Path]:
    """The trained fixture (with its byte-level BPE tokenizer) as fp32 fused, traced and int4 exports."""
    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    root = tmp_path_factory.mktemp("deploy-tiny")
    fp32 = tiny_moe_converted
    return {"fp32": fp32, "traced": convert(FIXTURE, root / "traced", fusions=False).output,
            "int4": quantize_model(fp32, root / "int4", QuantizeOptions(bits=4, block_size=16)).output}


# --- inspect -------------------------------------------------------------------------------------

def test_inspect_reports_the_graph_as_onnx_reads_it(exports):
    report = inspect_model(exports["int4"])
    graph = onnx.load(str(exports["int4"] / "model.onnx"), load_external_data=False).graph
    (g,) = report.graphs
    assert [t.name for t in g.inputs] == [v.name for v in graph.input]
    assert [t.name for t in g.outputs] == [v.name for v in graph.output]
    assert sum(n for ops in g.ops.values() for n in ops.values()) == len(graph.node)
    qmoe = [n for n in graph.node if n.op_type == "QMoE"]
    assert len(g.moe_nodes) == len(qmoe)
    assert len(g.moe_nodes) == 3
    assert {(m.experts, m.k, m.bits, m.block_size, m.activation) for m in g.moe_nodes} == {(8, 2, 4, 0, "swiglu")}
    assert report.strict_ok and report.min_onnxruntime == "1.28"  # QMoE's weights_prepacked (measured)
    assert report.deploy_targets["node"].startswith("ready")
    assert report.execution_providers["CUDA"].startswith("needs fp16")
    assert g.bytes == sum(p.stat().st_size for p in exports["int4"].glob("model.onnx*"))
    fp32 = inspect_model(exports["fp32"])
    assert fp32.min_onnxruntime == "1.23" and fp32.deploy_targets["node"].startswith("ready")


def test_inspect_strict_passes_on_every_export_and_fails_on_a_foreign_op(exports, seq2seq_converted, tmp_path):
    for model_dir in [*exports.values(), *seq2seq_converted.values()]:  # every family: tests/test_families.py
        report = inspect_model(model_dir)
        assert report.strict_ok and report.foreign_ops == [], model_dir
        assert {op for g in report.graphs for op in g.ops} <= {"ai.onnx", "com.microsoft"}
    result = run_cli("inspect", str(exports["traced"]), "--strict", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["attention"].startswith("traced")
    # the same export with one op of a custom domain that ONNX Runtime does not know
    foreign = tmp_path / "foreign"
    shutil.copytree(exports["fp32"], foreign)
    model = onnx.load(str(foreign / "model.onnx"), load_external_data=False)
    logits = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Sparsify", [logits], ["sparse"], domain="com.example"))
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, str(foreign / "model.onnx"))
    result = run_cli("inspect", str(foreign), "--strict")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert "com.example.Sparsify" in result.stderr
    assert run_cli("inspect", str(foreign)).returncode == 0  # without --strict it reports and succeeds


def test_inspect_errors_are_one_line(tmp_path):
    result = run_cli("inspect", str(tmp_path / "missing"))
    assert result.returncode == 1 and "no such model directory" in result.stderr
    assert "Traceback" not in result.stderr


# --- Triton --------------------------------------------------------------------------------------

def _config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


_TRITON_TYPES = {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_FP16": onnx.TensorProto.FLOAT16,
                 "TYPE_INT64": onnx.TensorProto.INT64}


def _check_against_graph(config, graph_path: Path) -> None:
    """Every graph input and output is a config input/output or a state, with the graph's dtype, rank and dims."""
    from tritonclient.grpc import model_config_pb2

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    type_name = model_config_pb2.DataType.Name
    declared = {t.name: (type_name(t.data_type), list(t.dims)) for t in [*config.input, *config.output]}
    states = set()
    for state in config.sequence_batching.state:
        declared[state.input_name] = declared[state.output_name] = (type_name(state.data_type), list(state.dims))
        states |= {state.input_name, state.output_name}
        assert [d for d in state.initial_state[0].dims] == [1 if d == -1 else d for d in state.dims]
        assert state.initial_state[0].zero_data
    batched = config.max_batch_size > 0
    for value in [*graph.input, *graph.output]:
        assert value.name in declared, value.name
        dtype, dims = declared.pop(value.name)
        assert _TRITON_TYPES[dtype] == value.type.tensor_type.elem_type, value.name
        graph_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        graph_dims = graph_dims[1:] if batched else graph_dims
        assert len(dims) == len(graph_dims), value.name
        for ours, theirs in zip(dims, graph_dims):  # a state may fix a dynamic dim (a preallocated KV buffer)
            assert ours == theirs or (theirs == -1 and value.name in states), value.name
    assert declared == {}, f"config names what the graph does not have: {list(declared)}"
    defaults = {t.name for t in graph.initializer}  # inputs with a default value (logits_position) are optional
    assert all(t.optional == (t.name in defaults) for t in config.input), [(t.name, t.optional) for t in config.input]


def test_triton_repository_matches_the_onnx_graph(exports, tmp_path):
    from moerun.deploy.triton import export_triton

    for name, layers in (("fp32", 3), ("traced", 2)):
        repo = tmp_path / f"repo-{name}"
        if name == "fp32":  # the CLI once, the API otherwise
            result = run_cli("deploy", "triton", str(exports[name]), "-o", str(repo), "--name", "tiny")
            assert result.returncode == 0, result.stderr
        else:
            export_triton(exports[name], repo, name="tiny")
        config = _config(repo / "tiny" / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 1
        assert len(config.sequence_batching.state) == 2 * layers  # key and value of every layer
        assert config.instance_group[0].count >= 1
        assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "cuda"
        _check_against_graph(config, repo / "tiny" / "1" / "model.onnx")
        session = ort.InferenceSession(str(repo / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].name == "input_ids"  # external data found beside it


def test_triton_encoder_decoder_repository(seq2seq_converted, tmp_path):
    repo = tmp_path / "repo"
    from moerun.deploy.triton import export_triton

    export_triton(seq2seq_converted["nllb_moe"], repo, name="nllb")
    encoder, decoder = _config(repo / "nllb_encoder" / "config.pbtxt"), _config(repo / "nllb_decoder" / "config.pbtxt")
    assert encoder.HasField("dynamic_batching") and encoder.max_batch_size > 0
    assert decoder.max_batch_size == 0 and not decoder.HasField("sequence_batching")
    _check_against_graph(encoder, repo / "nllb_encoder" / "1" / "model.onnx")
    _check_against_graph(decoder, repo / "nllb_decoder" / "1" / "model.onnx")


@pytest.mark.parametrize("name", ["fp32", "traced"])
def test_triton_implicit_state_protocol_generates_moeruns_tokens(exports, name):
    """Triton's implicit state as its docs define it, run with ONNX Runtime: each state starts as the config's
    initial_state (zeros; variable dims set to 1), the i-th request's present is the (i+1)-th request's past, one
    sequence per request. Greedy tokens equal moerun's generate_ids (itself tested against Hugging Face)."""
    from moerun.deploy.triton import build_configs

    model_dir = exports[name]
    (config, graph_file), = build_configs(model_dir, "tiny", max_length=32).values()
    session = ort.InferenceSession(str(model_dir / graph_file), providers=["CPUExecutionProvider"])
    prompts = [[1, 45, 67, 89, 100, 120], [1, 30, 5], [1, 7, 8, 9, 10, 11, 12, 13, 14]]
    expected = MoEModel.load(model_dir, provider="cpu", threads=2).generate_ids(prompts, 6)
    traced = name == "traced"
    for prompt, want in zip(prompts, expected):
        states = {s.input_name: np.zeros([1, *s.initial_state[0].dims], np.float32)
                  for s in config.sequence_batching.state}
        hidden = 1 if traced else 0  # traced attention: the client's mask hides the initial slot
        tokens, new = list(prompt), list(prompt)
        while len(tokens) < len(prompt) + len(want):
            feeds = {"input_ids": np.array([new], np.int64),
                     "attention_mask": np.array([[0] * hidden + [1] * len(tokens)], np.int64), **states}
            if traced:
                feeds["position_ids"] = np.arange(len(tokens) - len(new), len(tokens), dtype=np.int64)[None]
            outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            states = {s.input_name: outputs[s.output_name] for s in config.sequence_batching.state}
            assert next(iter(states.values())).shape[2] == (len(tokens) + 1 if traced else 32)
            new = [int(outputs["logits"][0, -1].argmax())]
            tokens += new
        assert tokens[len(prompt):] == want


# --- onnxruntime-extensions tokenizer graphs -----------------------------------------------------

def stdlib_sentences(count: int = 240) -> list[str]:
    """The first paragraphs of docstrings in the Python standard library, in file order (deterministic)."""
    seen, sentences = set(), []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=False)
            first = doc.split("\n\n")[0].strip() if doc else ""
            if 10 <= len(first) <= 400 and first not in seen:
                seen.add(first)
                sentences.append(first)
                if len(sentences) == count:
                    return sentences
    return sentences


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    texts = stdlib_sentences()
    assert len(texts) >= 200
    return texts + ["", "  leading and trailing  ", "tabs\tand\nnew lines", "naïve café — 東京 🙂", "x=1+2**3"]


def _sessions(directory: Path):
    from onnxruntime_extensions import get_library_path

    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return [ort.InferenceSession(str(directory / name), options, providers=["CPUExecutionProvider"])
            for name in ("tokenizer.onnx", "detokenizer.onnx")]


def _roundtrip(tokenize, detokenize, text: str) -> tuple[list[int], str]:
    # one text: byte-level BPE gives input_ids [1, n] (int64), SentencePiece a flat ragged tokens [n] (int32)
    ids = [int(i) for i in tokenize.run(None, {tokenize.get_inputs()[0].name: np.array([text])})[0].reshape(-1)]
    if not ids:  # extensions 0.15's BpeDecoder dies (SIGFPE) on zero ids: a host must not call it with none
        return ids, ""
    decoded = detokenize.run(None, {detokenize.get_inputs()[0].name: np.array(ids, np.int64)})[0]
    return ids, str(decoded.reshape(-1)[0])


def test_onnx_tokenizer_equals_hugging_face_byte_level_bpe(sentences, tmp_path):
    from transformers import AutoTokenizer

    result = run_cli("deploy", "tokenizer", str(FIXTURE), "-o", str(tmp_path / "tok"))  # the trained fixture's
    assert result.returncode == 0, result.stderr
    tokenize, detokenize = _sessions(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(FIXTURE)
    for text in sentences:
        ids, decoded = _roundtrip(tokenize, detokenize, text)
        # the graph's ids are the model's without the template's BOS (the host prepends it)
        assert ids == hf(text, add_special_tokens=False).input_ids, text
        assert decoded == hf.decode(ids) == text, text


def test_onnx_tokenizer_equals_hugging_face_sentencepiece(sentences, tmp_path):
    """A T5-style (Unigram) SentencePiece tokenizer trained here; transformers reads its model into tokenizer.json,
    extensions' op runs the SentencePiece model itself."""
    from transformers import T5Tokenizer

    from moerun.deploy.tokenizer_onnx import export_tokenizer

    spm_dir = train_sentencepiece(tmp_path / "spm", "spiece.model", vocab_size=400, model_type="unigram",
                                  pad_id=0, eos_id=1, unk_id=2, bos_id=-1)  # T5's special ids
    t5_tokenizer = T5Tokenizer.from_pretrained(spm_dir)
    model_dir = tmp_path / "t5"
    t5_tokenizer.save_pretrained(model_dir)
    shutil.copy(spm_dir / "spiece.model", model_dir / "spiece.model")  # transformers 5 saves tokenizer.json only
    export_tokenizer(model_dir, tmp_path / "tok")
    tokenize, detokenize = _sessions(tmp_path / "tok")
    decoded_compared = 0
    for text in sentences:
        ids, decoded = _roundtrip(tokenize, detokenize, text)
        assert ids == t5_tokenizer(text).input_ids, text  # pieces then </s>, as T5's template
        if t5_tokenizer.unk_token_id not in ids:  # unknown characters: SentencePiece decodes " ⁇ ", transformers drops
            assert decoded == t5_tokenizer.decode(ids, skip_special_tokens=True), text
            decoded_compared += 1
    assert decoded_compared >= 200


def test_tokenizers_extensions_cannot_express_say_why(nllb_tokenizer, tmp_path):
    nllb_tokenizer.save_pretrained(tmp_path / "nllb")
    result = run_cli("deploy", "tokenizer", str(tmp_path / "nllb"), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "language code" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- onnxruntime-genai ---------------------------------------------------------------------------

def test_deploy_genai_refuses_what_genai_cannot_run(seq2seq_converted, exports, tmp_path):
    result = run_cli("deploy", "genai", str(seq2seq_converted["switch"]), "-o", str(tmp_path / "g"))
    assert result.returncode == 1 and "Whisper" in result.stderr and not (tmp_path / "g").exists()
    assert len(result.stderr.strip().splitlines()) == 1
    from moerun.deploy.genai import export_genai_dir
    from moerun.runtime.errors import MoerunError

    with pytest.raises(MoerunError, match="overwrite the checkpoint"):
        export_genai_dir(exports["fp32"], exports["fp32"] / "inside")
    assert not (exports["fp32"] / "inside").exists()


def test_genai_config_follows_the_graph(exports, tmp_path):
    from moerun.deploy.genai import genai_config

    for name, shared in (("fp32", True), ("traced", False)):
        config = genai_config(exports[name])
        graph = onnx.load(str(exports[name] / "model.onnx"), load_external_data=False).graph
        inputs = {v.name for v in graph.input} - {t.name for t in graph.initializer}  # genai feeds the required
        decoder = config["model"]["decoder"]
        assert config["search"]["past_present_share_buffer"] is shared
        assert ("position_ids" in decoder["inputs"]) == ("position_ids" in inputs)
        layers = decoder["num_hidden_layers"]
        names = [decoder["inputs"][k] % i for i in range(layers) for k in ("past_key_names", "past_value_names")]
        assert set(names) | {"input_ids", "attention_mask"} | ({"position_ids"} & inputs) == inputs
        past = next(v for v in graph.input if v.name == names[0]).type.tensor_type.shape.dim
        assert (past[1].dim_value, past[3].dim_value) == (decoder["num_key_value_heads"], decoder["head_size"])


# Not slow-marked: the issue asks for it in CI when it fits. It builds onnxruntime-genai's own venv on first use
# (measured: 65 s, torch from local disk, onnxruntime-genai from PyPI), then ~30 s.
def test_onnxruntime_genai_generates_moeruns_tokens(tiny_exports, tmp_path):
    from moerun.genai import genai_python

    python = genai_python()
    assert inspect_model(tiny_exports["int4"]).min_onnxruntime == "1.31"  # block-wise QMoE with accuracy_level
    for name in ("fp32", "traced", "int4"):
        expected = MoEModel.load(tiny_exports[name], provider="cpu", threads=2).generate_ids(PROMPTS, 8)
        result = run_cli("deploy", "genai", str(tiny_exports[name]), "-o", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        # right-padded only: genai masks trailing pad tokens and treats leading ones as tokens (measured: its
        # left-padded prefill logits equal a run with the pads unmasked, 1.55 away from moerun's masked ones)
        proc = subprocess.run([str(python), str(GENAI_WORKER), str(tmp_path / name), json.dumps(PROMPTS), "8",
                               "right"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        tokens = json.loads(proc.stdout.strip().splitlines()[-1])
        assert [row[:len(want)] for row, want in zip(tokens, expected)] == expected, name



# Hybrid models: layers whose states genai must carry between steps itself (genai's hybrid contract).
HYBRID_PROMPTS = [[1, 45, 67, 89, 100, 120, 7, 9, 11], [1, 30, 5], [1, 7, 8, 9, 10, 11]]


def _moerun_runs(model: MoEModel, prompt: list[int], tokens: list[int], names: list[str]) -> dict[str, list]:
    """moerun's runtime on the same tokens, the states passed back by hand: the last position's logits and the
    named presents after the prefill and after each generated token but the last (what genai_greedy.py records)."""
    runs: dict[str, list] = {name: [] for name in names}
    ids, past = np.array([prompt]), None
    for step in range(len(tokens)):
        length = len(prompt) + step
        positions = np.arange(length - ids.shape[1], length)[None]
        logits, past = model.forward(ids, np.ones((1, length), np.int64), positions, past=past)
        for name in names:
            runs[name].append(logits[:, -1] if name == "logits" else past[model.runner.present_names.index(name)])
        ids = np.array([[tokens[step]]])
    return runs


def _assert_genai_carries_states(model_dir: Path, prompts: list[list[int]], outputs: list[str], out: Path) -> None:
    """Deploy, then per prompt (one per generator): genai's greedy tokens equal `generate_ids`, and after the prefill
    and each generated token genai's named outputs equal moerun's runtime fed the same tokens, within 1e-5."""
    from moerun.genai import genai_python

    python = genai_python()
    model = MoEModel.load(model_dir, provider="cpu", threads=2)
    expected = model.generate_ids(prompts, 8)
    result = run_cli("deploy", "genai", str(model_dir), "-o", str(out))
    assert result.returncode == 0, result.stderr
    for prompt, want in zip(prompts, expected):
        proc = subprocess.run([str(python), str(GENAI_WORKER), str(out), json.dumps([prompt]), "8", "right",
                               ",".join(outputs)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        # genai stops on an end-of-sequence token without returning it; generate_ids returns it
        assert got["tokens"][0] == (want[:-1] if want[-1] in model.manifest.eos_token_id else want), (out, prompt)
        ours = _moerun_runs(model, prompt, want, outputs)
        for name in outputs:
            assert len(got["runs"][name]) == len(ours[name]) == len(want), name
            worst = max(float(np.abs(np.asarray(g) - o).max()) for g, o in zip(got["runs"][name], ours[name]))
            assert worst < 1e-5, (out, prompt, name, worst)


def test_onnxruntime_genai_carries_lfm2_moe_states(lfm2_moe_exports, tmp_path):
    """genai loads the deployed hybrid model and carries its convolution states itself: greedy tokens equal
    `generate_ids`, and at every step genai's logits and each conv layer's present state equal moerun's runtime fed
    the same tokens, within 1e-5 (measured 0.0: the same kernels). A state lost between steps differs by 0.12-0.16
    in the states and only 7.8e-4 in the logits: tokens alone would not show it. One prompt per generator, so
    that genai's outputs can be compared row for row with moerun's; right-padded batches are checked against each
    prompt alone on the graph itself (tests/test_hybrid_families.py)."""
    for name in ("fp32", "int4"):
        layer_types = MoEModel.load(lfm2_moe_exports[name], provider="cpu").manifest.layer_types
        conv = [f"present.{i}.conv" for i, kind in enumerate(layer_types) if kind == "conv"]
        assert conv == ["present.0.conv", "present.1.conv", "present.3.conv"]
        _assert_genai_carries_states(lfm2_moe_exports[name], HYBRID_PROMPTS, ["logits", *conv], tmp_path / name)
        decoder = json.loads((tmp_path / name / "genai_config.json").read_text())["model"]["decoder"]
        assert decoder["layer_types"] == layer_types and decoder["conv_cache_size"] == 2
        assert decoder["outputs"]["present_conv_names"] == "present.%d.conv"


# (module, build argument, the stateful layer) of the Gated DeltaNet and Mamba families' tiny seeded models
STATE_FAMILIES = {"Qwen3-Next": ("test_deltanet_families", "Qwen3-Next", 0),
                  "Qwen3.5-MoE": ("test_deltanet_families", "Qwen3.5-MoE", 0),
                  "Granite-MoE-hybrid": ("test_mamba_families", "Granite-MoE-hybrid", 0),
                  "Jamba": ("test_mamba_families", "Jamba", 1)}


# Slow: each export takes ~40 s (tests/test_deltanet_families.py and tests/test_mamba_families.py convert them too).
@pytest.mark.slow
@pytest.mark.parametrize("family", list(STATE_FAMILIES))
def test_onnxruntime_genai_carries_linear_attention_and_mamba_states(family, tmp_path):
    """Gated DeltaNet (Qwen3-Next) and Mamba (Granite-MoE-hybrid: Mamba-2, Jamba: Mamba-1) layers, each with a
    convolution and a recurrent state, declared as genai's linear_attention: tokens, logits and the recurrent state
    as above, fp32 and int4. genai's get_output of present.{i}.conv on these layers is not what the graph wrote
    (values up to 1e35, measured), so the convolution state is checked through the logits: losing it between steps
    moves them by 0.77 (Qwen3-Next), 1.0e-2 (Granite), 7.7e-3 (Jamba) (measured)."""
    import importlib

    from moerun.converter.convert import convert
    from moerun.converter.quantize import QuantizeOptions, quantize_model

    module, argument, layer = STATE_FAMILIES[family]
    importlib.import_module(module).build(argument).save_pretrained(tmp_path / "ckpt")
    fp32 = convert(tmp_path / "ckpt", tmp_path / "fp32").output
    int4 = quantize_model(fp32, tmp_path / "int4", QuantizeOptions(bits=4, block_size=16)).output
    for name, model_dir in (("fp32", fp32), ("int4", int4)):
        out = tmp_path / f"genai-{name}"
        _assert_genai_carries_states(model_dir, HYBRID_PROMPTS, ["logits", f"present.{layer}.recurrent"], out)
        decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
        assert decoder["layer_types"][layer] == "linear_attention" and "conv_cache_size" not in decoder
        assert decoder["inputs"]["past_recurrent_names"] == "past.%d.recurrent"


def test_deploy_genai_refuses_state_kinds_genai_has_no_contract_for(lfm2_moe_exports, tmp_path):
    """A layer kind moerun does not map onto genai's (here a made-up RWKV layer) is refused before anything is
    written. (The CLI's one-line refusal is test_deploy_genai_refuses_what_genai_cannot_run's.)"""
    from moerun.deploy.genai import export_genai_dir
    from moerun.runtime.errors import UnsupportedModelError

    source = tmp_path / "rwkv"
    source.mkdir()
    manifest = json.loads((lfm2_moe_exports["fp32"] / "moerun.json").read_text())
    manifest["layer_types"] = ["rwkv" if kind == "conv" else kind for kind in manifest["layer_types"]]
    manifest["states"] = {"rwkv": {"wkv": [4, 16, 16]}}
    (source / "moerun.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedModelError, match="rwkv layers: moerun maps conv, linear_attention, mamba layers"):
        export_genai_dir(source, tmp_path / "g")
    assert not (tmp_path / "g").exists()
