"""A fairseq MoE translation checkpoint as fairseq's own training code writes it, converted with
`moerun convert --source fairseq`; the oracle is Hugging Face NLLB-MoE holding the same weights.

tests/test_fairseq.py writes its files with moerun's inverse mapping; here every key, nesting and
argument name is reproduced from facebookresearch/fairseq, branch `nllb` (the code NLLB-200's MoE was
trained with; branch `moe` writes the same layout):

- fairseq/trainer.py, ``Trainer.state_dict`` and ``Trainer.save_checkpoint``: an MoE model's state is
  split by ``moe_checkpoint_utils.split_shared_and_expert_states`` (a parameter whose name holds
  "expert" goes to the rank's file, everything else to the shared file, written by the data-parallel
  master); each file holds ``{"args": None, "cfg": OmegaConf.to_container(cfg), "model", "criterion",
  "optimizer_history", "task_state", "extra_state", "last_optimizer_state"}``; ``utils.move_to_cpu``
  casts fp16 weights to fp32 unless training ran with ``--memory-efficient-fp16``.
- fairseq/dataclass/utils.py, ``convert_namespace_to_omegaconf``: for a legacy architecture
  (``transformer``) ``cfg.model`` (and task, criterion, optimizer, lr_scheduler) is an
  ``argparse.Namespace`` of the whole command line; fairseq/file_io.py ``torch_load_cpu`` reads
  ``state["cfg"]["common"]["fp16"]``.
- fairseq/distributed/utils.py, ``distributed_init``: an MoE run's checkpoint suffix is
  ``-rank-{rank}``; fairseq/checkpoint_utils.py ``save_checkpoint`` names the shared file by replacing
  ``rank-N`` with ``shared``, copies checkpoint_last from checkpoint_best's files, and
  ``torch_persistent_save`` writes ``<file>.tmp`` with ``torch.save`` and renames it.
- fairseq/models/transformer/transformer_{encoder,decoder}.py, fairseq/modules/transformer_layer.py,
  multihead_attention.py, moe/moe_layer.py, moe/top2gate.py: the module tree and its order
  (``version`` buffers, ``embed_positions._float_tensor``, ``moe_layer.gate.wg``,
  ``moe_layer.experts.{i}``, ``output_projection`` tied to ``embed_tokens``); layer i is MoE when
  ``(i + 1) % moe_freq == 0``; ``make_experts``: each rank builds its own ``moe_expert_count //
  world_size`` experts, numbered from 0 (``merge_multi_local_expert_states`` renumbers them globally).
- examples/nllb/modeling/sweep/sweep_mmt.py: the MoE arguments NLLB-200 was trained with.
- fairseq/modules/moe/moe_layer.py: at inference every expert output is scaled by ``1 - moe_eom``
  (expert output masking; NLLB-200's MoE used 0.2, fairseq's default is 0.0).
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch

from conftest import random_sources, run_cli, tiny_nllb_moe
from moerun import MoEModel

WORLD_SIZE = 2  # training ranks; 4 experts: 2 per rank


def fairseq_args(config, memory_efficient_fp16: bool, moe_eom: float) -> argparse.Namespace:
    """The command line's Namespace, with fairseq's own argument names (NLLB-200's MoE sweep)."""
    return argparse.Namespace(
        # task and data
        task="translation_multi_simple_epoch", langs="eng_Latn,fra_Latn", lang_pairs="eng_Latn-fra_Latn",
        encoder_langtok="src", decoder_langtok=True, sampling_method="temperature", sampling_temperature=1.0,
        max_tokens=4096, update_freq=[1], seed=2, fp16=True, memory_efficient_fp16=memory_efficient_fp16,
        ddp_backend="legacy_ddp", distributed_world_size=WORLD_SIZE,
        # optimization
        criterion="moe_label_smoothed_cross_entropy", label_smoothing=0.1, moe_gate_loss_wt=0.01,
        moe_gate_loss_combine_method="sum", optimizer="adam", adam_betas="(0.9, 0.98)", adam_eps=1e-06,
        weight_decay=0.0, clip_norm=0.0, lr=[0.002], lr_scheduler="inverse_sqrt", warmup_updates=8000,
        warmup_init_lr=1e-07, max_update=300000,
        # model: fairseq's transformer, pre-norm, shared embeddings (TransformerConfig's legacy names)
        arch="transformer", encoder_embed_dim=config.d_model, decoder_embed_dim=config.d_model,
        encoder_ffn_embed_dim=config.encoder_ffn_dim, decoder_ffn_embed_dim=config.decoder_ffn_dim,
        encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.encoder_attention_heads,
        decoder_attention_heads=config.decoder_attention_heads, encoder_normalize_before=True,
        decoder_normalize_before=True, encoder_learned_pos=False, decoder_learned_pos=False,
        share_all_embeddings=True, share_decoder_input_output_embed=True, no_scale_embedding=False,
        layernorm_embedding=False, no_token_positional_embeddings=False, activation_fn="relu", dropout=0.1,
        attention_dropout=0.1, activation_dropout=0.0, max_source_positions=config.max_position_embeddings,
        max_target_positions=config.max_position_embeddings, checkpoint_activations=False,
        alternate_ffn_embed_dim=0, alternate_decoder_ffn_embed_dim=0,
        # MoE (sweep_mmt.py's grid; TransformerConfig's defaults for what it leaves out)
        moe_freq=config.encoder_sparse_step, encoder_moe_freq=0, decoder_moe_freq=0,
        moe_expert_count=config.num_experts, moe_gating_use_fp32=True, moe_second_expert_policy="all",
        moe_normalize_gate_prob_before_dropping=False, moe_eval_capacity_token_fraction=1.0,
        moe_normalize_expert_grad="sqrt_world_size", use_moe_pad_mask=True, moe_batch_prioritized_routing=False,
        moe_top1_expert=False, moe_expert_ffn_dim=None, moe_local_drop=0.0, moe_eom=moe_eom, moe_fom=0.0,
        moe_cmr=False, use_tutel_moe=False,
    )


def fairseq_cfg(args: argparse.Namespace, rank: int) -> dict:
    """``OmegaConf.to_container(cfg)`` of the trainer's config on ``rank``: plain dicts, and the legacy
    sections as Namespaces of the whole command line."""
    def section(name: str) -> argparse.Namespace:
        namespace = argparse.Namespace(**vars(args))
        namespace._name = name
        return namespace

    return {
        "_name": None,
        "common": {"fp16": args.fp16, "memory_efficient_fp16": args.memory_efficient_fp16, "seed": args.seed,
                   "fp16_init_scale": 128, "log_format": "json", "log_interval": 100},
        "distributed_training": {"distributed_world_size": WORLD_SIZE, "distributed_rank": rank,
                                 "ddp_backend": args.ddp_backend, "use_sharded_state": False},
        "checkpoint": {"save_dir": "checkpoints", "checkpoint_suffix": f"-rank-{rank}",
                       "best_checkpoint_metric": "nll_loss", "no_save_optimizer_state": False},
        "optimization": {"max_update": args.max_update, "lr": args.lr, "update_freq": args.update_freq},
        "model": section(args.arch), "task": section(args.task), "criterion": section(args.criterion),
        "optimizer": section(args.optimizer), "lr_scheduler": section(args.lr_scheduler),
        "bpe": None, "tokenizer": None,
    }


def fairseq_model_state(hf, rank: int) -> OrderedDict:
    """``model.state_dict()`` of fairseq's TransformerModel on ``rank`` (its own experts only, numbered
    from 0), holding ``hf``'s weights: fairseq's module names, in the order its modules register them."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    local = hf.config.num_experts // WORLD_SIZE

    def linear(prefix: str, module, bias: bool = True) -> None:
        state[f"{prefix}.weight"] = module.weight
        if bias:
            state[f"{prefix}.bias"] = module.bias

    def attention(prefix: str, module) -> None:  # MultiheadAttention registers k, v, q, then out
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            linear(f"{prefix}.{proj}", getattr(module, proj))

    def feed_forward(prefix: str, ffn) -> None:
        if hasattr(ffn, "router"):  # MOELayer: the gate, then this rank's experts
            linear(f"{prefix}.moe_layer.gate.wg", ffn.router.classifier, bias=False)
            for i in range(local):
                expert = ffn.experts[f"expert_{rank * local + i}"]
                linear(f"{prefix}.moe_layer.experts.{i}.fc1", expert.fc1)
                linear(f"{prefix}.moe_layer.experts.{i}.fc2", expert.fc2)
        else:
            linear(f"{prefix}.fc1", ffn.fc1)
            linear(f"{prefix}.fc2", ffn.fc2)

    def positions(prefix: str) -> None:  # SinusoidalPositionalEmbedding's placeholder buffer
        state[f"{prefix}.embed_positions._float_tensor"] = torch.zeros(1)

    embeddings = hf.model.shared.weight
    state["encoder.version"] = torch.Tensor([3])
    state["encoder.embed_tokens.weight"] = embeddings
    positions("encoder")
    for i, layer in enumerate(hf.model.encoder.layers):
        p = f"encoder.layers.{i}"
        attention(f"{p}.self_attn", layer.self_attn)
        linear(f"{p}.self_attn_layer_norm", layer.self_attn_layer_norm)
        feed_forward(p, layer.ffn)
        linear(f"{p}.final_layer_norm", layer.ff_layer_norm)
    linear("encoder.layer_norm", hf.model.encoder.layer_norm)
    state["decoder.version"] = torch.Tensor([3])
    state["decoder.embed_tokens.weight"] = embeddings
    positions("decoder")
    for i, layer in enumerate(hf.model.decoder.layers):
        p = f"decoder.layers.{i}"
        attention(f"{p}.self_attn", layer.self_attn)
        linear(f"{p}.self_attn_layer_norm", layer.self_attn_layer_norm)
        attention(f"{p}.encoder_attn", layer.cross_attention)
        linear(f"{p}.encoder_attn_layer_norm", layer.cross_attention_layer_norm)
        feed_forward(p, layer.ffn)
        linear(f"{p}.final_layer_norm", layer.ff_layer_norm)
    linear("decoder.layer_norm", hf.model.decoder.layer_norm)
    state["decoder.output_projection.weight"] = embeddings  # share_decoder_input_output_embed
    return OrderedDict((k, v.detach()) for k, v in state.items())


def _is_expert(name: str) -> bool:  # split_shared_and_expert_states' test
    return "expert" in name and "expert_centroids" not in name


def fairseq_optimizer_state(model_state: OrderedDict, memory_efficient_fp16: bool) -> tuple[dict, dict]:
    """(shared, expert) halves of Adam's state dict as split_shared_and_expert_states splits them."""
    params, seen = [], set()
    for name, tensor in model_state.items():  # model.parameters(): buffers out, tied weights once
        if name.endswith((".version", "._float_tensor")) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        params.append(name)
    groups = [{"lr": 0.002, "betas": (0.9, 0.98), "eps": 1e-06, "weight_decay": 0.0, "amsgrad": False,
               "params": list(range(len(params)))}]
    state = {i: {"step": 1000, "exp_avg": torch.zeros(model_state[n].shape),
                 "exp_avg_sq": torch.zeros(model_state[n].shape)} for i, n in enumerate(params)}
    halves = []
    for expert in (False, True):
        half = {"param_groups": groups, "state": {i: s for i, s in state.items() if _is_expert(params[i]) == expert}}
        if memory_efficient_fp16:
            half["loss_scale"] = 64.0
        halves.append(half)
    return halves[0], halves[1]


def torch_persistent_save(obj: dict, filename: str) -> None:
    """checkpoint_utils.torch_persistent_save on a local path: torch.save to .tmp, then rename."""
    with open(filename + ".tmp", "wb") as f:
        torch.save(obj, f)
    os.replace(filename + ".tmp", filename)


def save_like_fairseq(hf, directory, memory_efficient_fp16: bool, moe_eom: float) -> None:
    """What every rank of an MoE training run writes at a checkpoint: checkpoint_best-{rank-N,shared}.pt,
    copied to checkpoint_last-*.pt."""
    directory.mkdir(parents=True)
    args = fairseq_args(hf.config, memory_efficient_fp16, moe_eom)
    for rank in range(WORLD_SIZE):
        model = fairseq_model_state(hf, rank)
        if memory_efficient_fp16:  # --fp16 halves the model; move_to_cpu(cast_to_fp32=False) keeps it so
            halved: dict[int, torch.Tensor] = {}  # tied weights stay one tensor
            model = OrderedDict((k, halved.setdefault(id(v), v.half())) for k, v in model.items())
        shared_optim, expert_optim = fairseq_optimizer_state(model, memory_efficient_fp16)
        files = [(f"checkpoint_best-rank-{rank}.pt", OrderedDict((k, v) for k, v in model.items() if _is_expert(k)),
                  expert_optim)]
        if rank == 0:  # the data-parallel master also writes the shared state
            files.append(("checkpoint_best-shared.pt",
                          OrderedDict((k, v) for k, v in model.items() if not _is_expert(k)), shared_optim))
        for name, model_state, optimizer_state in files:
            torch_persistent_save({
                "args": None,
                "cfg": fairseq_cfg(args, rank),
                "model": model_state,
                "criterion": None,
                "optimizer_history": [{"criterion_name": "MoELabelSmoothedCrossEntropyCriterion",
                                       "optimizer_name": "MemoryEfficientFP16Optimizer" if memory_efficient_fp16
                                       else "FP16Optimizer", "lr_scheduler_state": {"best": 4.25},
                                       "num_updates": 1000}],
                "task_state": {},
                "extra_state": {
                    "metrics": OrderedDict(default=[(0, "loss", "AverageMeter",
                                                     {"val": 4.3, "sum": 43.0, "count": 10, "round": 3})]),
                    "previous_training_time": 1234.5,
                    "train_iterator": {"version": 2, "epoch": 3, "iterations_in_epoch": 0, "shuffle": True},
                    "val_loss": 4.25, "best": 4.25,
                },
                "last_optimizer_state": optimizer_state,
            }, str(directory / name))
            shutil.copyfile(directory / name, directory / name.replace("checkpoint_best", "checkpoint_last"))


def fp16_trained_nllb_moe(moe_eom: float):
    """The oracle: a tiny NLLB-MoE whose weights are fp16 values (fairseq --fp16 trains a halved model), in
    fp32, computing as fairseq does at inference (experts scaled by 1 - moe_eom)."""
    hf = tiny_nllb_moe(seed=11, scale_embedding=True, moe_token_dropout=moe_eom)
    assert hf.lm_head.weight.data_ptr() == hf.model.shared.weight.data_ptr()  # as share_all_embeddings ties them
    with torch.no_grad():
        for param in hf.parameters():  # parameters only: the sinusoidal position table stays fp32, as in fairseq
            param.copy_(param.half().float())
    return hf


CASES = {  # name: (memory_efficient_fp16, moe_eom)
    "nllb-200": (False, 0.2),  # --fp16: weights saved in fp32; NLLB-200's expert output masking
    "memory-efficient-fp16": (True, 0.2),  # the moe branch's recipe: weights saved in fp16
    "no-expert-output-masking": (False, 0.0),  # fairseq's default --moe-eom
}

# What these cases caught when written (all fixed): fairseq's state dict lists decoder.output_projection.weight
# although it is tied to embed_tokens (the importer untied the head and lost the encoder's table); --moe-eom was
# not read (expert outputs scaled by 0.8 where fairseq scales by 1 - moe_eom); the expert output scale was
# folded into fc2 in fp16 for fp16 files (1.5e-4 off in the encoder output).


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_written_as_fairseq_writes_it_loads_every_tensor_in_place(case, tmp_path):
    from moerun.converter.fairseq import load_fairseq_checkpoint

    memory_efficient_fp16, moe_eom = CASES[case]
    hf = fp16_trained_nllb_moe(moe_eom)
    save_like_fairseq(hf, tmp_path / "checkpoints", memory_efficient_fp16, moe_eom)
    config, state = load_fairseq_checkpoint(tmp_path / "checkpoints" / "checkpoint_last-shared.pt")
    assert (config.num_experts, config.encoder_sparse_step, config.decoder_sparse_step) == (4, 2, 2)
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.vocab_size) == (32, 2, 2, 120)
    assert (config.encoder_ffn_dim, config.encoder_attention_heads, config.max_position_embeddings) == (48, 4, 128)
    assert config.scale_embedding and config.activation_function == "relu"
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (1, 2, 2)
    embeddings = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
    expected = {k: v for k, v in hf.state_dict().items() if k not in embeddings}
    assert set(expected) <= set(state) <= set(expected) | set(embeddings)
    dtype = torch.float16 if memory_efficient_fp16 else torch.float32
    for key, tensor in expected.items():
        assert state[key].dtype == dtype and torch.equal(state[key], tensor.to(dtype)), key
    assert torch.equal(state.get("lm_head.weight", state["model.shared.weight"]), state["model.shared.weight"])


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_written_as_fairseq_writes_it_translates_as_hugging_face(case, tmp_path):
    memory_efficient_fp16, moe_eom = CASES[case]
    hf = fp16_trained_nllb_moe(moe_eom)
    save_like_fairseq(hf, tmp_path / "checkpoints", memory_efficient_fp16, moe_eom)

    r = run_cli("convert", str(tmp_path / "checkpoints" / "checkpoint_best-shared.pt"), "--source", "fairseq",
                "-o", str(tmp_path / "onnx"))
    assert r.returncode == 0, r.stderr
    assert "NllbMoeForConditionalGeneration: 2 MoE layers" in r.stderr
    model = MoEModel.load(tmp_path / "onnx")

    c = hf.config
    sources = random_sources(c.vocab_size, c.eos_token_id, lengths=(7, 3, 11, 5, 9))
    width = max(map(len, sources))
    ids = torch.tensor([s + [c.pad_token_id] * (width - len(s)) for s in sources])
    mask = (ids != c.pad_token_id).long()
    with torch.no_grad():
        encoder = hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    assert np.abs(model.encode(sources).hidden_states - encoder)[mask.numpy().astype(bool)].max() < 1e-4
    for beams in (1, 2):
        with torch.no_grad():
            expected = hf.generate(input_ids=ids, attention_mask=mask, num_beams=beams, max_new_tokens=10,
                                   do_sample=False).tolist()
        expected = [row[: max(i for i, t in enumerate(row) if t != c.pad_token_id) + 1] for row in expected]
        assert model.translate_ids(sources, num_beams=beams, max_new_tokens=10) == expected, f"{beams} beams"
