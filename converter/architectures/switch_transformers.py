"""Switch Transformers: top-1 softmax routing (the expert's output scaled by its probability),
bias-free experts, T5-style encoder-decoder with relative position bias.

Expert capacity: Hugging Face drops a token when more than ``expert_capacity`` tokens of the same
sequence chose its expert before it. At decode time a step holds one token per sequence, so it
cannot bind in the decoder; in the encoder it binds only for sources longer than the capacity.
moerun routes every token (no drops); outputs are identical whenever no expert overflows.
"""

from __future__ import annotations

from ...custom_ops import MoEAttributes
from ...runtime.errors import UnsupportedModelError
from . import register
from .seq2seq import CrossAttention, Seq2SeqAdapter


@register("SwitchTransformersForConditionalGeneration")
class SwitchTransformers(Seq2SeqAdapter):
    family = "Switch Transformers"
    block_class_name = "SwitchTransformersSparseMLP"

    def check_config(self, config) -> None:
        if config.dense_act_fn not in self.activations:
            raise UnsupportedModelError(f"Switch Transformers with dense_act_fn {config.dense_act_fn!r}: "
                                        f"the MoE op supports {', '.join(self.activations)}")

    def experts_per_token(self, config) -> int:
        return 1

    def expert_dims(self, config) -> tuple[int, int]:
        return config.d_model, config.d_ff

    def decoder_layers(self, config) -> int:
        return config.num_decoder_layers

    def kv_shape(self, config):
        from ..export import KVShape

        return KVShape(config.num_heads, config.d_kv, config.d_kv)

    def cross_attention(self, model):
        config = model.config
        return [CrossAttention(block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v,
                               config.num_heads, config.d_kv)
                for block in model.decoder.block]

    def fuse(self, block, config):
        experts = [block.experts[f"expert_{e}"] for e in range(config.num_experts)]
        attrs = MoEAttributes(k=1, activation_type=config.dense_act_fn, normalize_routing_weights=0)
        return self.fused(block.router.classifier, [e.wi for e in experts], [e.wo for e in experts], attrs)
