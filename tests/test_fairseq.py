"""fairseq MoE checkpoints: written here from a tiny Hugging Face NLLB-MoE by the inverse mapping (as
fairseq lays them out: shared file + one file per rank, experts numbered locally), read back, converted.
The oracle is the model the checkpoint came from."""

from __future__ import annotations

import argparse
import os
import re
import sys
import types

import pytest
import torch

from conftest import random_sources, run_cli, tiny_nllb_moe
from moerun import MoEModel, MoerunError
from moerun.converter.fairseq import load_fairseq_checkpoint

RANKS, LOCAL = 2, 2  # 4 experts: 2 per rank


def to_fairseq(key: str) -> tuple[str, int | None]:
    """Hugging Face NLLB-MoE name -> (fairseq name, global expert index or None). The inverse mapping."""
    key = key.removeprefix("model.")
    expert = None
    m = re.search(r"\.ffn\.experts\.expert_(\d+)\.", key)
    if m:
        expert = int(m.group(1))
        key = key.replace(m.group(0), f".moe_layer.experts.{expert % LOCAL}.")
    key = key.replace(".ffn.router.classifier.", ".moe_layer.gate.wg.")
    key = key.replace(".cross_attention_layer_norm.", ".encoder_attn_layer_norm.")
    key = key.replace(".cross_attention.", ".encoder_attn.")
    key = key.replace(".ff_layer_norm.", ".final_layer_norm.")
    key = re.sub(r"\.ffn\.fc([12])\.", r".fc\1.", key)
    return key, expert


def fairseq_args(config) -> argparse.Namespace:
    return argparse.Namespace(
        arch="transformer", encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers,
        encoder_embed_dim=config.d_model, decoder_embed_dim=config.d_model,
        encoder_ffn_embed_dim=config.encoder_ffn_dim, decoder_ffn_embed_dim=config.decoder_ffn_dim,
        encoder_attention_heads=config.encoder_attention_heads, decoder_attention_heads=config.decoder_attention_heads,
        moe_expert_count=config.num_experts, moe_freq=config.encoder_sparse_step,
        max_source_positions=config.max_position_embeddings, activation_fn=config.activation_function,
        no_scale_embedding=not config.scale_embedding, moe_second_expert_policy="all",
        moe_normalize_gate_prob_before_dropping=False, moe_batch_prioritized_routing=False,
        moe_eval_capacity_token_fraction=1.0, share_all_embeddings=True, lr=[0.0004],
    )


def write_fairseq(model, directory, config_key: str = "args", config_value=None):
    """The model as fairseq's MoE checkpoint files; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    shared, ranks = {}, [{} for _ in range(RANKS)]
    for key, tensor in model.state_dict().items():
        if key in ("model.encoder.embed_tokens.weight", "lm_head.weight"):
            continue  # tied to the shared embedding, as fairseq's share_all_embeddings stores it once
        name, expert = to_fairseq(key)
        if name == "shared.weight":
            shared["encoder.embed_tokens.weight"] = shared["decoder.embed_tokens.weight"] = tensor.clone()
        elif expert is None:
            shared[name] = tensor.clone()
        else:
            ranks[expert // LOCAL][name] = tensor.clone()
    shared["encoder.version"] = torch.tensor([3.0])
    meta = {config_key: config_value if config_value is not None else fairseq_args(model.config)}
    torch.save({"model": shared, **meta, "optimizer_history": []}, directory / "ckpt-shared.pt")
    for r, state in enumerate(ranks):
        torch.save({"model": state, **meta}, directory / f"ckpt-rank-{r}.pt")
    return directory


@pytest.fixture(scope="module")
def original():
    return tiny_nllb_moe(seed=7)


def test_every_tensor_and_the_config_come_back(original, tmp_path):
    config, state = load_fairseq_checkpoint(write_fairseq(original, tmp_path / "fs"))
    assert (config.num_experts, config.encoder_sparse_step, config.d_model) == (4, 2, 32)
    tied = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
    expected = {k: v for k, v in original.state_dict().items() if k not in tied}
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


def test_converted_fairseq_checkpoint_translates_as_the_original(original, tmp_path):
    from moerun.converter.convert import convert

    out = convert(write_fairseq(original, tmp_path / "fs"), tmp_path / "onnx", source_format="fairseq").output
    sources = random_sources(original.config.vocab_size, 2, lengths=(7, 3, 11))
    width = max(map(len, sources))
    ids = torch.tensor([s + [1] * (width - len(s)) for s in sources])
    with torch.no_grad():
        expected = original.generate(input_ids=ids, attention_mask=(ids != 1).long(), num_beams=2,
                                     max_new_tokens=8, do_sample=False).tolist()
    expected = [r[: max(i for i, t in enumerate(r) if t != 1) + 1] for r in expected]
    assert MoEModel.load(out).translate_ids(sources, num_beams=2, max_new_tokens=8) == expected


def test_cli_converts_a_fairseq_checkpoint(original, tmp_path):
    r = run_cli("convert", str(write_fairseq(original, tmp_path / "fs") / "ckpt-shared.pt"), "--source", "fairseq",
                "-o", str(tmp_path / "onnx"), "--verify")
    assert r.returncode == 0, r.stderr
    assert "NllbMoeForConditionalGeneration: 2 MoE layers" in r.stderr


def test_omegaconf_cfg_is_read_without_omegaconf(original, tmp_path):
    """Newer fairseq stores `cfg` (omegaconf) instead of `args`: read through inert stand-ins."""
    classes = {}
    sys.modules.setdefault("omegaconf", types.ModuleType("omegaconf"))
    for module, name in (("omegaconf.dictconfig", "DictConfig"), ("omegaconf.nodes", "AnyNode")):
        mod = sys.modules.setdefault(module, types.ModuleType(module))
        classes[name] = type(name, (), {"__module__": module, "__qualname__": name})
        setattr(mod, name, classes[name])
    try:
        def node(value):
            n = classes["AnyNode"]()
            n.__dict__.update(_val=value, _metadata=None)
            return n

        def dictconfig(content):
            d = classes["DictConfig"]()
            d.__dict__.update(_content=content, _metadata=None, _parent=None)
            return d

        model_cfg = dictconfig({k: node(v) for k, v in vars(fairseq_args(original.config)).items()
                                if not isinstance(v, list)})
        cfg = dictconfig({"model": model_cfg, "task": dictconfig({"source_lang": node("eng_Latn")})})
        directory = write_fairseq(original, tmp_path / "fs", "cfg", cfg)
    finally:
        for module in ("omegaconf.dictconfig", "omegaconf.nodes", "omegaconf"):
            sys.modules.pop(module, None)
    config, state = load_fairseq_checkpoint(directory)
    assert config.num_experts == 4 and config.encoder_layers == original.config.encoder_layers
    assert torch.equal(state["model.encoder.layers.1.ffn.experts.expert_3.fc1.weight"],
                       original.state_dict()["model.encoder.layers.1.ffn.experts.expert_3.fc1.weight"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-marker",))


def test_a_forbidden_pickled_object_is_refused_not_run(original, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    directory = write_fairseq(original, tmp_path / "fs", "args", _Exploit())
    with pytest.raises(MoerunError, match=r"refusing to unpickle .*system"):
        load_fairseq_checkpoint(directory)
    r = run_cli("convert", str(directory), "--source", "fairseq", "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "refusing to unpickle" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned-marker").exists() and not (tmp_path / "out").exists()


def test_missing_rank_and_corrupt_files_are_one_line_errors(original, tmp_path):
    directory = write_fairseq(original, tmp_path / "fs")
    (directory / "ckpt-rank-0.pt").unlink()
    with pytest.raises(MoerunError, match="rank files missing: ckpt-rank-0.pt"):
        load_fairseq_checkpoint(directory)
    (directory / "ckpt-rank-0.pt").write_bytes(b"not a checkpoint")
    r = run_cli("convert", str(directory), "--source", "fairseq", "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "not a readable torch checkpoint" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("drop", ["model", "decoder.embed_tokens.weight"])
def test_a_shared_file_missing_a_key_is_a_one_line_error(original, tmp_path, drop):
    directory = write_fairseq(original, tmp_path / "fs")
    data = torch.load(directory / "ckpt-shared.pt", weights_only=False)  # written by this test
    del (data if drop == "model" else data["model"])[drop]
    torch.save(data, directory / "ckpt-shared.pt")
    with pytest.raises(MoerunError, match=re.escape(drop)):
        load_fairseq_checkpoint(directory)
    r = run_cli("convert", str(directory), "--source", "fairseq", "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert drop in r.stderr and not (tmp_path / "out").exists()
