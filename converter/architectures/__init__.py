"""Registry of architecture adapters, keyed by the Hugging Face architecture name in config.json.

Adding a family: one module here with a ``MoEAdapter`` subclass decorated with ``@register(...)``,
and its import at the bottom of this file.
"""

from __future__ import annotations

from ...runtime.errors import UnsupportedModelError

__all__ = ["adapter_for", "register", "supported_architectures"]

_REGISTRY: dict[str, type] = {}


def register(*architectures: str):
    def wrap(cls):
        for name in architectures:
            _REGISTRY[name] = cls
        cls.architectures = architectures
        return cls

    return wrap


def supported_architectures() -> list[str]:
    """Architectures that export today (adapters that only explain a refusal are left out)."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.exportable)


_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _has_experts(config) -> bool:
    return any(getattr(config, key, None) for key in _EXPERT_COUNT_KEYS)


def adapter_for(config):
    """The adapter for a transformers config; UnsupportedModelError lists what is supported."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in _REGISTRY:
            adapter = _REGISTRY[name]()
            adapter.check_config(config)
            return adapter
    shown = ", ".join(names) or f"model_type {getattr(config, 'model_type', '?')!r}"
    if not _has_experts(config):
        raise UnsupportedModelError(
            f"{shown} is a dense model (no Mixture-of-Experts layers); moerun converts MoE models: "
            f"{', '.join(supported_architectures())}"
        )
    raise UnsupportedModelError(
        f"unsupported architecture {shown}; supported: {', '.join(supported_architectures())}"
    )


from . import deepseek, gpt_oss, granitemoe, mixtral, nllb_moe, olmoe, phimoe, qwen2_moe, qwen3_moe, qwen3_next, switch_transformers  # noqa: E402,F401,I001,E501
from . import dbrx, jetmoe, lfm2_moe, llama4, standard_families  # noqa: E402,F401
from . import granitemoehybrid, jamba, refused  # noqa: E402,F401
