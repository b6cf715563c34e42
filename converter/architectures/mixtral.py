"""Mixtral: softmax over all experts, top-k, renormalised; SwiGLU experts stored as [gate | up]."""

from __future__ import annotations

from . import register
from .base import TopKSoftmaxAdapter


@register("MixtralForCausalLM")
class Mixtral(TopKSoftmaxAdapter):
    family = "Mixtral"
    block_class_name = "MixtralSparseMoeBlock"
    fused_attention = True
