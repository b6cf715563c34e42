"""NLLB-MoE: top-2 softmax routing renormalised over the two, ReLU experts with biases, MoE every
``sparse_step`` layers of an encoder-decoder translation model.

Expert capacity: at inference NLLB-MoE sets each expert's capacity to
``ceil(moe_eval_capacity_token_fraction * tokens)``; with the released value 1.0 it cannot bind
(a token's two experts differ, so no expert is asked for more than ``tokens`` slots). Below 1.0
(or with a fixed ``expert_capacity``) Hugging Face drops tokens depending on what else is in the
batch; moerun routes every token (the serving behaviour users want) and says so in the log.
"""

from __future__ import annotations

import logging
import types

import torch

from ...custom_ops import MoEAttributes
from ...runtime.errors import UnsupportedModelError
from . import register
from .seq2seq import CrossAttention, Seq2SeqAdapter

log = logging.getLogger(__name__)


def _experts_forward(self, hidden_states: torch.Tensor, router_mask: torch.Tensor, router_probs: torch.Tensor):
    """fairseq's (and transformers 4.x's) expert mixing: sum_e probs[:, e] * expert_e(x) * (1 - token dropout)."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        tokens = torch.nonzero(router_probs[:, e]).flatten()
        if len(tokens):
            y = self[f"expert_{e}"](hidden_states[tokens]) * router_probs[tokens, e, None]
            out[tokens] += y * (1 - self.moe_token_dropout)
    return out


@register("NllbMoeForConditionalGeneration")
class NllbMoe(Seq2SeqAdapter):
    family = "NLLB-MoE"
    block_class_name = "NllbMoeSparseMLP"

    def check_config(self, config) -> None:
        if config.second_expert_policy != "all":
            raise UnsupportedModelError(
                f"NLLB-MoE with second_expert_policy={config.second_expert_policy!r} routes at random at "
                "inference; moerun exports the deterministic policy 'all'"
            )
        if config.activation_function not in self.activations:
            raise UnsupportedModelError(f"NLLB-MoE with activation {config.activation_function!r}: "
                                        f"the MoE op supports {', '.join(self.activations)}")
        if config.moe_eval_capacity_token_fraction < 1.0:
            log.warning("this NLLB-MoE config lets expert capacity drop tokens at inference "
                        "(moe_eval_capacity_token_fraction=%s); moerun routes every token",
                        config.moe_eval_capacity_token_fraction)

    def experts_per_token(self, config) -> int:
        return 2

    def expert_dims(self, config) -> tuple[int, int]:
        return config.d_model, config.encoder_ffn_dim

    def decoder_layers(self, config) -> int:
        return config.decoder_layers

    def kv_shape(self, config):
        from ..export import KVShape

        head_dim = config.d_model // config.decoder_attention_heads
        return KVShape(config.decoder_attention_heads, head_dim, head_dim)

    def cross_attention(self, model):
        config = model.config
        head_dim = config.d_model // config.decoder_attention_heads
        return [CrossAttention(layer.cross_attention.k_proj, layer.cross_attention.v_proj,
                               config.decoder_attention_heads, head_dim)
                for layer in model.model.decoder.layers]

    def prepare_reference(self, model) -> None:
        # transformers 5.x's NllbMoeExperts.forward one-hot encodes the already one-hot top-1 mask, so
        # at inference only experts 0 and 1 ever run (measured with 5.24: changing expert 3's weights
        # leaves the output unchanged). --verify compares against the fairseq semantics instead.
        for module in model.modules():
            if type(module).__name__ == "NllbMoeExperts":
                module.forward = types.MethodType(_experts_forward, module)

    def fuse(self, block, config):
        experts = [block.experts[f"expert_{e}"] for e in range(config.num_experts)]
        attrs = MoEAttributes(k=2, activation_type=config.activation_function, normalize_routing_weights=1)
        # At inference each expert's output is scaled by (1 - moe_token_dropout): folded into fc2.
        return self.fused(block.router.classifier, [e.fc1 for e in experts], [e.fc2 for e in experts], attrs,
                          output_scale=1.0 - config.moe_token_dropout)
