"""Read a fairseq MoE translation checkpoint (NLLB-MoE style) into Hugging Face NLLB-MoE's layout.

fairseq writes ``<name>-shared.pt`` (everything but the experts) and ``<name>-rank-N.pt`` per rank
(the experts of that rank, numbered locally from 0). Each file is a pickle holding the state dict
under "model" and the training config beside it: ``args`` (argparse.Namespace) or ``cfg``
(omegaconf). Files are read with ``torch.load(weights_only=True)``: tensors, plus an allow-list of
the config classes, which are rebuilt as inert stand-ins (omegaconf need not be installed);
anything else in a pickle is refused, never executed.

Written by hand: transformers ships a one-off conversion script for the released NLLB-MoE, not a
library function, and it needs fairseq's full pickles.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from pathlib import Path

import torch

from ..runtime.errors import CheckpointError

__all__ = ["load_fairseq_checkpoint"]

log = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"^(?P<name>.+)-rank-(?P<rank>\d+)\.pt$")


class _Inert:
    """Stand-in for an allow-listed config class: records its pickled state, runs nothing."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.state = args, dict(kwargs)

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {"state": state}


def _stand_in(path: str) -> tuple[type, str]:
    return type(path.rpartition(".")[2], (_Inert,), {"__module__": "moerun.fairseq_stand_in"}), path


# What fairseq pickles beside the weights: argparse args, or an omegaconf config tree.
_OMEGACONF = [
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.EnumNode", "omegaconf.nodes.ValueNode", "typing.Any",
]
_ALLOWED = [argparse.Namespace, *(_stand_in(name) for name in _OMEGACONF)]


def _load(file: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = found.group(1) if found else "an object"
        raise CheckpointError(f"refusing to unpickle {what} from {file}: "
                              "not a tensor or a known fairseq config object") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{file}: no state dict under 'model'; not a fairseq checkpoint")
    return data


def _files(path: Path) -> tuple[Path, list[Path]]:
    """The shared file and the rank files, in rank order."""
    if path.is_file():
        if not path.name.endswith("-shared.pt"):
            raise CheckpointError(f"{path}: expected the <name>-shared.pt file of a fairseq MoE checkpoint")
        shared = path
    elif path.is_dir():
        found = sorted(path.glob("*-shared.pt"))
        if len(found) != 1:
            raise CheckpointError(f"{path}: expected one <name>-shared.pt file, found {len(found)}")
        shared = found[0]
    else:
        raise CheckpointError(f"{path}: no such fairseq checkpoint")
    name = shared.name[: -len("-shared.pt")]
    ranks = {}
    for f in shared.parent.glob(f"{name}-rank-*.pt"):
        m = _RANK_FILE.match(f.name)
        if m and m.group("name") == name:
            ranks[int(m.group("rank"))] = f
    if not ranks:
        raise CheckpointError(f"{shared.parent}: no {name}-rank-N.pt files (the experts) beside {shared.name}")
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        listed = ", ".join(f"{name}-rank-{r}.pt" for r in missing)
        raise CheckpointError(f"{shared.parent}: rank files missing: {listed}")
    return shared, [ranks[r] for r in sorted(ranks)]


def _plain(obj):
    """An omegaconf stand-in tree (or a Namespace) as plain dicts, lists and values."""
    if isinstance(obj, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, _Inert):
        state = obj.state.get("__dict__", obj.state)
        if "_content" in state:
            return _plain(state["_content"])
        if "_val" in state:
            return _plain(state["_val"])
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _model_args(data: dict, file: Path) -> dict:
    if data.get("args") is not None:
        return _plain(data["args"])
    cfg = _plain(data.get("cfg"))
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"]
    raise CheckpointError(f"{file}: neither 'args' nor 'cfg.model' holds the model's configuration")


def _tied(shared: dict) -> bool:
    """fairseq's state dict lists the output projection even when it shares embed_tokens' weight (PyTorch lists
    a shared parameter under every name): tied when the two hold the same values."""
    projection = shared.get("decoder.output_projection.weight")
    return projection is None or torch.equal(projection, shared["decoder.embed_tokens.weight"])


def _config(args: dict, shared: dict, file: Path):
    from transformers import NllbMoeConfig

    def need(key: str):
        if args.get(key) is None:
            raise CheckpointError(f"{file}: the checkpoint's config has no {key!r}")
        return args[key]

    if "decoder.embed_tokens.weight" not in shared:
        raise CheckpointError(f"{file}: no 'decoder.embed_tokens.weight' in its state dict; "
                              "not an NLLB-MoE-style fairseq translation checkpoint")
    vocab, d_model = shared["decoder.embed_tokens.weight"].shape
    freq = int(need("moe_freq"))
    config = NllbMoeConfig(
        vocab_size=vocab, d_model=d_model,
        encoder_layers=need("encoder_layers"), decoder_layers=need("decoder_layers"),
        encoder_ffn_dim=need("encoder_ffn_embed_dim"),
        decoder_ffn_dim=args.get("decoder_ffn_embed_dim") or need("encoder_ffn_embed_dim"),
        encoder_attention_heads=need("encoder_attention_heads"),
        decoder_attention_heads=args.get("decoder_attention_heads") or need("encoder_attention_heads"),
        num_experts=need("moe_expert_count"), encoder_sparse_step=freq, decoder_sparse_step=freq,
        max_position_embeddings=args.get("max_source_positions") or 1024,
        activation_function=args.get("activation_fn") or "relu",
        scale_embedding=not args.get("no_scale_embedding", False),
        second_expert_policy=args.get("moe_second_expert_policy") or "all",
        normalize_router_prob_before_dropping=bool(args.get("moe_normalize_gate_prob_before_dropping", False)),
        batch_prioritized_routing=bool(args.get("moe_batch_prioritized_routing", False)),
        moe_eval_capacity_token_fraction=args.get("moe_eval_capacity_token_fraction") or 1.0,
        # fairseq scales every expert's output by 1 - moe_eom at inference (moe_layer.py; default 0.0)
        moe_token_dropout=float(args.get("moe_eom") or 0.0),
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        tie_word_embeddings=_tied(shared),
    )
    config.architectures = ["NllbMoeForConditionalGeneration"]
    return config


_RENAMES = [  # fairseq -> Hugging Face NLLB-MoE, applied in order to names under encoder./decoder.
    (re.compile(r"\.moe_layer\.gate\.wg\."), ".ffn.router.classifier."),
    (re.compile(r"\.encoder_attn_layer_norm\."), ".cross_attention_layer_norm."),
    (re.compile(r"\.encoder_attn\."), ".cross_attention."),
    (re.compile(r"(layers\.\d+)\.final_layer_norm\."), r"\1.ff_layer_norm."),
    (re.compile(r"(layers\.\d+)\.fc([12])\."), r"\1.ffn.fc\2."),
]
_DROPPED = re.compile(r"(\.version$|embed_positions\._float_tensor$)")
_EXPERT = re.compile(r"\.moe_layer\.experts\.(\d+)\.")


def _rename(key: str, expert_offset: int = 0) -> str | None:
    if _DROPPED.search(key):
        return None
    if key == "decoder.output_projection.weight":
        return "lm_head.weight"
    m = _EXPERT.search(key)
    if m:
        key = _EXPERT.sub(f".ffn.experts.expert_{int(m.group(1)) + expert_offset}.", key)
    for pattern, new in _RENAMES:
        key = pattern.sub(new, key)
    return f"model.{key}"


def load_fairseq_checkpoint(path: str | Path):
    """(NllbMoeConfig, state dict in NllbMoeForConditionalGeneration's names) of a fairseq MoE checkpoint."""
    shared_file, rank_files = _files(Path(path))
    log.info("reading %s", shared_file)
    shared = _load(shared_file)
    weights = shared["model"]
    config = _config(_model_args(shared, shared_file), weights, shared_file)
    state = {}
    for key, tensor in weights.items():
        if "expert" in key and "moe_layer.experts" in key:
            raise CheckpointError(f"{shared_file}: holds expert weights ({key}); expected them in the rank files")
        name = _rename(key)
        if name is not None:
            state[name] = tensor
    state["model.shared.weight"] = state.pop("model.decoder.embed_tokens.weight")
    if config.tie_word_embeddings:  # one table: the encoder's, decoder's and the output projection are it
        state.pop("model.encoder.embed_tokens.weight", None)
        state.pop("lm_head.weight", None)
    else:  # Hugging Face then gives the encoder and the decoder tables of their own
        state.setdefault("model.encoder.embed_tokens.weight", state["model.shared.weight"])
        state["model.decoder.embed_tokens.weight"] = state["model.shared.weight"]
    per_rank = None
    for rank, file in enumerate(rank_files):
        log.info("reading %s", file)
        experts = _load(file)["model"]
        local = {int(m.group(1)) for k in experts for m in [_EXPERT.search(k)] if m}
        if per_rank is None:
            per_rank = len(local)
        if len(local) != per_rank or not local:
            raise CheckpointError(f"{file}: {len(local)} local experts, rank 0 has {per_rank}")
        for key, tensor in experts.items():
            name = _rename(key, rank * per_rank)
            if name is not None:
                state[name] = tensor
    if per_rank * len(rank_files) != config.num_experts:
        raise CheckpointError(f"{shared_file.parent}: {len(rank_files)} ranks x {per_rank} experts, "
                              f"but the config says moe_expert_count={config.num_experts}")
    return config, state
