"""MoE families transformers ships that moerun refuses, each with the reason (what the fused op cannot express, or
what the decoder I/O does not carry), so that `moerun convert` says why in one line instead of "unsupported".
"""

from __future__ import annotations

from ...runtime.errors import UnsupportedModelError
from . import register
from .base import MoEAdapter


class _Refused(MoEAdapter):
    exportable = False
    reason = ""

    def check_config(self, config) -> None:
        raise UnsupportedModelError(f"{self.architectures[0]}: {self.reason}")


@register("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
class Gemma4(_Refused):
    family = "Gemma-4"
    # measured with onnxruntime 1.31: MoE with a separate fc3 gate fails "FC3 is not implemented for CPU MoE"
    reason = ("its experts gate with GELU (gelu_pytorch_tanh(gate) * up, GeGLU); ONNX Runtime's MoE and QMoE ops "
              "gate only with SiLU (fused swiglu) on the CPU, so one fused node cannot compute them exactly")


@register("DeepseekV32ForCausalLM")
class DeepseekV32(_Refused):
    family = "DeepSeek-V3.2"
    reason = ("its attention caches the compressed MLA latents and its sparse-attention indexer keeps a key cache of "
              "its own to pick the top-k positions of each query; moerun's decoder I/O carries per-head keys and "
              "values only (DeepseekV3ForCausalLM converts)")


@register("LongcatFlashForCausalLM")
class LongcatFlash(_Refused):
    family = "LongCat-Flash"
    reason = ("its router chooses among FFN experts and zero-computation (identity) experts; ONNX Runtime's MoE op "
              "computes every chosen expert as an FFN")
