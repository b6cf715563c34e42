"""A bad model directory or a bad request is one moerun error, on one line, that says what to do: never a
raw ONNX Runtime, tokenizer or Python error, and never a silent wrong answer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from moerun import MoEModel, MoerunError
from moerun.runtime.errors import ModelDirError

SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from moerun.converter.convert import convert
    from moerun.demo import build_demo_checkpoint

    root = tmp_path_factory.mktemp("errors")
    return convert(build_demo_checkpoint(root / "ckpt", seed=5, **SMALL), root / "onnx").output


@pytest.fixture(scope="module")
def model(model_dir):
    return MoEModel.load(model_dir, provider="cpu")


def _copy(model_dir, tmp_path, **changes):
    """A copy of the model directory with these manifest fields changed."""
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    manifest = json.loads((copy / "moerun.json").read_text())
    (copy / "moerun.json").write_text(json.dumps({**manifest, **changes}))
    return copy


def _one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


# --- the manifest is checked on load, and against the graph ------------------------------------

@pytest.mark.parametrize("changes,needles", [
    (dict(num_layers="2"), ["num_layers", "'2'"]),
    (dict(eos_token_id=2), ["eos_token_id"]),
    (dict(vocab_size=0), ["vocab_size"]),
    (dict(kind="decoder-only"), ["kind", "decoder", "seq2seq"]),
    (dict(attention="GQA"), ["attention", "gqa", "traced"]),
    (dict(dtype="bf16"), ["dtype", "fp32", "fp16"]),
    (dict(max_positions="1024"), ["max_positions"]),
    (dict(kind="seq2seq"), ["encoder_file"]),
])
def test_malformed_manifest_fields_are_named(model_dir, tmp_path, changes, needles):
    with pytest.raises(ModelDirError) as error:
        MoEModel.load(_copy(model_dir, tmp_path, **changes))
    _one_line(error, "moerun.json", *needles)


def test_manifest_that_is_not_an_object(model_dir, tmp_path):
    copy = _copy(model_dir, tmp_path)
    (copy / "moerun.json").write_text("[1, 2]")
    with pytest.raises(ModelDirError) as error:
        MoEModel.load(copy)
    _one_line(error, "JSON object")


@pytest.mark.parametrize("changes,needles", [
    (dict(num_layers=3), ["model.onnx", "num_layers 3", "2 layers"]),
    (dict(num_layers=1), ["model.onnx", "num_layers 1", "2 layers"]),
    (dict(attention="traced"), ["model.onnx", "position_ids"]),
    (dict(dtype="fp16"), ["model.onnx", "fp16", "tensor(float)"]),
    (dict(head_dim=8), ["model.onnx", "head_dim"]),
])
def test_manifest_that_contradicts_the_graph(model_dir, tmp_path, changes, needles):
    with pytest.raises(ModelDirError) as error:
        MoEModel.load(_copy(model_dir, tmp_path, **changes))
    _one_line(error, "re-convert", *needles)


def test_manifest_io_names_that_contradict_the_graph(model_dir, tmp_path):
    manifest = json.loads((model_dir / "moerun.json").read_text())
    with pytest.raises(ModelDirError) as error:
        MoEModel.load(_copy(model_dir, tmp_path, inputs=manifest["inputs"][:-2], outputs=manifest["outputs"][:-2]))
    _one_line(error, "inputs")


def test_max_positions_is_read(model_dir, tmp_path):
    assert MoEModel.load(_copy(model_dir, tmp_path, max_positions=64), provider="cpu").manifest.max_positions == 64


# --- requests are checked before any work --------------------------------------------------------

def test_empty_prompt_list(model):
    for call in (lambda: model.generate([]), lambda: model.generate_ids([])):
        with pytest.raises(MoerunError) as error:
            call()
        _one_line(error, "prompt list is empty")
    with pytest.raises(MoerunError) as error:
        model.generate_ids([[1, 2], []])
    _one_line(error, "prompt 1", "empty")


@pytest.mark.parametrize("ids", [[1, -3], [1, 384], [1, 10**12]])
def test_token_ids_outside_the_vocabulary(model, ids):
    with pytest.raises(MoerunError) as error:
        model.generate_ids([[1, 2], ids])
    _one_line(error, "prompt 1", str(ids[1]), "384")
    with pytest.raises(MoerunError) as error:
        model.forward(np.array([ids]))
    _one_line(error, str(ids[1]), "384")


@pytest.mark.parametrize("ids", [[1, 2.5], ["1"], [True], 7, "abc"])
def test_token_ids_that_are_not_integers(model, ids):
    with pytest.raises(MoerunError) as error:
        model.generate_ids([ids])
    _one_line(error, "prompt 0")


@pytest.mark.parametrize("value", [2.5, "3", True, 0, -1, None])
def test_max_new_tokens_must_be_a_positive_integer(model, value):
    with pytest.raises(MoerunError) as error:
        model.generate_ids([[1, 2]], max_new_tokens=value)
    _one_line(error, "max_new_tokens", repr(value))


@pytest.mark.parametrize("options", [dict(temperature="hot"), dict(top_k=2.5), dict(top_p=None), dict(seed=1.5)])
def test_sampling_options_of_the_wrong_type(model, options):
    with pytest.raises(MoerunError) as error:
        model.generate_ids([[1, 2]], do_sample=True, **options)
    _one_line(error, next(iter(options)))


@pytest.fixture
def limited(model_dir, tmp_path, monkeypatch):
    """The model with max_positions 16, whose decoder must not run on a request that does not fit."""
    m = MoEModel.load(_copy(model_dir, tmp_path, max_positions=16), provider="cpu")

    def must_not_run(*args, **kwargs):
        raise AssertionError("the request reached ONNX Runtime")

    monkeypatch.setattr(m.runner, "generate", must_not_run)
    monkeypatch.setattr(m.runner.session, "run", must_not_run)
    return m


def test_prompt_longer_than_max_positions(limited):
    with pytest.raises(MoerunError) as error:
        limited.generate_ids([[1, 2], [1] * 17], max_new_tokens=1)
    _one_line(error, "prompt 1", "17 tokens", "16")
    with pytest.raises(MoerunError) as error:
        limited.forward(np.ones((1, 17), dtype=np.int64))
    _one_line(error, "17", "16")


def test_prompt_plus_new_tokens_over_max_positions_fails_before_prefill(limited):
    with pytest.raises(MoerunError) as error:
        limited.generate_ids([[1] * 10], max_new_tokens=7)
    _one_line(error, "max_new_tokens", "16")


def test_onnx_runtime_failures_are_moerun_errors(model):
    with pytest.raises(MoerunError) as error:
        model.forward(np.array([[1, 2, 3, 4, 5]]), attention_mask=np.ones((1, 2), dtype=np.int64))
    _one_line(error, "ONNX Runtime")


def test_text_that_is_not_valid_unicode(model):
    with pytest.raises(MoerunError) as error:
        model.generate(["Hello", "caf\udce9"])
    _one_line(error, "prompt 1", "UTF-8")
    with pytest.raises(MoerunError) as error:
        model.generate([b"Hello"])
    _one_line(error, "prompt 0", "str")


@pytest.mark.parametrize("name,content", [("tokenizer.json", "{not json"), ("tokenizer.json", '{"version": 1}'),
                                          ("tokenizer_config.json", "{not json"), ("tokenizer_config.json", "[1]")])
def test_corrupt_tokenizer_files(model_dir, tmp_path, name, content):
    copy = _copy(model_dir, tmp_path)
    (copy / name).write_text(content)
    with pytest.raises(ModelDirError) as error:
        MoEModel.load(copy, provider="cpu")
    _one_line(error, name)


def test_one_string_gives_one_string(model):
    text = model.generate("Hello world", max_new_tokens=4)
    assert isinstance(text, str)
    assert model.generate(["Hello world"], max_new_tokens=4) == [text]
